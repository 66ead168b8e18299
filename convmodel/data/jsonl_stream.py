"""Stream JSONL shards as samples, each read once per epoch across DDP ranks x DataLoader workers.

Every process that reads (a "reader": one DataLoader worker of one rank) walks the same sorted
files and keeps global line i iff i % readers == reader_id, with reader_id = rank * num_workers +
worker_id and readers = world_size * num_workers. Lines a reader does not keep are skipped
without JSON parsing. Nothing is loaded into memory beyond the shuffle buffer.
"""

import json
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from convmodel.errors import UserError

# Per-token fields cut together with input_ids when a record is longer than max_seq_len.
TOKEN_FIELDS = ("input_ids", "token_type_ids")


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialized, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class JsonlStream(IterableDataset):
    """Samples from JSONL shards: dicts with the record's fields plus `index`, its global line number.

    Args:
        files: shard paths, already expanded and sorted (the order defines the global line index).
        max_seq_len: longer records are cut to this many tokens (shards made for a longer length).
        shuffle_buffer_size: samples held for shuffling; 0 or 1 keeps file order.
        seed: seeds the shuffle, together with the epoch and the reader id.
        rank: this process's rank; None asks torch.distributed (0 when not initialized).
        world_size: number of ranks; None asks torch.distributed (1 when not initialized).
        required_fields: fields every record must have (sop needs its labels).
        end_token_id: when a record ending with this id is cut, it keeps it as its last token
            (mlm/sop records keep their closing [SEP]).
        vocab_size: ids must be below it; catches shards made with another tokenizer.
        drop_remainder: every reader yields the same number of samples, leaving out the fewer
            than `readers` lines at the end; DDP training needs equal step counts on all ranks.
    """

    def __init__(
        self,
        files: Sequence[str],
        max_seq_len: int | None = None,
        shuffle_buffer_size: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        required_fields: Sequence[str] = ("input_ids",),
        end_token_id: int | None = None,
        vocab_size: int | None = None,
        drop_remainder: bool = False,
    ):
        super().__init__()
        self.files = list(files)
        self.max_seq_len = max_seq_len
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.required_fields = tuple(required_fields)
        self.end_token_id = end_token_id
        self.vocab_size = vocab_size
        self.drop_remainder = drop_remainder
        self.epoch = 0
        self._total_lines: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called in the main process before the workers start, so each epoch shuffles anew.

        It also fixes rank and world size there, where torch.distributed is initialized (worker
        processes started with spawn do not see the process group).
        """
        self.epoch = epoch
        if self.drop_remainder:
            self.total_lines()  # count once here; workers get the count instead of each re-reading every file
        if self.rank is None or self.world_size is None:
            rank, world = distributed_rank_and_world()
            self.rank = rank if self.rank is None else self.rank
            self.world_size = world if self.world_size is None else self.world_size

    def reader(self) -> tuple[int, int]:
        """(reader_id, readers) of the calling process."""
        rank, world = distributed_rank_and_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * num_workers + worker_id, world * num_workers

    def total_lines(self) -> int:
        """Lines in all files (counted once, only for drop_remainder)."""
        if self._total_lines is None:
            total = 0
            for path in self.files:
                with open(path, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        total += block.count(b"\n")
                    if f.tell() > 0:
                        f.seek(-1, 2)
                        total += f.read(1) != b"\n"  # a last line without newline
            self._total_lines = total
        return self._total_lines

    def __iter__(self) -> Iterator[dict]:
        reader_id, readers = self.reader()
        samples = self._read(reader_id, readers)
        if self.shuffle_buffer_size > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{reader_id}")
            samples = shuffle_buffer(samples, self.shuffle_buffer_size, rng)
        return samples

    def _read(self, reader_id: int, readers: int) -> Iterator[dict]:
        stop = (self.total_lines() // readers) * readers if self.drop_remainder else None
        index = 0
        for path in self.files:
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, start=1):
                    if stop is not None and index >= stop:
                        return
                    if index % readers == reader_id and line.strip():
                        yield self._parse(line, path, line_no, index)
                    index += 1

    def _parse(self, line: bytes, path: str, line_no: int, index: int) -> dict:
        fix = "re-run trainer/prepare_train_data.py to rewrite this shard, or remove it from the file list"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}:{line_no}: not a valid JSON record ({exc}); {fix}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_no}: not a JSON object with input_ids; {fix}")
        if "input_ids" not in record:
            raise UserError(f"{path}:{line_no}: record has no 'input_ids'; {fix}")
        for field in self.required_fields:
            if field not in record:
                raise UserError(
                    f"{path}:{line_no}: record has no {field!r}; the shard was made for another objective: "
                    "make shards with trainer/prepare_train_data.py --objective set as data.objective"
                )
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise UserError(f"{path}:{line_no}: input_ids must be a non-empty list of integers; {fix}")
        if self.vocab_size is not None and (max(ids) >= self.vocab_size or min(ids) < 0):
            raise UserError(
                f"{path}:{line_no}: token id {max(ids)} is outside the tokenizer's vocabulary of {self.vocab_size}; "
                "the shard was made with another tokenizer: re-run trainer/prepare_train_data.py with the "
                "tokenizer given as data.tokenizer"
            )
        if self.max_seq_len is not None and len(ids) > self.max_seq_len:
            self._truncate(record)
        record["index"] = index
        return record

    def _truncate(self, record: dict) -> None:
        n = self.max_seq_len
        keep_end = self.end_token_id is not None and record["input_ids"][-1] == self.end_token_id
        for field in TOKEN_FIELDS:
            if field in record:
                values = record[field]
                record[field] = values[: n - 1] + values[-1:] if keep_end else values[:n]


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Approximate shuffle of a stream: hold `size` samples, emit a random one as each new one arrives."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer
