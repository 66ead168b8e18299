"""JsonlDataModule: option checks, batches per objective, epochs through a real Lightning Trainer."""

import glob
import inspect
import os
import random
import shutil
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch

from convmodel.data import JsonlDataModule
from convmodel.data.prepare import prepare_train_data
from convmodel.data.shard_checks import SplitShards, check_enough
from convmodel.errors import UserError
from convmodel.tokenization import train_tokenizer

SYLLABLES = ["ka", "to", "mi", "ra", "ne", "su", "lo", "pe", "di", "ga", "vo", "xu", "ba", "che", "fi", "ju", "ze", "ho"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two tokenizers and shards for each objective: {"tokenizer": dir, "other_tokenizer": dir, "mlm": dir, ...}."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    docs = [
        [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(rng.randint(1, 6))]
        for _ in range(60)
    ]
    (root / "text.txt").write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    paths = {"tokenizer": train_tokenizer(str(root / "text.txt"), str(root / "tokenizer"), vocab_size=400),
             "other_tokenizer": train_tokenizer(str(root / "text.txt"), str(root / "other"), vocab_size=420)}
    for objective in ("mlm", "sop", "clm"):
        out = root / objective
        prepare_train_data(
            str(root / "text.txt"), paths["tokenizer"], str(out), objective, 32, shard_size=40, progress=False
        )
        paths[objective] = str(out)
    return paths


def unmasked(batch: dict) -> list[tuple[int, ...]]:
    """The records of a batch as they were in the shards, padding removed."""
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    return [tuple(row[mask.bool()].tolist()) for row, mask in zip(ids, batch["attention_mask"])]


def read_shards(directory: str) -> list[tuple[int, ...]]:
    import json

    return [tuple(json.loads(line)["input_ids"]) for p in sorted(glob.glob(f"{directory}/*.jsonl")) for line in open(p)]


def test_every_argument_is_documented():
    doc = inspect.getdoc(JsonlDataModule)
    for name in inspect.signature(JsonlDataModule).parameters:
        assert f"\n    {name}: " in doc, f"{name} has no line in the Args section (jsonargparse shows it in --help)"


def test_options_are_checked_together():
    with pytest.raises(UserError) as info:
        JsonlDataModule(tokenizer="", batch_size=0, mlm_probability=1.5, num_workers=-1, max_seq_len=2)
    message = str(info.value)
    for expected in (
        "data.tokenizer is required",
        "data.batch_size must be > 0",
        "data.mlm_probability",
        "data.num_workers",
        "data.max_seq_len must be >= 3",
    ):
        assert expected in message
    with pytest.raises(UserError, match="data.whole_word_mask applies to mlm/sop only"):
        JsonlDataModule(tokenizer="tok", objective="clm", whole_word_mask=True)


def test_missing_files_and_tokenizer_name_the_option(tmp_path, corpus):
    with pytest.raises(UserError, match=r"data.train_files .*nothing/\*.jsonl: no such file. Make shards with trainer/prepare_train_data.py"):
        JsonlDataModule(corpus["tokenizer"], train_files=str(tmp_path / "nothing/*.jsonl")).setup("fit")
    with pytest.raises(UserError, match="data.train_files is required"):
        JsonlDataModule(corpus["tokenizer"], val_files=corpus["mlm"] + "/*.jsonl").setup("fit")
    with pytest.raises(UserError, match="data.test_files is required"):
        JsonlDataModule(corpus["tokenizer"]).setup("test")
    with pytest.raises(UserError, match="does not exist"):
        JsonlDataModule(str(tmp_path / "no-tokenizer"), train_files=corpus["mlm"] + "/*.jsonl").setup("fit")


