"""Stream samples -> padded batches with labels, one collator per objective.

All ours, batched over [B, T] tensors. transformers' DataCollatorForLanguageModeling pads
through tokenizer.pad in Python; on a 32 x 128 batch it took ~2.5 ms where this training
collator takes ~0.3 ms (0.5 ms with whole-word masking):
- Masking follows BERT: mlm_probability of the tokens (or of the words, with whole-word
  masking) are chosen; of the chosen tokens 80% become [MASK], 10% a random id from the whole
  vocabulary, 10% stay. Special tokens and padding are never chosen. Whole-word masking keeps
  80/10/10 per token (transformers' turns the random and kept shares off) and finds words in
  token ids alone (see word_boundaries.py: sentencepiece's "▁", scripts without spaces, an
  optional per-record word_ids field).
- Seeding is ours. transformers' `seed` gives worker k the generator seed + k, the same on
  every DDP rank, and restarts it whenever workers are re-created (every epoch), so ranks would
  share masks and epochs would repeat them. A training batch draws from one generator seeded by
  (seed, epoch + 1, index of its first sample): samples are read once per epoch across the job,
  so no two batches share a seed. Validation/test masks are drawn per sample from (seed, 0,
  index) by a counter-based generator (SampleDraws): the same on every run and for any batch,
  batch size or worker count, without building a generator per sample.
"""

from collections.abc import Sequence

import numpy as np
import torch

from convmodel.data.word_boundaries import (
    bare_space_id,
    first_piece_of_word,
    padded_word_ids,
    word_start_table,
    word_starts,
)
from convmodel.errors import UserError

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest keep their id
MAX_WORD_PIECES = 8  # whole-word masking: a longer run of pieces is split (word_boundaries rule 5)


