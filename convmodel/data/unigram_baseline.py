"""The val/loss of a model that knows only token frequencies: the bar a pretrained model must clear.

A language model that has learned nothing about context can still reach the unigram
cross-entropy of the data by predicting every target from its frequency alone. A falling
val/loss curve does not say whether the model got past that point; this number does. It is
the cross-entropy of the validation shards' targets under the training shards' token
frequencies, with the same targets the models' val/loss averages over:

- mlm/sop: the tokens the collator may mask, i.e. all but the special tokens
  (`tokenizer.all_special_ids` and the pad id, as `MaskedLmCollator` excludes them). The masks
  pick each of those tokens with the same probability (also with whole-word masking), so the
  expected loss of a frequency-only model over the masked tokens is its loss over all of them.
  For sop val/loss also holds the sentence-order loss; a model that knows nothing of order
  guesses it at 50/50, a loss of ln 2, so the sop baseline is the unigram cross-entropy + ln 2.
- clm: every token of a record after its first (`Gpt2Pretraining` predicts token t + 1 from
  the tokens up to t; the first is never a target).

Records are read by `JsonlStream`, so they are validated and cut at max_seq_len exactly as the
training and validation batches are. The estimate from the training counts is smoothed by
adding `smoothing` (default 0.5, the Krichevsky-Trofimov estimator; add-one flattens a small
corpus's frequencies more) to the count of every id that can be a target (mlm/sop: the
non-special ids; clm: the whole vocabulary), so a validation token never seen in training
costs a finite loss. Training is read in file order only up to `max_train_tokens` targets: the
frequencies of a few million tokens are already close to those of the whole corpus, and a
large corpus should not cost a full pass before the first validation. The validation shards
are read whole, like a validation epoch (trainer.limit_val_batches shortens the epoch, not this).

It is an expectation: val/loss averages over the ~15% of tokens the fixed validation masks
chose, so even a frequency-only model lands a little above or below it.
"""

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from convmodel.data.jsonl_stream import JsonlStream
from convmodel.data.prepare import OBJECTIVES

DEFAULT_MAX_TRAIN_TOKENS = 10_000_000
DEFAULT_SMOOTHING = 0.5
_BLOCK_TOKENS = 1 << 20  # targets gathered before each bincount: bounded memory, few numpy calls


class UnigramBaseline(NamedTuple):
    """The baseline and what it was computed from.

    loss: what val/loss of a frequency-only model is expected to be (for sop including ln 2).
    cross_entropy: the unigram cross-entropy alone, nats per target token.
    train_tokens: training targets counted (at most max_train_tokens).
    val_tokens: validation targets scored.
    """

    loss: float
    cross_entropy: float
    train_tokens: int
    val_tokens: int


def _targets(ids: list[int], objective: str, countable: np.ndarray) -> np.ndarray:
    """The ids of one record that the objective's loss predicts, in order."""
    tokens = np.asarray(ids, dtype=np.int64)
    if objective == "clm":
        return tokens[1:]
    return tokens[countable[tokens]]


def count_targets(
    stream: Iterable[dict], objective: str, countable: np.ndarray, limit: int | None = None
) -> np.ndarray:
    """Int64 counts [vocab] of the targets of `stream`'s records; with `limit`, of its first `limit` targets."""
    counts = np.zeros(len(countable), dtype=np.int64)
    block: list[np.ndarray] = []
    in_block = total = 0
    for record in stream:
        targets = _targets(record["input_ids"], objective, countable)
        if limit is not None and total + len(targets) > limit:
            targets = targets[: limit - total]
        block.append(targets)
        in_block += len(targets)
        total += len(targets)
        if in_block >= _BLOCK_TOKENS:
            counts += np.bincount(np.concatenate(block), minlength=len(counts))
            block, in_block = [], 0
        if limit is not None and total >= limit:
            break
    if block:
        counts += np.bincount(np.concatenate(block), minlength=len(counts))
    return counts


def unigram_baseline(
    train_files: Sequence[str],
    val_files: Sequence[str],
    objective: str,
    vocab_size: int,
    special_ids: Iterable[int],
    max_seq_len: int | None,
    end_token_id: int | None = None,
    max_train_tokens: int = DEFAULT_MAX_TRAIN_TOKENS,
    smoothing: float = DEFAULT_SMOOTHING,
) -> UnigramBaseline | None:
    """The frequency-only val/loss (see the module docstring); None when the validation shards have no target.

    Args:
        train_files: training shards, expanded and in the order the datamodule reads them.
        val_files: validation shards, read whole.
        objective: mlm, sop or clm: which tokens are targets, and whether ln 2 is added (sop).
        vocab_size: the tokenizer's size (len(tokenizer)); ids must be below it.
        special_ids: ids never masked (mlm/sop): the tokenizer's all_special_ids and pad id.
        max_seq_len: records are cut to this many tokens, as data.max_seq_len cuts them.
        end_token_id: a cut record ending with it keeps it last (mlm/sop: [SEP]), as the stream does.
        max_train_tokens: most training targets counted, the first ones in file order.
        smoothing: added to every countable id's training count.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if max_train_tokens < 1:
        raise ValueError(f"max_train_tokens must be >= 1, got {max_train_tokens}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (an unseen token would cost an infinite loss), got {smoothing}")
    countable = np.ones(vocab_size, dtype=bool)
    if objective != "clm":
        countable[[i for i in set(special_ids) if 0 <= i < vocab_size]] = False

    def stream(files: Sequence[str]) -> JsonlStream:
        # rank 0 of 1 reads every line also inside a DDP job: each rank computes the same number
        return JsonlStream(
            files,
            max_seq_len=max_seq_len,
            rank=0,
            world_size=1,
            required_fields=("input_ids", "token_type_ids", "sentence_order_label")
            if objective == "sop"
            else ("input_ids",),
            end_token_id=end_token_id,
            vocab_size=vocab_size,
        )

    val_counts = count_targets(stream(val_files), objective, countable)
    val_tokens = int(val_counts.sum())
    if val_tokens == 0:
        return None
    train_counts = count_targets(stream(train_files), objective, countable, limit=max_train_tokens)
    train_tokens = int(train_counts.sum())
    smoothed = train_counts[countable] + smoothing
    log_probs = np.log(smoothed) - math.log(train_tokens + smoothing * int(countable.sum()))
    cross_entropy = float(-(val_counts[countable] * log_probs).sum() / val_tokens)
    loss = cross_entropy + (math.log(2.0) if objective == "sop" else 0.0)
    return UnigramBaseline(loss, cross_entropy, train_tokens, val_tokens)
