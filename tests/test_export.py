"""export_model.py on real checkpoints of tiny models, trained a few steps on real shards.

Each family is trained once (module fixtures) and exported once; the tests check what a user
of the exported folder sees: the same logits as the Lightning module, working pipelines, a
folder that loads without convmodel, and one clear line for each mistake.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from convmodel.cli import main as trainer_main
from convmodel.data import JsonlDataModule, prepare_train_data
from convmodel.export import export_model, fill_mask_main
from convmodel.export import main as export_main
from convmodel.models import BertPretraining, Gpt2Pretraining
from convmodel.models.lean_albert_pretraining import LeanAlbertPretraining

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_GPT2 = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
TINY_LEAN_ALBERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "embedding_size": 16, "hidden_act_gated": True, "share_large_matrices": 1,
                    "position_embedding_type": "rotary", "max_position_embeddings": 64}
# family -> (module class, objective, config)
FAMILIES = {
    "bert-mlm": (BertPretraining, "mlm", TINY_BERT),
    "bert-sop": (BertPretraining, "sop", TINY_BERT),
    "gpt2-clm": (Gpt2Pretraining, "clm", TINY_GPT2),
    "lean-albert-mlm": (LeanAlbertPretraining, "mlm", TINY_LEAN_ALBERT),
    "lean-albert-sop": (LeanAlbertPretraining, "sop", TINY_LEAN_ALBERT),
}
SENTENCE = "The [MASK] statement is used to define a function."


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, text_corpus, tokenizer_dir) -> Path:
    """A run folder as `make demo` leaves it: the tokenizer at a relative path, shards per objective."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    for objective in ("mlm", "sop", "clm"):
        prepare_train_data(text_corpus["valid"], str(root / "tokenizer"), str(root / "shards" / objective),
                           objective=objective, max_seq_len=64, num_workers=1, progress=False)
    return root


def datamodule(workspace: Path, objective: str) -> JsonlDataModule:
    shards = str(workspace / "shards" / objective / "part-*.jsonl")
    return JsonlDataModule(str(workspace / "tokenizer"), train_files=shards, val_files=shards, objective=objective,
                           batch_size=4, max_seq_len=64)


def train_with_cli(workspace: Path) -> Path:
    """BERT mlm through trainer.py's CLI, run from `workspace` with `data.tokenizer: tokenizer` (relative)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        shards = "shards/mlm/part-*.jsonl"
        trainer_main(["fit", "--config", str(REPO / "configs" / "bert-tiny.yaml"), "--data.tokenizer", "tokenizer",
                      "--data.train_files", shards, "--data.val_files", shards, "--data.batch_size", "4",
                      "--data.max_seq_len", "64", "--model.init_args.config", json.dumps(TINY_BERT),
                      "--model.init_args.warmup_steps", "1", "--trainer.max_steps", "3",
                      "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                      "--trainer.enable_model_summary", "false"])
    return workspace / "runs" / "bert-tiny" / "checkpoints" / "last.ckpt"


def train_with_trainer(workspace: Path, family: str) -> Path:
    """A module trained 3 steps by a plain pl.Trainer; its ModelCheckpoint monitors val/loss."""
    module_class, objective, config = FAMILIES[family]
    pl.seed_everything(0)
    module = module_class(str(workspace / "tokenizer"), config=config, objective=objective, warmup_steps=1, lr=1e-2)
    dirpath = workspace / "runs" / family
    checkpoint = ModelCheckpoint(dirpath=str(dirpath), filename="best", monitor="val/loss")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, check_val_every_n_epoch=None,
                         limit_val_batches=2, num_sanity_val_steps=0, logger=False, callbacks=[checkpoint],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(dirpath))
    trainer.fit(module, datamodule(workspace, objective))
    return dirpath / "best.ckpt"


@pytest.fixture(scope="module")
def exported(workspace, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (checkpoint, exported folder)."""
    out = tmp_path_factory.mktemp("exported")
    result = {}
    for family in FAMILIES:
        ckpt = train_with_cli(workspace) if family == "bert-mlm" else train_with_trainer(workspace, family)
        result[family] = (ckpt, Path(export_model(str(ckpt), str(out / family))))
    return result


