"""The training command line, run as users run it: shipped YAML files, tiny models, real shards."""

import json
import os
import pydoc_data.topics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from convmodel.cli import main, readable_parse_error
from convmodel.data import prepare_train_data
from convmodel.run_summary import latest_version_dir, read_scalars
from convmodel.tokenization import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_GPT2 = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Text -> tokenizer -> mlm and clm shards, as `make demo` makes them, only smaller."""
    root = tmp_path_factory.mktemp("cli")
    paragraphs = [" ".join(p.split()) for text in pydoc_data.topics.topics.values() for p in text.split("\n\n")]
    documents = [p for p in paragraphs if len(p) > 200][:500]  # ~190 kB of English prose
    splits = {"train": documents[:400], "valid": documents[400:450], "test": documents[450:]}
    for split, docs in splits.items():
        # one sentence per line, a blank line between documents
        (root / f"{split}.txt").write_text("\n\n".join(doc.replace(". ", ".\n") for doc in docs) + "\n")
    train_tokenizer(str(root / "train.txt"), str(root / "tokenizer"), vocab_size=400)
    train_tokenizer(str(root / "train.txt"), str(root / "other-tokenizer"), vocab_size=500)
    for objective in ("mlm", "clm"):
        for split in splits:
            prepare_train_data(str(root / f"{split}.txt"), str(root / "tokenizer"),
                               str(root / "shards" / objective / split), objective=objective, max_seq_len=64,
                               num_workers=1, progress=False)
    return root


def data_args(workspace: Path, objective: str) -> list[str]:
    shards = workspace / "shards" / objective
    return ["--data.tokenizer", str(workspace / "tokenizer"),
            "--data.train_files", f"{shards}/train/part-*.jsonl",
            "--data.val_files", f"{shards}/valid/part-*.jsonl",
            "--data.test_files", f"{shards}/test/part-*.jsonl",
            "--data.max_seq_len", "64", "--data.batch_size", "8"]


def tiny_run_args(workspace: Path, config: str, max_steps: int) -> list[str]:
    """The shipped config, shrunk: tiny model, test shards, a few steps."""
    objective, model = ("clm", TINY_GPT2) if config.startswith("gpt2") else ("mlm", TINY_BERT)
    return ["--config", str(CONFIGS / config), *data_args(workspace, objective),
            "--model.init_args.config", json.dumps(model), "--model.init_args.warmup_steps", "2",
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def run_trainer_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(REPO / "trainer" / "trainer.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def shipped_configs() -> list[Path]:
    """Every YAML in configs/ that trainer.py reads (the ones with a model section; configs/finetune/ is
    trainer/finetune.py's, tests/test_finetune_configs.py parses those)."""
    paths = sorted(p for p in CONFIGS.rglob("*.yaml") if "finetune" not in p.relative_to(CONFIGS).parts)
    return [p for p in paths if "model" in (yaml.safe_load(p.read_text()) or {})]


def test_configs_directory_has_the_four_model_configs():
    names = {p.name for p in shipped_configs()}
    assert {"bert-tiny.yaml", "gpt2-tiny.yaml", "bert-base.yaml", "gpt2-small.yaml"} <= names


@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_parses_through_the_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("convmodel.")
    assert printed["data"]["tokenizer"] and printed["trainer"]["max_steps"] > 0


def test_print_config_round_trips_and_trains(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([*tiny_run_args(workspace, "bert-tiny.yaml", 2), "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["--config", "printed.yaml", "--print_config"])
    assert capsys.readouterr().out == printed

    main(["fit", "--config", "printed.yaml"])
    assert global_step(tmp_path / "runs/bert-tiny/checkpoints/last.ckpt") == 2
    # the config saved beside the logs is the one that ran
    saved = yaml.safe_load((tmp_path / "runs/bert-tiny/version_0/config.yaml").read_text())
    assert saved["model"]["init_args"]["config"] == TINY_BERT


def test_trainer_script_fits_then_tests_and_resumes_from_last(workspace, tmp_path, monkeypatch, capsys):
    args = tiny_run_args(workspace, "bert-tiny.yaml", 4)
    result = run_trainer_script(args, tmp_path)  # no subcommand: fit
    monkeypatch.chdir(tmp_path)  # the rest runs in this process, from the same directory
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "runs/bert-tiny/checkpoints/last.ckpt"
    assert global_step(last) == 4
    run_dir = latest_version_dir(str(tmp_path / "runs/bert-tiny"))
    val_steps = [step for step, _ in read_scalars(run_dir, "val/loss")]
    assert val_steps[0] == 0 and len(val_steps) == 3  # before training, then every 2 steps

    # test with the YAML's callbacks (ModelCheckpoint) and the last checkpoint
    main(["test", *args, "--ckpt_path", "last"])
    assert "test/loss" in capsys.readouterr().out

    # a longer run continues from step 4, not from 0
    main(["fit", *[a if a != "4" else "6" for a in args], "--ckpt_path", "last"])
    assert global_step(last) == 6
    resumed = latest_version_dir(str(tmp_path / "runs/bert-tiny"))
    assert resumed != run_dir and min(step for step, _ in read_scalars(resumed, "train/loss")) >= 4

    # resuming with another tokenizer is one line saying what to do
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[a if a != "4" else "8" for a in args], "--data.tokenizer", str(workspace / "other-tokenizer"),
              "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # the shards' manifest says which tokenizer made them: that is found before the checkpoint is read
    assert "error: data.train_files:" in err and "holds shards made with another tokenizer" in err
    assert "Traceback" not in err and err.count("error:") == 1


def test_gpt2_tiny_config_trains(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(tiny_run_args(workspace, "gpt2-tiny.yaml", 3))
    assert global_step(tmp_path / "runs/gpt2-tiny/checkpoints/last.ckpt") == 3
    run_dir = latest_version_dir(str(tmp_path / "runs/gpt2-tiny"))
    assert read_scalars(run_dir, "val/ppl") and read_scalars(run_dir, "train/tokens_per_s")


def test_missing_shards_end_in_one_error_line_and_exit_2(workspace, tmp_path):
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 2), "--data.train_files", str(tmp_path / "none/*.jsonl")]
    result = run_trainer_script(args, tmp_path)
    assert result.returncode == 2
    assert "error: data.train_files" in result.stderr and "none/*.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_typo_names_the_option_without_usage_dump(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIGS / "bert-tiny.yaml"), "--model.init_args.lrr", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model (convmodel.models.BertPretraining): Option 'lrr' is not accepted")
    assert "usage:" not in err


def test_readable_parse_error_leaves_other_messages_alone():
    assert readable_parse_error('Key "data.x" is not expected') == 'Key "data.x" is not expected'
