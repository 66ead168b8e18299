"""Runs as a new user makes them: twice into one folder, resumed, interrupted, pointed at bad checkpoints.

Real tiny runs through convmodel.cli.main (and trainer.py in a subprocess for signals), in tmp
folders, with the shipped configs shrunk by test_cli's helpers.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_cli
import torch
from test_cli import REPO, TINY_BERT, global_step, tiny_run_args
from transformers import BertConfig, GPT2Config

from convmodel.cli import main
from convmodel.errors import UserError
from convmodel.export import export_model
from convmodel.models.base import make_hf_config
from convmodel.run_summary import latest_version_dir, read_scalars, summarize

CKPT = "runs/bert-tiny/checkpoints"
workspace = test_cli.workspace  # test_cli's fixture: a tokenizer and mlm/clm shards, built once per module


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """main(args) -> (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The `error:` line, after checking it is the only one and that no traceback came with it."""
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


def test_second_fresh_run_is_refused_and_each_run_resolves_its_own_last(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = tiny_run_args(workspace, "bert-tiny.yaml", 2)
    code, out, _ = run(first, capsys)
    assert code == 0 and global_step(tmp_path / CKPT / "last.ckpt") == 2
    # the summary says where everything is and what to run next
    assert "[convmodel] fit finished at step 2 of 2" in out
    assert "val/loss" in out and "val/unigram_baseline" in out
    assert f"checkpoint:  {CKPT}/last.ckpt" in out and "tensorboard --logdir runs/bert-tiny" in out
    assert "version_0/config.yaml" in out and "test --config" in out and "export_model.py --ckpt_path" in out

    # the same command again: refused in one line that says what to do, nothing written
    code, _, err = run(tiny_run_args(workspace, "bert-tiny.yaml", 3), capsys)
    line = one_error_line(err)
    assert code == 2 and "already holds checkpoints" in line and "--ckpt_path last" in line
    assert global_step(tmp_path / CKPT / "last.ckpt") == 2

    # another logger folder takes its checkpoints with it
    other = [*tiny_run_args(workspace, "bert-tiny.yaml", 3), "--trainer.logger.init_args.save_dir", "runs/other"]
    assert run(other, capsys)[0] == 0
    assert global_step(tmp_path / "runs/other/checkpoints/last.ckpt") == 3
    assert global_step(tmp_path / CKPT / "last.ckpt") == 2

    # `--ckpt_path last` resolves inside each run's own folder
    code, _, err = run([*first, "--ckpt_path", "last"], capsys)
    assert code == 0 and "resuming at step 2 of 2 (trainer.max_steps): nothing to do; raise --trainer.max_steps" in err
    code, out, _ = run(["test", *other, "--ckpt_path", "last"], capsys)
    assert code == 0 and "test/loss" in out

    # resuming rewrites last.ckpt itself (no last-v1.ckpt beside it)
    code, out, _ = run([*tiny_run_args(workspace, "bert-tiny.yaml", 4), "--ckpt_path", "last"], capsys)
    assert code == 0 and "resuming at step 2 of 4" in out
    assert global_step(tmp_path / CKPT / "last.ckpt") == 4
    assert sorted(p.name for p in (tmp_path / CKPT).glob("last*")) == ["last.ckpt"]

    # an explicit replacement starts over in the same folder
    code, _, _ = run([*tiny_run_args(workspace, "bert-tiny.yaml", 3), "--overwrite_checkpoints", "true"], capsys)
    assert code == 0 and global_step(tmp_path / CKPT / "last.ckpt") == 3


def test_a_schedule_that_has_ended_is_an_error_not_lr_zero(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 2), "--model.init_args.total_steps", "2"]
    assert run(args, capsys)[0] == 0
    code, _, err = run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"], capsys)
    line = one_error_line(err)
    assert code == 2 and "the linear schedule ended at step 2" in line and "model.init_args.total_steps" in line


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory) -> Path:
    """A folder with one finished 2-step bert-tiny run in runs/bert-tiny."""
    root = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(tiny_run_args(workspace, "bert-tiny.yaml", 2))
    finally:
        os.chdir(cwd)
    return root


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    text = folder / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = folder / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    return {"missing": folder / "nowhere.ckpt", "text": text, "truncated": truncated, "foreign": foreign}


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("case", ["missing", "text", "truncated", "foreign"])
def test_a_bad_ckpt_path_is_one_error_line(workspace, trained, tmp_path, monkeypatch, capsys, subcommand, case):
    monkeypatch.chdir(trained)
    path = bad_checkpoints(tmp_path / "bad", trained / CKPT / "last.ckpt")[case]
    args = tiny_run_args(workspace, "bert-tiny.yaml", 3)
    code, _, err = run([subcommand, *args, "--ckpt_path", str(path)], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: --ckpt_path {path}") and "trainer.py" in line


def test_test_without_a_checkpoint_is_an_error_not_a_random_model(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = tiny_run_args(workspace, "bert-tiny.yaml", 2)
    code, out, err = run(["test", *args], capsys)
    assert code == 2 and "test needs --ckpt_path" in one_error_line(err) and "test/loss" not in out
    code, out, err = run(["test", *args, "--ckpt_path", "last"], capsys)
    line = one_error_line(err)
    assert code == 2 and "no checkpoint in" in line and "checkpoints" in line and "test/loss" not in out
    code, _, err = run(["validate", *args, "--ckpt_path", "last"], capsys)
    assert code == 2 and "nothing to validate" in one_error_line(err)
    code, _, err = run(["test", *args, "--ckpt_path", "best"], capsys)
    assert code == 2 and "does not know an earlier run's best checkpoint" in one_error_line(err)


def trainer_process(args: list[str], cwd: Path) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    # -X faulthandler: a SIGABRT makes it print every thread's stack (what a test that timed out shows)
    return subprocess.Popen([sys.executable, "-X", "faulthandler", str(REPO / "trainer" / "trainer.py"), *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def exit_output(process: subprocess.Popen, timeout: float) -> str:
    """The stderr of a process once it exited; past `timeout`, it fails with the stacks where it hung."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, err = process.communicate(timeout=60)
        pytest.fail(f"the trainer had not exited {timeout} s after the signal; its threads:\n{err[-8000:]}")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_last_ckpt_and_prints_the_resume_command(workspace, tmp_path, signum, status):
    started = tmp_path / "started"
    callbacks = [{"class_path": "convmodel.run_checkpoint.RunCheckpoint",
                  "init_args": {"every_n_train_steps": 100000}},  # no periodic checkpoint: only the signal's
                 {"class_path": "cli_probe.StepFile", "init_args": {"path": str(started), "after_steps": 2}}]
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 100000), "--trainer.callbacks", json.dumps(callbacks)]
    process = trainer_process(args, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signum)
        err = exit_output(process, 120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == status, err[-3000:]
    assert "Traceback" not in err
    last = tmp_path / CKPT / "last.ckpt"
    step = global_step(last)
    assert step >= 2 and f"stopped at step {step}; " in err and f"holds step {step}" in err
    resume = next(line for line in err.splitlines() if "resume with:" in line)
    assert "trainer.py fit --config" in resume and resume.endswith("--ckpt_path last")


def test_typed_architecture_overrides_on_the_command_line(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 1), "--model.init_args.config.num_hidden_layers", "2",
            "--model.init_args.config.hidden_dropout_prob", "0.0"]
    code, _, err = run(args, capsys)
    assert code == 0, err[-3000:]
    state = torch.load(tmp_path / CKPT / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    layers = {key.split(".layer.")[1].split(".")[0] for key in state if ".layer." in key}
    assert layers == {"0", "1"}  # TINY_BERT has 1 layer; the override made it 2
    assert TINY_BERT["num_hidden_layers"] == 1

    code, _, err = run([*tiny_run_args(workspace, "bert-tiny.yaml", 1), "--model.init_args.config.num_hidden_layers",
                        "two"], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith("error: model.init_args.config.num_hidden_layers: 'two' is not an int")


def test_make_hf_config_types_strings_for_every_family():
    from convmodel.models.lean_albert import LeanAlbertConfig

    gpt2 = make_hf_config(GPT2Config, {"n_layer": "3", "resid_pdrop": "0", "n_inner": "64", "hidden_size": "48"}, {})
    assert (gpt2.n_layer, gpt2.resid_pdrop, gpt2.n_inner, gpt2.n_embd) == (3, 0.0, 64, 48)
    assert isinstance(gpt2.resid_pdrop, float)
    bert = make_hf_config(BertConfig, {"hidden_act": "gelu", "layer_norm_eps": "1e-5", "use_cache": "false"}, {})
    assert (bert.hidden_act, bert.layer_norm_eps, bert.use_cache) == ("gelu", 1e-5, False)
    albert = make_hf_config(LeanAlbertConfig, {"num_hidden_layers": "2"}, {})
    assert albert.num_hidden_layers == 2
    with pytest.raises(UserError, match=r"model.init_args.config.use_cache: 'maybe' is not true or false"):
        make_hf_config(BertConfig, {"use_cache": "maybe"}, {})


def test_progress_bar_counts_steps_of_max_steps(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 3), "--trainer.enable_progress_bar", "true"]
    code, out, err = run([*args, "--trainer.limit_val_batches", "1.0"], capsys)  # streamed: length unknown
    assert code == 0, err[-3000:]
    assert "Training step" in out and "3/3" in out
    assert "Validation DataLoader 0: 5 batches [" in out and ": :" not in out  # a count, not `5/--`
    assert "Epoch 0" not in out and "/-" not in out
    # resumed mid-epoch (Lightning then skips on_train_epoch_start): still steps of max_steps
    code, out, err = run([*args, "--trainer.max_steps", "5", "--ckpt_path", "last"], capsys)
    assert code == 0, err[-3000:]
    assert "Training step" in out and "5/5" in out and "Training: " not in out


def test_last_ckpt_is_the_final_step_between_periodic_checkpoints(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    callbacks = [{"class_path": "convmodel.run_checkpoint.RunCheckpoint", "init_args": {"every_n_train_steps": 2}}]
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 3), "--trainer.callbacks", json.dumps(callbacks)]
    code, _, err = run(args, capsys)
    assert code == 0, err[-3000:]
    assert global_step(tmp_path / CKPT / "last.ckpt") == 3  # Lightning's ModelCheckpoint leaves step 2 there