def val_batch(workspace: Path, objective: str) -> dict[str, torch.Tensor]:
    data = datamodule(workspace, objective)
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def load_module(family: str, ckpt: Path):
    """The Lightning module as training left it (the tokenizer path was relative to the run folder)."""
    tokenizer = str(ckpt.parents[3 if family == "bert-mlm" else 2] / "tokenizer")
    return FAMILIES[family][0].load_from_checkpoint(str(ckpt), map_location="cpu", tokenizer=tokenizer).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_model_gives_the_lightning_modules_logits_and_loss(family, exported, workspace):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining

    ckpt, folder = exported[family]
    objective = FAMILIES[family][1]
    module = load_module(family, ckpt)
    batch = val_batch(workspace, objective)
    auto = {"mlm": AutoModelForMaskedLM, "sop": AutoModelForPreTraining, "clm": AutoModelForCausalLM}[objective]
    model = auto.from_pretrained(folder).eval()
    assert type(model) is type(module.to_hf())
    with torch.no_grad():
        expected = module(**model_inputs(batch))
        out = model(**model_inputs(batch))
        logits = out.logits if objective != "sop" else out.prediction_logits
        expected_logits = expected.logits if objective != "sop" else expected.prediction_logits
        assert (logits - expected_logits).abs().max().item() <= 1e-5
        # the loss the module trained on is the loss of the exported model's own logits
        losses = module.compute_losses(batch)
        labels = batch["labels"]
        if objective == "clm":
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        else:
            lm_loss = F.cross_entropy(logits[labels != -100], labels[labels != -100])
        torch.testing.assert_close(lm_loss, losses.lm_loss, rtol=1e-5, atol=1e-5)
        if objective == "sop":
            sop_logits = out.sop_logits if family.startswith("lean-albert") else out.seq_relationship_logits
            sop_loss = F.cross_entropy(sop_logits, batch["sentence_order_label"])
            torch.testing.assert_close(lm_loss + sop_loss, losses.loss, rtol=1e-5, atol=1e-5)
            masked_lm = AutoModelForMaskedLM.from_pretrained(folder).eval()
            assert (masked_lm(**model_inputs(batch)).logits - expected_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folder_has_config_safetensors_tokenizer_and_card(family, exported):
    ckpt, folder = exported[family]
    objective = FAMILIES[family][1]
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".ckpt")) or name.startswith(".") for name in files)
    config = json.loads((folder / "config.json").read_text())
    architecture = {"bert-mlm": "BertForMaskedLM", "bert-sop": "BertForPreTraining", "gpt2-clm": "GPT2LMHeadModel",
                    "lean-albert-mlm": "LeanAlbertForMaskedLM", "lean-albert-sop": "LeanAlbertForPreTraining"}[family]
    assert config["architectures"] == [architecture]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["pad_token_id"] == 0 and config["vocab_size"] == 1000
    if objective == "clm":
        assert config["bos_token_id"] == config["eos_token_id"] == 5
    else:
        assert (config["cls_token_id"], config["sep_token_id"], config["mask_token_id"]) == (2, 3, 4)
    if family.startswith("lean-albert"):  # the code travels with the weights
        assert {"configuration_lean_albert.py", "modeling_lean_albert.py", "lean_ops.py"} <= files
        assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_lean_albert.LeanAlbertForMaskedLM"
    card = (folder / "README.md").read_text()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert f"optimizer steps: {checkpoint['global_step']}" in card and checkpoint["global_step"] == 3
    assert f"class_path: convmodel.models.{'lean_albert_pretraining.' if 'lean' in family else ''}" in card
    assert FAMILIES[family][0].__name__ in card
    assert ("pipeline_tag: text-generation" if objective == "clm" else "pipeline_tag: fill-mask") in card
    if family == "bert-mlm":  # the CLI's checkpoint monitors nothing: nothing to report, and it says so
        assert "final validation loss: not recorded" in card
    else:
        [state] = [s for name, s in checkpoint["callbacks"].items() if name.startswith("ModelCheckpoint")]
        # a monitored checkpoint is written after its step's validation, and records that step
        assert f"final validation loss: {float(state['current_score']):.4f}" in card


