"""Exact resume: a run stopped mid-epoch and resumed reads the same batches, masks included, as one that never stopped."""

import glob
import json
import os
import random

import pytest
import test_cli
import torch
from test_cli import TINY_BERT, data_args

from convmodel.cli import main
from convmodel.data import JsonlDataModule
from convmodel.data.prepare import prepare_train_data
from convmodel.data.shard_plan import batches_served
from convmodel.errors import UserError
from convmodel.run_summary import read_scalars
from convmodel.tokenization import train_tokenizer

workspace = test_cli.workspace  # test_cli's fixture: a tokenizer and mlm/clm shards, built once per module


@pytest.fixture(scope="module")
def shards(tmp_path_factory, text_corpus) -> dict[str, str]:
    """A tokenizer and mlm shards of uneven sizes (so workers run out at different batches)."""
    root = tmp_path_factory.mktemp("resume")
    tokenizer = train_tokenizer(text_corpus["train"], str(root / "tokenizer"), vocab_size=400)
    prepare_train_data(text_corpus["valid"], tokenizer, str(root / "mlm"), "mlm", 32, shard_size=37, progress=False)
    return {"tokenizer": tokenizer, "train": str(root / "mlm" / "*.jsonl")}


def data_module(shards: dict, num_workers: int, **options) -> JsonlDataModule:
    data = JsonlDataModule(shards["tokenizer"], train_files=shards["train"], objective="mlm", whole_word_mask=True,
                           batch_size=5, max_seq_len=32, num_workers=num_workers, shuffle_buffer_size=16, **options)
    data.setup("fit")
    return data


def passes(data: JsonlDataModule, epochs: int, stop_after: int | None = None) -> list[dict]:
    """Batches of `epochs` passes over the training loader, the last one left after `stop_after` batches."""
    batches = []
    loader = data.train_dataloader()
    for epoch in range(epochs):
        for k, batch in enumerate(loader):
            batches.append(batch)
            if stop_after is not None and epoch == epochs - 1 and k + 1 == stop_after:
                return batches
    return batches


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_epoch_continues_with_the_uninterrupted_batches(shards, num_workers):
    whole = passes(data_module(shards, num_workers), epochs=3)
    per_epoch = len(whole) // 3
    assert per_epoch >= 6, "too few batches to stop in the middle"
    # stop in the second epoch (after the first worker has run out, and before), then resume in a fresh module
    for stop in (3, per_epoch - 1):
        first = data_module(shards, num_workers)
        done = passes(first, epochs=2, stop_after=stop)
        state = first.state_dict()
        assert (state["epoch"], state["batches"]) == (1, stop)
        resumed = data_module(shards, num_workers)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps
        rest = passes(resumed, epochs=2)  # the rest of epoch 1, then all of epoch 2
        assert same(done + rest, whole)


def test_resume_with_other_loader_options_is_refused(shards):
    first = data_module(shards, 2)
    passes(first, epochs=1, stop_after=3)
    state = first.state_dict()
    other = data_module(shards, 0)
    other.load_state_dict(state)
    with pytest.raises(UserError, match=r"epoch 0 after its 3 batches.*data.num_workers was 2, now 0"):
        next(iter(other.train_dataloader()))
    at_epoch_end = dict(state, batches=0)  # an epoch boundary is the same position for any options
    other.load_state_dict(at_epoch_end)
    assert same(passes(other, epochs=1)[:2], passes(data_module(shards, 0), epochs=1)[:2])


def test_batches_served_matches_a_turn_by_turn_count():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(0, 30) for _ in range(rng.randint(1, 5))]
        batch_size = rng.randint(1, 7)
        left = [-(-n // batch_size) for n in sizes]
        turn, order = 0, []
        while any(left):  # the DataLoader: ask workers in turn, skip those that ran out
            if left[turn]:
                left[turn] -= 1
                order.append(turn)
            turn = (turn + 1) % len(sizes)
        for batches in range(len(order) + 1):
            expected = [order[:batches].count(w) for w in range(len(sizes))]
            got, next_worker = batches_served(sizes, batch_size, batches)
            assert got == expected
            if batches < len(order):  # the next batch: the first worker in turn from next_worker that has one left
                in_turn = [(next_worker + k) % len(sizes) for k in range(len(sizes))]
                assert order[batches] == next(w for w in in_turn if w in order[batches:])


# dropout draws from torch's global generator, which checkpoints do not hold: without it, a resumed
# run's steps depend on nothing but the weights, the optimizer state and the batches
NO_DROPOUT_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_bert_args(workspace, max_steps: int, total_steps: int = 8) -> list[str]:
    """bert-tiny.yaml shrunk: two worker processes, a shuffle buffer, a learning-rate schedule of total_steps."""
    return ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "bert-tiny.yaml"),
            *data_args(workspace, "mlm"), "--data.num_workers", "2", "--data.shuffle_buffer_size", "32",
            "--model.init_args.config", json.dumps(NO_DROPOUT_BERT), "--model.init_args.warmup_steps", "2",
            "--model.init_args.total_steps", str(total_steps), "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "100",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def run_cli(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, f"the CLI exited with {exc.code}"


def test_cli_resume_mid_epoch_trains_as_the_uninterrupted_run(workspace, tmp_path, monkeypatch):
    steps = 8
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    run_cli(tiny_bert_args(workspace, steps))
    monkeypatch.chdir(tmp_path / "split")
    run_cli(tiny_bert_args(workspace, steps // 2))
    run_cli([*tiny_bert_args(workspace, steps), "--ckpt_path", "last"])

    def losses(folder: str) -> dict[int, float]:
        points = {}
        for version in sorted(glob.glob(str(tmp_path / folder / "runs/bert-tiny/version_*"))):
            points.update(read_scalars(version, "train/loss"))
        return points

    whole, split = losses("whole"), losses("split")
    assert len(whole) == steps and sorted(split) == sorted(whole)
    for step in whole:  # the resumed half too: same batches, same masks
        assert split[step] == pytest.approx(whole[step], rel=1e-4), step

    def weights(folder: str) -> dict:
        ckpt = torch.load(tmp_path / folder / "runs/bert-tiny/checkpoints/last.ckpt", map_location="cpu",
                          weights_only=False)
        assert ckpt["global_step"] == steps
        return ckpt["state_dict"]

    a, b = weights("whole"), weights("split")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_cli_resume_mid_epoch_with_other_workers_is_one_error(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli(tiny_bert_args(workspace, 2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny_bert_args(workspace, 4), "--data.num_workers", "0", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert "cannot continue the checkpoint's epoch 0 after its 2 batches" in errors[0]
    assert "data.num_workers was 2, now 0" in errors[0]
