"""val/unigram_baseline, the val/loss of a model that knows only token frequencies.

Hand-computed on tiny shards written here, checked against the targets the real collators
produce, and logged by a real fit next to val/loss, where show_metrics compares the two.
"""

import glob
import json
import math
import re
import shutil

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from convmodel.data import JsonlDataModule, prepare_train_data
from convmodel.data.unigram_baseline import UnigramBaseline, unigram_baseline
from convmodel.errors import UserError
from convmodel.models import BertPretraining
from convmodel.run_summary import read_scalars, summarize

# hand-made shards use a vocabulary of 10 ids, 0-4 special as in our tokenizers: pad unk cls sep mask
VOCAB = 10
SPECIAL = [0, 1, 2, 3, 4]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


def write_shard(path, records: list[list[int]], sop: bool = False) -> str:
    """One JSONL shard; with `sop`, each record gets the sentence-order fields."""
    with open(path, "w") as f:
        for ids in records:
            record = {"input_ids": ids}
            if sop:  # [CLS] A [SEP] is segment 0, B [SEP] segment 1 (the layout prepare writes)
                junction = ids.index(3) + 1 if 3 in ids[:-1] else len(ids)
                record |= {"token_type_ids": [0] * junction + [1] * (len(ids) - junction), "sentence_order_label": 0}
            f.write(json.dumps(record) + "\n")
    return str(path)


def baseline(tmp_path, train: list[list[list[int]]], val: list[list[int]], objective: str = "mlm",
             max_seq_len: int = 64, **kwargs) -> UnigramBaseline | None:
    """unigram_baseline over shards written from `train` (one record list per file) and `val`."""
    sop = objective == "sop"
    train_files = [write_shard(tmp_path / f"train-{i}.jsonl", records, sop) for i, records in enumerate(train)]
    val_files = [write_shard(tmp_path / "val.jsonl", val, sop)]
    end = None if objective == "clm" else 3
    return unigram_baseline(train_files, val_files, objective, VOCAB, SPECIAL, max_seq_len, end, **kwargs)


@pytest.mark.parametrize("objective", ["mlm", "sop"])
def test_masked_lm_baseline_by_hand(tmp_path, objective):
    # train targets 5 5 6 7 ([UNK] 1 and [CLS]/[SEP] are never masked); 5 countable ids (5-9),
    # add 0.5 to each: p = (count + 0.5) / 6.5
    if objective == "mlm":
        train = [[[2, 5, 5, 6, 3], [2, 1, 7, 3]]]
        # val targets 5 8 ([MASK] 4 left out) and, cut to 5 tokens keeping [SEP], 6 6 6
        val = [[2, 5, 8, 4, 3], [2, 6, 6, 6, 6, 6, 3]]
        max_seq_len = 5
    else:  # the same targets in [CLS] A [SEP] B [SEP] pairs; the middle [SEP] is never a target either
        train = [[[2, 5, 3, 5, 6, 3], [2, 1, 3, 7, 3]]]
        # cut to 6 keeping A's tail and B's head: [CLS] 6 6 [SEP] 6 [SEP]
        val = [[2, 5, 3, 8, 4, 3], [2, 6, 6, 6, 3, 6, 6, 3]]
        max_seq_len = 6
    result = baseline(tmp_path, train, val, objective, max_seq_len=max_seq_len)
    cross_entropy = -(math.log(2.5) + math.log(0.5) + 3 * math.log(1.5) - 5 * math.log(6.5)) / 5
    order = math.log(2) if objective == "sop" else 0.0  # a model that knows no order guesses it
    assert result.cross_entropy == pytest.approx(cross_entropy, rel=1e-12)
    assert result.loss == pytest.approx(cross_entropy + order, rel=1e-12)
    assert (result.train_tokens, result.val_tokens) == (4, 5)