def test_relative_tokenizer_path_is_found_from_the_checkpoint(exported, workspace):
    ckpt, folder = exported["bert-mlm"]
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["tokenizer"] == "tokenizer" and os.getcwd() != str(workspace)  # resolved via the ckpt's parents
    assert (folder / "tokenizer.json").read_text() == (workspace / "tokenizer" / "tokenizer.json").read_text()


def test_fill_mask_pipeline_runs_on_mlm_and_sop_exports(exported):
    from transformers import pipeline

    for family in ("bert-mlm", "bert-sop", "lean-albert-mlm", "lean-albert-sop"):
        predictions = pipeline("fill-mask", str(exported[family][1]))(SENTENCE)
        assert len(predictions) == 5 and all("[MASK]" not in p["sequence"] for p in predictions)


def test_causal_lm_tokenizer_adds_no_specials_and_generation_runs(exported):
    from transformers import AutoTokenizer, pipeline

    folder = str(exported["gpt2-clm"][1])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer("def f(): return 1")
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert not {tokenizer.cls_token_id, tokenizer.sep_token_id} & set(encoded["input_ids"])
    assert tokenizer.model_max_length == TINY_GPT2["n_positions"]
    generate = pipeline("text-generation", folder)
    [result] = generate("The def statement", max_new_tokens=4, do_sample=False)
    assert result["generated_text"].startswith("The def statement")
    # the BERT export keeps [CLS] ... [SEP] and segment ids
    bert = AutoTokenizer.from_pretrained(str(exported["bert-mlm"][1]))("def f(): return 1")
    assert bert["input_ids"][0] == 2 and bert["input_ids"][-1] == 3 and "token_type_ids" in bert


FRESH_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