def mixed_seed(*parts: int) -> int:
    """A well-spread 64-bit seed from several integers (neighbouring inputs give unrelated seeds)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def generator_for(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mixed_seed(*parts))


def pad(sequences: Sequence[Sequence[int]] | Sequence[np.ndarray] | Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad to the longest sequence: LongTensor [B, T]. Lists, 1-D numpy arrays or tensors.

    Rows are copied into one preallocated numpy array: on 32 rows of ~115 ids that is ~80 µs for
    lists (torch.tensor over padded lists ~550 µs, row writes into a torch tensor ~780 µs) and
    ~15 µs for numpy arrays.
    """
    longest = max(len(s) for s in sequences)
    out = np.full((len(sequences), longest), value, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def attention_mask_for(samples: list[dict], length: int) -> torch.Tensor:
    """LongTensor [B, T]: 1 on the samples' tokens, 0 on the right padding (numpy: ~4x faster here)."""
    lengths = np.fromiter((len(s["input_ids"]) for s in samples), np.int64, len(samples))
    return torch.from_numpy((np.arange(length) < lengths[:, None]).astype(np.int64))


class BatchDraws:
    """A training batch's random numbers, from one torch generator (seeded by the caller)."""

    def __init__(self, generator: torch.Generator, shape: tuple[int, int]):
        self.generator = generator
        self.shape = shape

    def uniform(self) -> torch.Tensor:
        """FloatTensor [B, T] in [0, 1); each call draws new numbers."""
        return torch.rand(self.shape, generator=self.generator)

    def token_ids(self, where: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """LongTensor [where.sum()]: uniform ids in [0, vocab_size) for the True positions."""
        return torch.randint(vocab_size, (int(where.sum()),), generator=self.generator)


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
STREAM = 1 << 32  # counter offset between the draws of one sample (rows are shorter than this)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a uint64 array -> well-mixed uint64 (wraps, as it must)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SampleDraws:
    """Random numbers that depend only on (seed, sample index, draw, position): fixed eval masks.

    The number at position t of a sample's k-th draw is splitmix64(key + (k * 2**32 + t + 1) *
    GOLDEN), key being a hash of (seed, index): SplitMix64's own sequence, read at a counter
    instead of stepped. So a sample gets the same numbers in any batch and at any padding, and
    the whole batch is a few numpy operations (~45 µs for 32 x 128) where a torch generator per
    sample costs ~13 µs a sample to seed and draw.
    """

    def __init__(self, seed: int, indices: list[int], length: int):
        base = np.uint64(mixed_seed(seed, 0))
        self.keys = splitmix64(np.asarray(indices, dtype=np.uint64) * GOLDEN + base)  # [B]
        self.positions = np.arange(1, length + 1, dtype=np.uint64)
        self.draw = 0

    def _next_counter(self) -> np.uint64:
        self.draw += 1
        return np.uint64((self.draw - 1) * STREAM)

    def uniform(self) -> torch.Tensor:
        """FloatTensor [B, T] in [0, 1) with 24 random bits, like torch.rand's float32."""
        counter = self._next_counter()
        bits = splitmix64(self.keys[:, None] + (self.positions + counter) * GOLDEN)
        return torch.from_numpy((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))

    def token_ids(self, where: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """LongTensor [where.sum()]: uniform ids in [0, vocab_size) for the True positions."""
        counter = self._next_counter()
        rows, columns = (i.numpy() for i in where.nonzero(as_tuple=True))
        bits = splitmix64(self.keys[rows] + (self.positions[columns] + counter) * GOLDEN)
        return torch.from_numpy(((bits >> np.uint64(32)) * np.uint64(vocab_size) >> np.uint64(32)).astype(np.int64))


def in_one_storage(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's [B, T] int64 tensors as views of one block, the other tensors as they are.

    A DataLoader worker hands each tensor storage to the training process through its own
    shared-memory segment; with 2 workers, three [32, 128] tensors as one storage arrived at
    ~1.7x the batches per second of three storages (667-890 against 410-506 batches/s). The
    copy into the block takes microseconds.
    """
    fields = [name for name, t in batch.items() if t.dim() == 2 and t.dtype == torch.int64]
    if len(fields) < 2:
        return batch
    block = torch.empty((len(fields), *batch[fields[0]].shape), dtype=torch.int64)
    for row, name in zip(block, fields):
        row.copy_(batch[name])
    return {**batch, **dict(zip(fields, block))}


class CausalLmCollator:
    """Causal LM batches: input_ids, attention_mask, labels = input_ids with padding -100.

    The model shifts labels itself. transformers' DataCollatorForLanguageModeling(mlm=False)
    gives the same batch, but pads through tokenizer.pad in Python at many times the cost
    (3.5 ms against our pad's ~0.1 ms for 32 x 128 tokens), on the training step's path when num_workers=0,
    and follows tokenizer.padding_side; right padding here is fixed.
    """

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id

    def set_epoch(self, epoch: int) -> None:
        """Nothing is random in causal LM batches."""

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad([s["input_ids"] for s in samples], self.pad_id)
        attention_mask = attention_mask_for(samples, input_ids.shape[1])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return in_one_storage({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


class MaskedLmCollator:
    """Masked LM batches (optionally with whole-word masking and sentence-order labels).

    Returns input_ids (masked), attention_mask, labels (original id at masked positions, -100
    elsewhere), and for sentence_order also token_type_ids [B, T] and sentence_order_label [B].
    Special tokens ([CLS], [SEP], [PAD], ...) are never masked. A sample's input_ids may be a
    list, a 1-D numpy array or a tensor.

    Args:
        tokenizer: the Hugging Face tokenizer the shards were made with.
        mlm_probability: share of tokens (or words, with whole_word_mask) chosen for prediction.
        whole_word_mask: choose whole words (see word_boundaries.py) instead of single pieces.
        sentence_order: pass token_type_ids and sentence_order_label through (ALBERT SOP).
        seed: seeds the masks, with the epoch and sample index.
        deterministic: the same masks for a sample every time (validation/test).
        max_word_pieces: with whole_word_mask, a longer word is masked as words of this many pieces.
    """

    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        whole_word_mask: bool = False,
        sentence_order: bool = False,
        seed: int = 0,
        deterministic: bool = False,
        max_word_pieces: int = MAX_WORD_PIECES,
    ):
        if max_word_pieces < 1:
            raise UserError(f"max_word_pieces={max_word_pieces} must be at least 1.")
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.sentence_order = sentence_order
        self.seed = seed
        self.deterministic = deterministic
        self.max_word_pieces = max_word_pieces
        self.epoch = 0
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)  # [vocab]: never masked
        self.special[sorted({*tokenizer.all_special_ids, self.pad_id})] = True
        self.word_starts = word_start_table(tokenizer) if whole_word_mask else None
        self.space_id = bare_space_id(tokenizer)

    def set_epoch(self, epoch: int) -> None:
        """Training masks change every epoch; the DataLoader calls this before starting workers."""
        self.epoch = epoch

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad([s["input_ids"] for s in samples], self.pad_id)
        word_ids = padded_word_ids(samples, input_ids.shape[1]) if self.whole_word_mask else None
        draws = self._sample_draws(samples, input_ids.shape[1]) if self.deterministic else BatchDraws(
            self._batch_generator(samples), input_ids.shape
        )
        input_ids, labels = self.mask(input_ids, draws, word_ids)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask_for(samples, input_ids.shape[1]),
            "labels": labels,
        }
        if self.sentence_order:
            batch["token_type_ids"] = pad([s["token_type_ids"] for s in samples], 0)
            batch["sentence_order_label"] = torch.tensor([s["sentence_order_label"] for s in samples], dtype=torch.long)
        return in_one_storage(batch)

    def _batch_generator(self, samples: list[dict]) -> torch.Generator:
        index = samples[0].get("index")
        if index is None:  # not from JsonlStream: fall back on torch's (per-worker seeded) global RNG
            index = int(torch.randint(2**62, (1,)).item())
        return generator_for(self.seed, self.epoch + 1, index)

    def _sample_draws(self, samples: list[dict], length: int) -> SampleDraws:
        indices = [s.get("index") for s in samples]
        if None in indices:
            raise UserError(
                "deterministic (validation/test) masks are seeded by each sample's 'index', its line number "
                "in the shards, and a sample has none; read the samples with convmodel.data.JsonlStream"
            )
        return SampleDraws(self.seed, indices, length)

    def mask(
        self,
        input_ids: torch.Tensor,
        draws: BatchDraws | SampleDraws,
        word_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels) for a right-padded [B, T] batch; modifies input_ids in place.

        Token-level masking is whole-word masking with one-piece words: a position is chosen when
        the draw at its word's first piece is below mlm_probability.
        """
        maskable = ~self.special.take(input_ids)
        chosen = draws.uniform() < self.mlm_probability
        if self.whole_word_mask:
            starts = word_starts(input_ids, maskable, self.word_starts, self.space_id, word_ids)
            chosen = chosen.gather(1, first_piece_of_word(starts, self.max_word_pieces))
        masked = maskable & chosen

        labels = input_ids.masked_fill(~masked, -100)
        roll = draws.uniform()
        input_ids.masked_fill_(masked & (roll < MASK_SHARE), self.mask_id)
        randomized = masked & (roll >= MASK_SHARE) & (roll < MASK_SHARE + RANDOM_SHARE)
        input_ids.masked_scatter_(randomized, draws.token_ids(randomized, self.vocab_size))  # row-major order
        return input_ids, labels


def build_collator(
    tokenizer,
    objective: str,
    whole_word_mask: bool = False,
    mlm_probability: float = 0.15,
    seed: int = 0,
    deterministic: bool = False,
) -> CausalLmCollator | MaskedLmCollator:
    """The collator for an objective: clm -> causal LM, mlm -> masked LM, sop -> masked LM + order labels."""
    if objective == "clm":
        return CausalLmCollator(tokenizer)
    return MaskedLmCollator(
        tokenizer,
        mlm_probability=mlm_probability,
        whole_word_mask=whole_word_mask,
        sentence_order=objective == "sop",
        seed=seed,
        deterministic=deterministic,
    )
