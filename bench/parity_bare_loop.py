"""Loss-curve parity: bert-tiny trained through convmodel + Lightning vs a bare PyTorch loop, step by step.

Not a speed benchmark: a check that convmodel trains what it claims to train. Both sides start
from the same weights and see the same batches with the same masks; the bare side takes nothing
from convmodel's training path:

- convmodel: `JsonlDataModule` over the sample shards, `BertPretraining` with the model and
  optimizer settings of configs/bert-tiny.yaml (read at run time), a real `pl.Trainer` (cpu, 1
  device, max_steps, no validation, logger or checkpoints); a callback records each step's
  `outputs["loss"]`, the learning rate the step used and a hash of its batch.
- bare: `transformers.BertForMaskedLM` built from its own `BertConfig` (the YAML sizes, vocabulary
  and pad id from the tokenizer; checked equal to convmodel's), loaded with convmodel's initial
  state dict; the loss is transformers' own `model(input_ids, attention_mask, labels).loss`
  (logits over the full vocabulary, cross entropy ignoring -100), whereas convmodel projects only
  the masked positions and computes its own cross entropy. `torch.optim.AdamW` over
  `convmodel.optim.param_groups` (decay on dim >= 2 only) with the YAML hyperparameters, a
  LambdaLR with the warmup + linear-decay formula written out here (not convmodel's
  `lr_factor`), stepped per step. Batches come from a second `JsonlDataModule` with the same
  options, its loader told the epoch the way Lightning tells it (`epoch_fn`), for as many
  epochs as the steps need; every step's batch hash and learning rate are compared with the
  convmodel side's.

Dropout: the global torch RNG is seeded with the same value right before `trainer.fit` and
before the bare loop. Both paths draw the same dropout masks in the same order (the encoder is
the same module tree; only the heads differ, and they have no dropout; each side's DataLoader
draws its base seed from the global RNG once per epoch, before the epoch's first step), so the
curves agree with the config's dropout (BertConfig's default 0.1) as well as with dropout 0.
`--dropout 0` sets hidden and attention dropout to 0 on both sides; the default runs both.

Reported per dropout setting: max, mean and mean signed |loss_convmodel - loss_bare| over all
steps, the two losses at steps 1, 10, 100 and the last, final loss and wall time of each side
(all of `trainer.fit` / the whole bare loop; the bare side computes full-vocabulary logits, so
it is the slower one; times are context, not a speed comparison: see lightning_vs_bare.py).
"Agree within float noise": fp32 round-off (1e-7 relative at step 1) amplified by training,
of the order of 1e-4 .. 1e-3 at the end, with no sign bias.

    python bench/parity_bare_loop.py [--steps 300] [--dropout both|config|0] [--seed 0]
"""

import argparse
import copy
import hashlib
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
import yaml
from sample_data import ROOT, sample_data
from transformers import BertConfig, BertForMaskedLM