report = {}
for family, folder in json.loads(sys.argv[1]).items():
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    if family == "gpt2-clm":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        text = "The def statement"
        run = pipeline("text-generation", folder)
        output = run(text, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    else:
        model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
        text = "The [MASK] statement is used to define a function."
        run = pipeline("fill-mask", folder, trust_remote_code=True)
        output = [p["token_str"] for p in run(text)]
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    report[family] = {"ids": inputs["input_ids"].tolist(), "logits": logits.tolist(), "output": output,
                      "model_module": type(model).__module__}
report["convmodel_imported"] = any(name == "convmodel" or name.startswith("convmodel.") for name in sys.modules)
print(json.dumps(report))
"""


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf-home"))
    return env


def test_exported_folders_load_in_a_process_without_convmodel(exported, tmp_path):
    families = ("bert-mlm", "gpt2-clm", "lean-albert-mlm")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    folders = {family: str(exported[family][1]) for family in families}
    # -I: isolated mode, neither the repository nor the current folder is on sys.path
    result = subprocess.run([sys.executable, "-I", str(script), json.dumps(folders)], cwd=tmp_path,
                            env={**clean_env(tmp_path), "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["convmodel_imported"] is False
    assert report["lean-albert-mlm"]["model_module"].startswith("transformers_modules.")
    for family in families:
        module = load_module(family, exported[family][0])
        with torch.no_grad():
            expected = module(input_ids=torch.tensor(report[family]["ids"])).logits
        torch.testing.assert_close(torch.tensor(report[family]["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert report["gpt2-clm"]["output"].startswith("The def statement")
    assert len(report["bert-mlm"]["output"]) == 5 and len(report["lean-albert-mlm"]["output"]) == 5


def run_export(args: list[str], capsys) -> tuple[int, str]:
    """export_model.py in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as info:
        export_main(args)
        raise SystemExit(0)
    return info.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *phrases: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_a_file_that_is_not_our_checkpoint_is_one_error_line(tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    assert_one_error_line(*run_export(["--ckpt_path", str(plain), "--output_dir", str(tmp_path / "a")], capsys),
                          str(plain), "not a Lightning checkpoint")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    assert_one_error_line(*run_export(["--ckpt_path", str(text), "--output_dir", str(tmp_path / "b")], capsys),
                          "not a PyTorch checkpoint")
    assert_one_error_line(*run_export(["--ckpt_path", str(tmp_path / "none.ckpt"), "--output_dir",
                                       str(tmp_path / "c")], capsys), "no such file")
    pickled = tmp_path / "pickled.ckpt"  # an object torch.load(weights_only=True) refuses to build
    torch.save({"state_dict": {}, "where": Path("somewhere")}, pickled)
    assert_one_error_line(*run_export(["--ckpt_path", str(pickled), "--output_dir", str(tmp_path / "d")], capsys),
                          "Python objects other than tensors", "PosixPath")
    assert not any((tmp_path / name).exists() for name in "abcd")


class OtherModule(pl.LightningModule):
    """Somebody else's LightningModule, with hyperparameters of its own."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_another_projects_lightning_checkpoint_is_refused(tmp_path, capsys):
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(OtherModule(), torch.utils.data.DataLoader(torch.ones(2, 4), batch_size=2))
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    code, err = run_export(["--ckpt_path", str(tmp_path / "other.ckpt"), "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "not written by convmodel")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_names_it_and_tokenizer_option_fixes_it(exported, tokenizer_dir, tmp_path, capsys):
    checkpoint = torch.load(exported["gpt2-clm"][0], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["tokenizer"] = "moved-away/tokenizer"
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    code, err = run_export(["--ckpt_path", str(moved), "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "moved-away/tokenizer", "--tokenizer")
    assert not (tmp_path / "out").exists()
    code, err = run_export(["--ckpt_path", str(moved), "--output_dir", str(tmp_path / "out"),
                            "--tokenizer", tokenizer_dir], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # a tokenizer that does not exist at all is named as the option
    code, err = run_export(["--ckpt_path", str(moved), "--output_dir", str(tmp_path / "x"),
                            "--tokenizer", str(tmp_path / "nope")], capsys)
    assert_one_error_line(code, err, "--tokenizer", "nope")


def test_non_empty_output_dir_needs_overwrite_which_replaces_it(exported, tmp_path, capsys):
    ckpt = str(exported["gpt2-clm"][0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    assert_one_error_line(*run_export(["--ckpt_path", ckpt, "--output_dir", str(out)], capsys),
                          str(out), "--overwrite")
    assert os.listdir(out) == ["stale.bin"]
    code, err = run_export(["--ckpt_path", ckpt, "--output_dir", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert "stale.bin" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".out.")]  # no staging folder left
    # an overwrite that would delete the checkpoint itself is refused
    code, err = run_export(["--ckpt_path", ckpt, "--output_dir", str(Path(ckpt).parent), "--overwrite"], capsys)
    assert_one_error_line(code, err, "would delete --ckpt_path")
    assert Path(ckpt).is_file()


def test_dtype_float16_writes_half_precision_weights(exported, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForMaskedLM

    ckpt = str(exported["bert-mlm"][0])
    code, err = run_export(["--ckpt_path", ckpt, "--output_dir", str(tmp_path / "fp16"), "--dtype", "float16"], capsys)
    assert code == 0, err
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F16"}
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    reference = load_module("bert-mlm", exported["bert-mlm"][0]).to_hf()
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               reference.bert.embeddings.word_embeddings.weight.half().float())
    with safe_open(str(exported["bert-mlm"][1] / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
    assert_one_error_line(*run_export(["--ckpt_path", ckpt, "--output_dir", str(tmp_path / "int8"), "--dtype",
                                       "int8"], capsys), "--dtype", "float16")


def test_config_names_the_class_and_a_contradicting_one_is_refused(exported, tmp_path, capsys):
    ckpt = str(exported["gpt2-clm"][0])  # written by a plain Trainer: no class recorded by LightningCLI
    code, err = run_export(["--ckpt_path", ckpt, "--output_dir", str(tmp_path / "ok"), "--config",
                            str(REPO / "configs" / "gpt2-tiny.yaml")], capsys)
    assert code == 0, err
    card = (tmp_path / "ok" / "README.md").read_text()
    max_steps = yaml.safe_load((REPO / "configs" / "gpt2-tiny.yaml").read_text())["trainer"]["max_steps"]
    assert "trainer:" in card and f"max_steps: {max_steps}" in card  # the run's trainer section from --config
    cli_ckpt = str(exported["bert-mlm"][0])  # the CLI recorded BertPretraining
    code, err = run_export(["--ckpt_path", cli_ckpt, "--output_dir", str(tmp_path / "bad"), "--config",
                            str(REPO / "configs" / "gpt2-tiny.yaml")], capsys)
    assert_one_error_line(code, err, "Gpt2Pretraining", "BertPretraining")


def test_failed_push_keeps_the_folder_and_says_what_failed(exported, tmp_path):
    env = clean_env(tmp_path)
    env.pop("HF_HUB_OFFLINE", None)
    # nothing listens on port 9 of this machine: the connection is refused at once
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "pushed"
    result = subprocess.run(
        [sys.executable, str(REPO / "trainer" / "export_model.py"), "--ckpt_path", str(exported["gpt2-clm"][0]),
         "--output_dir", str(out), "--push_to_hub", "someone/tiny-gpt2", "--private"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--push_to_hub someone/tiny-gpt2" in errors[0] and "upload failed" in errors[0]
    assert str(out) in errors[0] and "creating the repository" in errors[0]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(out))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_fill_mask_script_prints_top_predictions(exported, capsys):
    with pytest.raises(SystemExit) as info:
        fill_mask_main(["--model_dir", str(exported["bert-mlm"][1]), "--text", SENTENCE])
        raise SystemExit(0)
    assert info.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == SENTENCE and [line.split(".")[0].strip() for line in lines[1:]] == ["1", "2", "3", "4", "5"]
    for args, phrase in (([str(exported["bert-mlm"][1]), "no mask here"], "[MASK]"),
                         ([str(exported["lean-albert-mlm"][1]), SENTENCE], "--trust_remote_code")):
        with pytest.raises(SystemExit) as info:
            fill_mask_main(["--model_dir", args[0], "--text", args[1]])
        assert info.value.code == 2
        assert phrase in capsys.readouterr().err


def test_metrics_and_class_recorded_by_convmodel_reach_the_card(exported, tmp_path, capsys):
    """The `convmodel` checkpoint section may carry `metrics` and `class_path`; export reads both."""
    checkpoint = torch.load(exported["bert-sop"][0], map_location="cpu", weights_only=True)
    checkpoint["callbacks"] = {}
    checkpoint["convmodel"]["metrics"] = {"val/loss": 2.5, "val/ppl": 12.1825, "train/loss": torch.tensor(2.75)}
    checkpoint["convmodel"].pop("metrics_step")  # as checkpoints written before convmodel recorded it
    recorded = tmp_path / "recorded.ckpt"
    torch.save(checkpoint, recorded)
    code, err = run_export(["--ckpt_path", str(recorded), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "last validation loss before the checkpoint: 2.5000 (perplexity 12.18)" in card
    assert "train/loss: 2.7500" in card and "final validation loss" not in card
    for measured, line in ((checkpoint["global_step"], "final validation loss: 2.5000 (perplexity 12.18)"),
                           (1, f"validation loss at step 1: 2.5000 (perplexity 12.18) (the last validation before "
                               f"the checkpoint of step {checkpoint['global_step']})")):
        checkpoint["convmodel"]["metrics_step"] = measured
        torch.save(checkpoint, recorded)
        code, err = run_export(["--ckpt_path", str(recorded), "--output_dir", str(tmp_path / "out"), "--overwrite"],
                               capsys)
        assert code == 0, err
        assert line in (tmp_path / "out" / "README.md").read_text()
    checkpoint["convmodel"]["class_path"] = "convmodel.models.renamed.BertPretraining"
    torch.save(checkpoint, recorded)
    code, err = run_export(["--ckpt_path", str(recorded), "--output_dir", str(tmp_path / "out2")], capsys)
    assert_one_error_line(code, err, "convmodel.models.renamed.BertPretraining", "cannot be imported")


def test_misspelled_flag_exports_nothing_and_names_the_flag(exported, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_export(["--ckpt_path", str(exported["bert-sop"][0]), "--output_dir", str(out), "--dtyp",
                            "float16"], capsys)
    assert_one_error_line(code, err, "unknown option --dtyp; did you mean --dtype?")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fill_mask_refuses_a_causal_lm_and_points_to_generate(exported, capsys):
    folder = str(exported["gpt2-clm"][1])
    with pytest.raises(SystemExit) as info:
        fill_mask_main(["--model_dir", folder, "--text", SENTENCE])
    assert_one_error_line(info.value.code, capsys.readouterr().err, "causal language model (GPT2LMHeadModel)",
                          f"trainer/generate.py --model_dir {folder}")


def card_python(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_card_generation_example_prints_the_prompt_and_its_continuation(exported, capsys):
    """The card's example, run as a user pastes it: prompt and continuation with the space between them.

    The text-generation pipeline decodes the continuation alone, and the sentencepiece decoder
    drops the space a decoded text starts with: `prompt + continuation` glues two words.
    """
    folder = exported["gpt2-clm"][1]
    code = card_python(folder)
    assert f'from_pretrained("{folder}")' in code and "pipeline" not in code
    prompt = "The meaning of life is"
    for seed in range(20):  # until the first new token starts a word, where the gluing shows
        torch.manual_seed(seed)
        namespace: dict = {}
        exec(code, namespace)
        printed = capsys.readouterr().out.rstrip("\n")
        tokenizer, output = namespace["tokenizer"], namespace["output"]
        prompt_length = len(tokenizer(prompt).input_ids)
        new_ids = output[0][prompt_length:].tolist()
        if not new_ids or not tokenizer.convert_ids_to_tokens(new_ids[0]).startswith("\u2581"):
            continue
        glued = prompt + tokenizer.decode(new_ids, skip_special_tokens=True)  # what the pipeline prints
        assert printed.startswith(prompt + " ") and printed != glued, printed
        assert printed == prompt + " " + tokenizer.decode(new_ids, skip_special_tokens=True)
        break
    else:
        pytest.fail("no seed gave a continuation that starts a new word")


def test_card_fill_mask_example_runs(exported, capsys):
    exec(card_python(exported["bert-mlm"][1]), {})
    printed = capsys.readouterr().out
    assert "'token_str'" in printed and "[MASK]" not in printed.split("'sequence'")[1]


def front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


def test_card_metadata_language_license_datasets(exported, tmp_path, capsys):
    assert not {"language", "license", "datasets"} & set(front_matter(exported["bert-sop"][1]))
    out = tmp_path / "out"
    code, err = run_export(["--ckpt_path", str(exported["bert-sop"][0]), "--output_dir", str(out), "--language", "en",
                            "--license", "apache-2.0", "--datasets", "wikitext,org/corpus"], capsys)
    assert code == 0, err
    meta = front_matter(out)
    assert (meta["language"], meta["license"], meta["datasets"]) == ("en", "apache-2.0", ["wikitext", "org/corpus"])
    assert meta["pipeline_tag"] == "fill-mask"
    code, err = run_export(["--ckpt_path", str(exported["bert-sop"][0]), "--output_dir", str(tmp_path / "bad"),
                            "--license", "my license"], capsys)
    assert_one_error_line(code, err, "--license 'my license' is not a license id")
    assert not (tmp_path / "bad").exists()