def test_causal_lm_baseline_by_hand(tmp_path):
    # every token after a record's first is predicted, special ones too: train targets 6 6 8 over
    # the whole vocabulary of 10, p = (count + 0.5) / 8
    train = [[[5, 6, 6], [7, 8]]]
    # val targets 6 1, and 8 8 from the record cut to 3 tokens (no end token is kept for clm)
    val = [[9, 6, 1], [5, 8, 8, 8, 8]]
    result = baseline(tmp_path, train, val, "clm", max_seq_len=3)
    cross_entropy = -(math.log(2.5) + math.log(0.5) + 2 * math.log(1.5) - 4 * math.log(8)) / 4
    assert result.loss == pytest.approx(cross_entropy, rel=1e-12)
    assert result.cross_entropy == result.loss
    assert (result.train_tokens, result.val_tokens) == (3, 4)


def test_training_tokens_are_capped_in_file_order(tmp_path):
    train = [[[2, 5, 5, 3]], [[2, 6, 6, 6, 3], [2, 7, 3]]]
    val = [[2, 7, 3]]
    # the first 3 targets: 5 5 from the first file and one 6 from the second; 7 is unseen
    capped = baseline(tmp_path, train, val, max_train_tokens=3)
    assert capped.train_tokens == 3
    assert capped.loss == pytest.approx(math.log(5.5 / 0.5), rel=1e-12)
    whole = baseline(tmp_path, train, val, max_train_tokens=100)
    assert whole.train_tokens == 6
    assert whole.loss == pytest.approx(math.log(8.5 / 1.5), rel=1e-12)


def test_validation_without_targets_has_no_baseline(tmp_path):
    assert baseline(tmp_path, [[[2, 5, 3]]], [[2, 3], [2, 1, 3]]) is None


def test_shards_of_another_objective_name_the_file(tmp_path):
    train_file = write_shard(tmp_path / "train.jsonl", [[2, 5, 6, 3]])  # no sentence-order fields
    with pytest.raises(UserError, match=r"train\.jsonl:1: record has no 'token_type_ids'"):
        unigram_baseline([train_file], [train_file], "sop", VOCAB, SPECIAL, 64, 3)


@pytest.fixture(scope="module")
def shards(text_corpus, tokenizer_dir, tmp_path_factory) -> dict:
    """Real shards for every objective from the session corpus: {objective: {"train"|"valid": glob}}."""
    root = tmp_path_factory.mktemp("baseline-shards")
    paths: dict = {}
    for objective in ("mlm", "sop", "clm"):
        for split in ("train", "valid"):
            out = root / objective / split
            prepare_train_data(text_corpus[split], tokenizer_dir, str(out), objective=objective, max_seq_len=64,
                               num_workers=1, progress=False)
            paths.setdefault(objective, {})[split] = f"{out}/part-*.jsonl"
    return paths


def datamodule(tokenizer_dir, shards, objective: str = "mlm", **kwargs) -> JsonlDataModule:
    options = dict(train_files=shards[objective]["train"], val_files=shards[objective]["valid"], objective=objective,
                   max_seq_len=64, batch_size=8, shuffle_buffer_size=0) | kwargs
    return JsonlDataModule(tokenizer_dir, **options)


def label_counts(loader, objective: str, vocab_size: int) -> np.ndarray:
    """How often each id is a target in the loader's batches, every maskable token masked for mlm/sop."""
    if objective != "clm":
        loader.collate_fn.mlm_probability = 1.0  # the real collator, choosing every token it may mask
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in loader:
        labels = batch["labels"][:, 1:] if objective == "clm" else batch["labels"]  # gpt2 predicts t + 1
        counts += np.bincount(labels[labels != -100].numpy(), minlength=vocab_size)
    return counts


@pytest.mark.parametrize("objective", ["mlm", "sop", "clm"])
def test_datamodule_baseline_scores_the_collators_targets(tokenizer_dir, shards, objective):
    # shards of 64 tokens read at 32: the stream's cut applies to the baseline as to the batches
    dm = datamodule(tokenizer_dir, shards, objective, max_seq_len=32)
    vocab_size = len(dm.tokenizer)
    train = label_counts(dm.train_dataloader(), objective, vocab_size)
    val = label_counts(dm.val_dataloader(), objective, vocab_size)
    targets = vocab_size if objective == "clm" else vocab_size - int(dm.val_dataloader().collate_fn.special.sum())
    probs = (train + 0.5) / (train.sum() + 0.5 * targets)
    expected = -(val * np.log(probs)).sum() / val.sum() + (math.log(2) if objective == "sop" else 0.0)
    assert dm.unigram_baseline() == pytest.approx(expected, rel=1e-9)