@pytest.mark.parametrize("objective", ["mlm", "sop", "clm"])
def test_batches_for_each_objective(corpus, objective):
    data = JsonlDataModule(
        corpus["tokenizer"], train_files=corpus[objective] + "/*.jsonl", objective=objective, batch_size=4, max_seq_len=32
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    keys = {"input_ids", "attention_mask", "labels"} | ({"token_type_ids", "sentence_order_label"} if objective == "sop" else set())
    assert set(batch) == keys
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 32
    assert all(t.dtype == torch.long for t in batch.values())
    if objective == "clm":
        assert torch.equal(batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    else:
        assert (batch["labels"] != -100).any() and (batch["input_ids"][:, 0] == data.tokenizer.cls_token_id).all()
    if objective == "sop":
        assert batch["sentence_order_label"].shape == (4,)


def test_shards_of_another_objective_are_reported(corpus, tmp_path):
    # with manifest.json: at setup, naming the option
    data = JsonlDataModule(corpus["tokenizer"], train_files=corpus["mlm"] + "/*.jsonl", objective="sop")
    with pytest.raises(UserError, match=r"data.train_files: .*mlm holds shards made for objective 'mlm' .*"
                                        r"set data.objective: mlm, or .*--objective sop"):
        data.setup("fit")
    # without: at the first record, still at setup (its first records are read to measure cutting)
    for shard in glob.glob(corpus["mlm"] + "/*.jsonl"):
        shutil.copy(shard, tmp_path)
    data = JsonlDataModule(corpus["tokenizer"], train_files=str(tmp_path / "*.jsonl"), objective="sop")
    with pytest.raises(UserError, match=r"part-00000.jsonl:1: record has no 'token_type_ids'"):
        data.setup("fit")


def test_shards_of_another_tokenizer_are_refused(corpus):
    data = JsonlDataModule(corpus["other_tokenizer"], train_files=corpus["mlm"] + "/*.jsonl")
    with pytest.raises(UserError, match=r"made with another tokenizer .*than data.tokenizer .*set data.tokenizer"):
        data.setup("fit")


def test_counts_come_from_the_manifest_or_one_counting_pass(corpus, tmp_path, capsys):
    shards = corpus["mlm"] + "/*.jsonl"
    with_manifest = JsonlDataModule(corpus["tokenizer"], train_files=shards, max_seq_len=32)
    with_manifest.setup("fit")
    assert "counting records" not in capsys.readouterr().err
    expected = [len(open(p).readlines()) for p in sorted(glob.glob(shards))]
    assert with_manifest._split_shards("train").counts == expected

    for shard in sorted(glob.glob(shards)):
        shutil.copy(shard, tmp_path)
    shutil.copy(os.path.join(corpus["mlm"], "manifest.json"), tmp_path)
    with open(tmp_path / "part-00000.jsonl", "a") as f:  # changed after the manifest was written
        f.write(open(tmp_path / "part-00000.jsonl").readline())
    counted = JsonlDataModule(corpus["tokenizer"], train_files=str(tmp_path / "*.jsonl"), max_seq_len=32)
    counted.setup("fit")
    err = capsys.readouterr().err
    # only the changed shard is read; the manifest still vouches for the others
    assert err.count("[convmodel] counting records in 1 shard (no manifest.json) for data.train_files") == 1
    assert counted._split_shards("train").counts == [expected[0] + 1, *expected[1:]]


def test_cutting_mlm_records_reports_the_share_dropped(corpus, capsys):
    data = JsonlDataModule(corpus["tokenizer"], train_files=corpus["mlm"] + "/*.jsonl", max_seq_len=16)
    data.setup("fit")
    records = read_shards(corpus["mlm"])
    dropped = sum(max(0, len(r) - 16) for r in records) / sum(len(r) for r in records)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "cuts records" in line]
    assert line.startswith("[convmodel] warning: data.train_files: data.max_seq_len=16 cuts records of shards made "
                           f"for max_seq_len 32: {100 * dropped:.1f}% of the tokens of the first {len(records)} records")
    batch = next(iter(data.train_dataloader()))
    last = batch["attention_mask"].sum(1) - 1  # each record's last real token: a cut one keeps its [SEP]
    assert batch["input_ids"].shape[1] == 16
    assert (batch["input_ids"].gather(1, last[:, None]) == data.tokenizer.sep_token_id).all()


def test_long_sop_shards_are_cut_into_both_segments(corpus):
    data = JsonlDataModule(corpus["tokenizer"], train_files=corpus["sop"] + "/*.jsonl", objective="sop", max_seq_len=12,
                           batch_size=64, shuffle_buffer_size=0)
    data.setup("fit")
    for batch in data.train_dataloader():
        types, mask = batch["token_type_ids"], batch["attention_mask"].bool()
        assert batch["input_ids"].shape[1] <= 12
        assert ((types == 0) & mask).sum(1).min() >= 3 and ((types == 1) & mask).sum(1).min() >= 2  # [CLS] a [SEP], b [SEP]


def test_a_split_without_records_is_an_error_before_training(corpus, tmp_path):
    (tmp_path / "part-00000.jsonl").write_text("")
    data = JsonlDataModule(corpus["tokenizer"], train_files=corpus["mlm"] + "/*.jsonl", val_files=str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match=r"data.val_files: the shards hold no record \(.*part-00000.jsonl\)"):
        data.setup("fit")


def test_fewer_records_than_a_batch_per_reader_is_an_error_across_devices(tmp_path):
    shards = SplitShards("data.train_files", ["a.jsonl", "b.jsonl"], [10, 5], None)
    check_enough(shards, batch_size=4, readers=3, equal_counts=False)  # one device: short batches are fine
    check_enough(shards, batch_size=5, readers=3, equal_counts=True)
    with pytest.raises(UserError, match=r"data.train_files: 15 records are fewer than one batch for each of the 4 "
                                        r"readers .*data.batch_size=4 \(a.jsonl, b.jsonl\)"):
        check_enough(shards, batch_size=4, readers=4, equal_counts=True)


class Recorder(pl.LightningModule):
    """A tiny real model that also records what each epoch's batches contained."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.train_rows: dict[int, list] = {}
        self.train_labels: dict[int, list] = {}
        self.val_batches: dict[int, list] = {}

    def forward(self, batch):
        logits = self.head(self.embed(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def training_step(self, batch, batch_idx):
        rows = unmasked(batch)
        self.train_rows.setdefault(self.current_epoch, []).extend(rows)
        labels = self.train_labels.setdefault(self.current_epoch, {})
        for row, label in zip(rows, batch["labels"]):
            labels[row] = tuple(label.tolist())
        return self(batch)

    def validation_step(self, batch, batch_idx):
        self.val_batches.setdefault(self.current_epoch, []).append({k: v.clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_epochs_reshuffle_and_remask_while_validation_stays_fixed(corpus):
    shards = corpus["mlm"] + "/*.jsonl"
    data = JsonlDataModule(
        corpus["tokenizer"], train_files=shards, val_files=shards, batch_size=4, num_workers=2, shuffle_buffer_size=16
    )
    model = Recorder(vocab_size=400)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)

    records = Counter(read_shards(corpus["mlm"]))
    assert Counter(model.train_rows[0]) == records == Counter(model.train_rows[1])  # each record once per epoch
    assert model.train_rows[0] != model.train_rows[1], "the shuffle did not change with the epoch"
    remasked = sum(model.train_labels[0][r] != model.train_labels[1][r] for r in records)
    assert remasked > 0.5 * len(records), "training masks repeated across epochs"
    first, second = model.val_batches[0], model.val_batches[1]
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in a)