from convmodel.data import JsonlDataModule
from convmodel.models import BertPretraining
from convmodel.optim import param_groups
from convmodel.tokenization import load_tokenizer

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key].contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class Trace:
    """Per step: the loss, the learning rate the step used, the batch's hash."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.digests: list[str] = []
        self.seconds = 0.0
        self.epochs = 0


class Recorder(pl.Callback):
    def __init__(self, trace: Trace):
        self.trace = trace

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trace.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.trace.digests.append(batch_digest(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trace.losses.append(float(outputs["loss"]))
        self.trace.epochs = trainer.current_epoch + 1


def train_convmodel(module: BertPretraining, data_args: dict, steps: int, seed: int) -> tuple[Trace, dict]:
    trace = Trace()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[Recorder(trace)],
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        enable_model_summary=False, enable_progress_bar=False,
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    trainer.fit(module, datamodule=JsonlDataModule(**data_args))
    trace.seconds = time.perf_counter() - start
    optimizer = trainer.optimizers[0]
    summary = {
        "class": type(optimizer).__name__,
        "groups": [(len(g["params"]), g["weight_decay"], g["betas"], g["eps"], g["initial_lr"])
                   for g in optimizer.param_groups],
    }
    return trace, summary


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup reaching the peak at step warmup-1, then linear decay to 0 at `total` (0-based)."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def train_bare(model: BertForMaskedLM, data_args: dict, steps: int, seed: int, hp: dict) -> tuple[Trace, dict]:
    trace = Trace()
    data = JsonlDataModule(**data_args)
    data.setup("fit")
    loader = data.train_dataloader()
    epoch = 0
    loader.epoch_fn = lambda: epoch  # what Lightning's trainer.current_epoch gives the datamodule
    optimizer = torch.optim.AdamW(param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=hp["betas"],
                                  eps=hp["eps"], weight_decay=hp["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, hp["warmup_steps"], steps))
    summary = {
        "class": type(optimizer).__name__,
        "groups": [(len(g["params"]), g["weight_decay"], g["betas"], g["eps"], g["initial_lr"])
                   for g in optimizer.param_groups],
    }
    model.train()
    torch.manual_seed(seed)
    start = time.perf_counter()
    while len(trace.losses) < steps:
        for batch in loader:
            trace.lrs.append(optimizer.param_groups[0]["lr"])
            trace.digests.append(batch_digest(batch))
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            trace.losses.append(loss.item())
            trace.epochs = epoch + 1
            if len(trace.losses) == steps:
                break
        epoch += 1
    trace.seconds = time.perf_counter() - start
    return trace, summary


def compare(name: str, ours: Trace, bare: Trace, steps: int) -> None:
    diffs = [a - b for a, b in zip(ours.losses, bare.losses, strict=True)]
    absd = [abs(d) for d in diffs]
    same_batches = sum(a == b for a, b in zip(ours.digests, bare.digests, strict=True))
    lr_diff = max(abs(a - b) for a, b in zip(ours.lrs, bare.lrs, strict=True))
    worst = max(range(steps), key=absd.__getitem__)
    print(f"\n== {name} ==")
    print(f"batches identical (sha256 of input_ids, labels, attention_mask): {same_batches}/{steps}; "
          f"first {ours.digests[0]} / {bare.digests[0]}; epochs {ours.epochs} / {bare.epochs}")
    print(f"learning rate: max |convmodel - bare| over the steps {lr_diff:.3g} "
          f"(step 1 {ours.lrs[0]:.3g}, peak {max(ours.lrs):.3g}, last {ours.lrs[-1]:.3g})")
    print(f"|loss_convmodel - loss_bare|: max {max(absd):.3g} (step {worst + 1}), mean {statistics.mean(absd):.3g}, "
          f"mean signed {statistics.mean(diffs):+.3g}; mean over the last 50 steps {statistics.mean(absd[-50:]):.3g}")
    print(f"{'step':>6} {'convmodel':>12} {'bare':>12} {'difference':>12}")
    for s in sorted({1, 10, 100, steps} & set(range(1, steps + 1))):
        print(f"{s:>6} {ours.losses[s - 1]:>12.6f} {bare.losses[s - 1]:>12.6f} {diffs[s - 1]:>+12.3g}")
    print(f"final loss: convmodel {ours.losses[-1]:.6f} in {ours.seconds:.1f} s "
          f"({ours.seconds / steps * 1000:.0f} ms/step), bare {bare.losses[-1]:.6f} in {bare.seconds:.1f} s "
          f"({bare.seconds / steps * 1000:.0f} ms/step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dropout", choices=["both", "config", "0"], default="both")
    parser.add_argument("--seed", type=int, default=0, help="global torch seed: init, and before each run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    with open(f"{ROOT}/configs/bert-tiny.yaml") as f:
        config = yaml.safe_load(f)
    model_args = {k: v for k, v in config["model"]["init_args"].items() if k not in ("tokenizer", "objective")}
    data_cfg = config["data"]
    tokenizer, shards = sample_data(data_cfg["max_seq_len"])
    data_args = {"tokenizer": tokenizer, "train_files": shards, "objective": data_cfg["objective"],
                 "batch_size": data_cfg["batch_size"], "max_seq_len": data_cfg["max_seq_len"]}
    print(f"configs/bert-tiny.yaml now: model {model_args}, batch {data_args['batch_size']}, "
          f"max_seq_len {data_args['max_seq_len']}; {args.steps} steps, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    tok = load_tokenizer(tokenizer)

    for setting in (["config", "0"] if args.dropout == "both" else [args.dropout]):
        hf_keys = dict(model_args["config"], **(NO_DROPOUT if setting == "0" else {}))
        torch.manual_seed(args.seed)
        module = BertPretraining(tokenizer=tokenizer, objective=data_cfg["objective"],
                                 **dict(model_args, config=hf_keys))
        hp = {"lr": module.lr, "betas": module.betas, "eps": module.eps, "weight_decay": module.weight_decay,
              "warmup_steps": module.warmup_steps}
        if module.optimizer_name != "adamw" or module.schedule != "linear":
            raise SystemExit(f"the bare loop implements adamw + linear, not {module.optimizer_name} + "
                             f"{module.schedule}")
        bare_config = BertConfig(**hf_keys, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
        ours_config = module.model.config.to_dict()
        differing = {k for k, v in bare_config.to_dict().items() if ours_config.get(k) != v}
        if differing:
            raise SystemExit(f"BertConfig differs from convmodel's in {sorted(differing)}")
        bare_model = BertForMaskedLM(bare_config)
        initial = copy.deepcopy(module.model.state_dict())
        bare_model.load_state_dict(initial)
        embeddings = bare_model.bert.embeddings.word_embeddings.weight
        assert bare_model.cls.predictions.decoder.weight is embeddings, "decoder no longer tied"
        assert all(torch.equal(v, initial[k]) for k, v in bare_model.state_dict().items())

        ours, ours_opt = train_convmodel(module, data_args, args.steps, args.seed)
        bare, bare_opt = train_bare(bare_model, data_args, args.steps, args.seed, hp)
        name = (f"dropout from the config (hidden {bare_config.hidden_dropout_prob:.2g}, "
                f"attention {bare_config.attention_probs_dropout_prob:.2g})" if setting == "config" else "dropout 0")
        print(f"\noptimizer convmodel {ours_opt}\noptimizer bare      {bare_opt}")
        if ours_opt != bare_opt:
            print("WARNING: the optimizers differ")
        compare(name, ours, bare, args.steps)


if __name__ == "__main__":
    main()