def test_datamodule_baseline_is_cached_capped_and_optional(tokenizer_dir, shards, tmp_path):
    val_file = tmp_path / "valid.jsonl"
    shutil.copy(sorted(glob.glob(shards["mlm"]["valid"]))[0], val_file)
    dm = datamodule(tokenizer_dir, shards, val_files=str(val_file))
    first = dm.unigram_baseline()
    val_file.write_text(val_file.read_text().splitlines()[0] + "\n")  # one record left: another baseline
    assert dm.unigram_baseline() == first  # read once per run
    assert datamodule(tokenizer_dir, shards, val_files=str(val_file)).unigram_baseline() != first
    capped = datamodule(tokenizer_dir, shards, baseline_train_tokens=50).unigram_baseline()
    assert capped != pytest.approx(datamodule(tokenizer_dir, shards).unigram_baseline(), abs=1e-3)
    assert datamodule(tokenizer_dir, shards, baseline_train_tokens=0).unigram_baseline() is None
    assert datamodule(tokenizer_dir, shards, val_files=None).unigram_baseline() is None
    # `validate` runs without the training shards: no baseline then, and a warning naming the option
    without_train = datamodule(tokenizer_dir, shards, train_files=str(tmp_path / "gone/*.jsonl"))
    with pytest.warns(UserWarning, match="no val/unigram_baseline: data.train_files"):
        assert without_train.unigram_baseline() is None
    with pytest.raises(UserError, match="data.baseline_train_tokens must be an integer >= 0"):
        datamodule(tokenizer_dir, shards, baseline_train_tokens=-1)


def test_fit_logs_the_baseline_beside_val_loss_and_show_metrics_compares(tokenizer_dir, shards, tmp_path, capsys):
    pl.seed_everything(0)
    dm = datamodule(tokenizer_dir, shards)
    module = BertPretraining(tokenizer_dir, config=TINY_BERT, warmup_steps=1)
    logger = TensorBoardLogger(str(tmp_path), name="", version=0)
    trainer = pl.Trainer(accelerator="cpu", logger=logger, max_steps=4, val_check_interval=2, limit_val_batches=3,
                         num_sanity_val_steps=-1, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, dm)
    logger.experiment.flush()
    losses = read_scalars(logger.log_dir, "val/loss")
    baselines = read_scalars(logger.log_dir, "val/unigram_baseline")
    assert [step for step, _ in baselines] == [step for step, _ in losses] and baselines[0][0] == 0  # sanity check
    assert all(value == pytest.approx(dm.unigram_baseline(), rel=1e-6) for _, value in baselines)

    capsys.readouterr()
    summarize(str(tmp_path))
    out = capsys.readouterr().out
    (last_step, last), base = losses[-1], baselines[-1][1]
    assert last > base  # 4 steps learn less than the frequencies (measured: val/loss 6.85, baseline 5.42)
    for step, value in losses:
        assert f"step {step:>6}: {value:.4f}  ({abs(base - value):.4f} nats above the baseline {base:.4f})" in out
    assert (f"val/loss {last:.2f} at step {last_step}: {last - base:.2f} nats above the frequency-only baseline "
            f"{base:.2f}") in out

    with pytest.raises(UserError, match=re.escape(f"{last - base:.4f} nats above the frequency-only baseline")):
        summarize(str(tmp_path), min_below_baseline=0.5)
    gap = base - last  # negative: a threshold below it lets the run pass
    with pytest.raises(UserError, match="less than --min_below_baseline"):
        summarize(str(tmp_path), min_below_baseline=gap + 0.01)
    summarize(str(tmp_path), min_below_baseline=gap - 0.01)
