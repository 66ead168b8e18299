"""The fine-tuning command line: `finetune.py --config configs/finetune/ner.yaml --model.source DIR`.

LightningCLI over FinetuneModule and FinetuneDataModule (every knob a YAML key, `--print_config`,
overrides such as `--trainer.max_epochs 5`). One command does the whole protocol: fit with
early stopping on the dev metric (the config's callbacks), score the best checkpoint on dev and
test, write the scores beside the logs (scores.json), and export the best model as a Hugging Face
folder (`--export_dir`, default `<log dir>/model`). The pretrained model is named once
(`model.source`) and the label names come from the training file: both are linked to where
they are needed.
"""

import json
import os
import sys
import warnings

from pytorch_lightning.cli import LightningCLI

from convmodel.cli import ConvmodelArgumentParser, enable_docstring_help, exit_on_user_error
from convmodel.errors import UserError


class FinetuneArgumentParser(ConvmodelArgumentParser):
    """ConvmodelArgumentParser, saying what to give when the config names no pretrained model."""

    def error(self, message: str, ex: Exception | None = None):
        if 'Parser key "model.source"' in message and "Got value: None" in message:
            message = ("--model.source is required: the pretrained model to start from, a folder written by "
                       "export_model.py (e.g. runs/bert-tiny/model) or a .ckpt written by trainer.py")
        super().error(message, ex)


class FinetuneCLI(LightningCLI):
    """LightningCLI for one fine-tuning run; `run=False`: finetune() drives fit, scoring and export."""

    def __init__(self, *args, **kwargs):
        from convmodel.finetune.datamodule import FinetuneDataModule
        from convmodel.finetune.module import FinetuneModule

        kwargs.setdefault("parser_class", FinetuneArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("run", False)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(FinetuneModule, FinetuneDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

        # their own sections, so `--early_stopping.patience 5` works (an item of trainer.callbacks
        # cannot be set from the command line); both follow val/score, the task metric (model.metric)
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/score", "early_stopping.mode": "max",
                             "early_stopping.patience": 3, "early_stopping.min_delta": 0.01})
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/score", "checkpoint.mode": "max",
                             "checkpoint.save_top_k": 1, "checkpoint.filename": "best"})
        parser.link_arguments("model.source", "data.source")
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="where to write the best model as a Hugging Face folder (default: <log dir>/model)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace --export_dir if it exists and is not empty (otherwise that is refused)")
        parser.add_argument("--num_seeds", type=int, default=1,
                            help="run the whole protocol under seeds seed_everything, +1, ..., +N-1 and write "
                                 "seeds.md/seeds.json (mean ± std per metric) beside the runs")


def finetune(cli: FinetuneCLI, export_dir: str | None = None) -> dict:
    """Fit, score the best checkpoint on dev (and test), export it; the run's result (scores per split, paths)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from convmodel.export.folder import check_output_dir
    from convmodel.finetune.export import export_finetuned

    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    export_dir = export_dir or cli.config.get("export_dir") or os.path.join(trainer.log_dir or ".", "model")
    overwrite = bool(cli.config.get("overwrite"))
    check_output_dir(export_dir, overwrite)
    trainer.fit(module, datamodule=data)
    if trainer.interrupted:
        raise UserError("fine-tuning was interrupted; nothing was scored or exported")
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks
                 if isinstance(c, ModelCheckpoint) and c.monitor == "val/score" and c.best_model_path), None)
    if best is None:
        print("[convmodel] no checkpoint monitors val/score (trainer.callbacks): scoring the last weights",
              file=sys.stderr)
    scores = {"dev": strip_prefix(trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False)[0], "val/")}
    if "test" in data.examples:
        scores["test"] = strip_prefix(trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)[0], "test/")
    config = json.loads(json.dumps(cli.parser.dump(cli.config, format="json", skip_none=False)))
    export_finetuned(module, data.tokenizer, export_dir, overwrite, scores, config)
    result = {"best_checkpoint": best, "stopped_epoch": trainer.current_epoch, "global_step": trainer.global_step,
              "export_dir": export_dir, "scores": scores}
    if trainer.log_dir:
        with open(os.path.join(trainer.log_dir, "scores.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(score_summary(result), flush=True)
    return result


def finetune_seeds(argv: list[str]) -> list[dict]:
    """One run, or `--num_seeds N` runs with consecutive seeds and their mean ± std table."""
    from convmodel.finetune.seeds import write_seed_summary

    cli = FinetuneCLI(args=argv)
    num_seeds = int(cli.config.get("num_seeds") or 1)
    if num_seeds < 1:
        raise UserError(f"--num_seeds {num_seeds}: give at least 1")
    base = cli.config.get("seed_everything")
    base = base if isinstance(base, int) and not isinstance(base, bool) else 0
    seeds = [base + i for i in range(num_seeds)]
    export_root = cli.config.get("export_dir")
    if export_root and num_seeds > 1:  # before the first run, not after it
        from convmodel.export.folder import check_output_dir

        for seed in seeds:
            check_output_dir(os.path.join(export_root, f"seed{seed}"), bool(cli.config.get("overwrite")))
    runs = []
    for i, seed in enumerate(seeds):
        if i:
            cli = FinetuneCLI(args=[*argv, "--seed_everything", str(seed)])
        if num_seeds > 1:
            print(f"[convmodel] seed {seed} ({i + 1} of {num_seeds})", flush=True)
        export_dir = os.path.join(export_root, f"seed{seed}") if export_root and num_seeds > 1 else None
        runs.append({"seed": seed, **finetune(cli, export_dir)})
    if num_seeds > 1:
        folder = os.path.dirname(os.path.normpath(cli.trainer.log_dir)) if cli.trainer.log_dir else "."
        md, js = write_seed_summary(folder, runs, seeds)
        with open(md, encoding="utf-8") as f:
            print(f.read(), end="")
        print(f"[convmodel] the table of {num_seeds} seeds: {md} and {js}", flush=True)
    return runs


def strip_prefix(metrics: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix) and k != f"{prefix}score"}


def score_summary(result: dict) -> str:
    """The end of a run: where the model went and the main scores per split."""
    lines = [f"[convmodel] best checkpoint: {result['best_checkpoint'] or 'the last weights'} "
             f"(stopped after {result['global_step']} steps)"]
    for split, scores in result["scores"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if "_" not in k or k in ("macro_f1",))
        lines.append(f"[convmodel] {split}: {shown}")
    lines.append(f"[convmodel] exported the best model to {result['export_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run one fine-tuning; a user mistake ends with `error: <what to do>` and exit status 2."""
    enable_docstring_help()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_on_user_error(lambda: finetune_seeds(argv))