def test_show_metrics_reads_every_version_of_a_resumed_and_tested_run(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = tiny_run_args(workspace, "bert-tiny.yaml", 2)
    assert run(args, capsys)[0] == 0
    assert run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"], capsys)[0] == 0
    assert run(["test", *args, "--ckpt_path", "last"], capsys)[0] == 0
    versions = sorted(p.name for p in (tmp_path / "runs/bert-tiny").glob("version_*"))
    assert versions == ["version_0", "version_1", "version_2"]  # fit, resume, test

    summarize("runs/bert-tiny")  # the newest version (the test) has no val/loss: read them all
    out = capsys.readouterr().out
    steps = [int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("  step ")]
    resumed = read_scalars("runs/bert-tiny/version_1", "val/loss")
    # before training, the first run's validation, the resumed run's
    assert len(steps) == 3 and steps[0] == 0 and steps[-1] == resumed[-1][0] > steps[1]
    assert "version_0, version_1, version_2" in out
    assert "checkpoint: runs/bert-tiny/checkpoints/last.ckpt" in out


def test_a_fresh_run_into_a_folder_with_only_logs_is_refused_and_overwrite_clears_them(
        workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_checkpoints = [*tiny_run_args(workspace, "bert-tiny.yaml", 2), "--trainer.callbacks", "[]",
                      "--trainer.enable_checkpointing", "false"]
    assert run(no_checkpoints, capsys)[0] == 0  # logs, no checkpoint: a crash before the first one looks the same
    args = tiny_run_args(workspace, "bert-tiny.yaml", 2)
    code, _, err = run(args, capsys)
    assert code == 2
    line = one_error_line(err)
    assert "already holds the logs of another run (version_0)" in line and "--overwrite_checkpoints true" in line

    code, out, err = run([*args, "--overwrite_checkpoints", "true"], capsys)
    assert code == 0, err[-3000:]
    assert "deleted 0 checkpoint(s) and 1 log version(s)" in out
    # only this run's logs remain, so show_metrics cannot mix the two
    assert [p.name for p in (tmp_path / "runs/bert-tiny").glob("version_*")] == ["version_1"]


@pytest.mark.parametrize("every_n_train_steps", [2, 300])
def test_the_model_card_reports_the_final_validation_of_the_exported_step(
        workspace, tmp_path, monkeypatch, capsys, every_n_train_steps):
    """last.ckpt is written after the final validation (or again after it), and says which step it measured."""
    monkeypatch.chdir(tmp_path)
    callbacks = [{"class_path": "convmodel.run_checkpoint.RunCheckpoint",
                  "init_args": {"every_n_train_steps": every_n_train_steps}}]
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 4), "--trainer.callbacks", json.dumps(callbacks)]
    code, _, err = run(args, capsys)
    assert code == 0, err[-3000:]
    val = read_scalars(latest_version_dir("runs/bert-tiny"), "val/loss")
    assert len(val) == 3  # before training, at steps 2 and 4
    export_model(f"{CKPT}/last.ckpt", "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"final validation loss: {val[-1][1]:.4f}" in card


def test_a_ctrl_c_while_lightning_closes_the_logger_stops_at_once(workspace, tmp_path, monkeypatch, capsys):
    """Lightning's handling of that Ctrl-C fails in turn (it finalizes the closed logger again): the user still
    gets one line and 130, and the run's last.ckpt, saved before, is whole."""
    monkeypatch.chdir(tmp_path)
    args = [*tiny_run_args(workspace, "bert-tiny.yaml", 2),
            "--trainer.logger.class_path", "late_ctrl_c.CtrlCWhileClosingLogger"]
    code, out, err = run(args, capsys)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "stopping at once (Ctrl-C)" in err, err[-3000:]
    assert "holds step 2" in err and "before training started" not in err, err[-3000:]
    assert global_step(tmp_path / CKPT / "last.ckpt") == 2
