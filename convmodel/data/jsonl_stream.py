"""Stream JSONL shards as samples, each read once per epoch across DDP ranks x DataLoader workers.

Every process that reads (a "reader": one DataLoader worker of one rank) reads its own
contiguous range of the epoch's records (see convmodel.data.shard_plan: shards in an order
drawn per epoch, cut into equal ranges), so each byte is parsed by one reader. Lines go through
the shuffle buffer as raw bytes and are decoded (convmodel.data.record_decoding) only when they
leave it: a resumed epoch replays its reading and shuffling up to where it stopped without
decoding any of the samples it skips. Nothing is loaded into memory beyond the shuffle buffer.
"""

import random
from collections.abc import Iterator, Sequence
from itertools import accumulate, islice

import torch
from torch.utils.data import IterableDataset, get_worker_info

from convmodel.data.record_decoding import RecordDecoder
from convmodel.data.shard_counts import BLOCK, blank_line_error, count_records
from convmodel.data.shard_plan import Segment, batches_served, file_order, reader_range, reader_segments
from convmodel.errors import UserError

# what the shuffle buffer holds per sample: (index, raw line, file number, line number)
RawLine = tuple[int, bytes, int, int]


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
        shuffle_buffer_size: samples held for shuffling; 0 or 1 keeps the order read.
        seed: seeds the shuffle and the shard order, together with the epoch.
        rank: this process's rank; None asks torch.distributed (0 when not initialized).
        world_size: number of ranks; None asks torch.distributed (1 when not initialized).
        required_fields: fields every record must have (sop needs its labels; it is then cut as a pair).
        end_token_id: when a record ending with this id is cut, it keeps it as its last token
            (mlm records keep their closing [SEP]).
        vocab_size: ids must be below it; catches shards made with another tokenizer.
        drop_remainder: every reader yields the same number of samples, leaving out the fewer
            than `readers` records at the end; DDP training needs equal step counts on all ranks.
        counts: records per file when known (from manifest.json); None counts them by reading.
        shuffle_shards: read the shards in an order drawn from (seed, epoch) instead of sorted.
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
        counts: Sequence[int] | None = None,
        shuffle_shards: bool = False,
    ):
        super().__init__()
        self.files = list(files)
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_remainder = drop_remainder
        self.shuffle_shards = shuffle_shards
        self.decode = RecordDecoder(tuple(required_fields), vocab_size, max_seq_len, end_token_id)
        self.epoch = 0
        self._counts = None if counts is None else list(counts)
        self._skip: list[int] | None = None  # samples each worker role skips (a resumed epoch)
        self._first_worker = 0  # the role DataLoader worker 0 plays (a resumed epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called in the main process before the workers start, so each epoch shuffles anew.

        It also fixes rank and world size there, where torch.distributed is initialized (worker
        processes started with spawn do not see the process group), counts the records once
        when they are needed, and forgets a resume point (see resume_after).
        """
        self.epoch = epoch
        self._skip, self._first_worker = None, 0
        if self.rank is None or self.world_size is None:
            rank, world = distributed_rank_and_world()
            self.rank = rank if self.rank is None else self.rank
            self.world_size = world if self.world_size is None else self.world_size
        self.counts()  # here, once, instead of in every worker

    def counts(self) -> list[int]:
        """Records per file (given, or counted by reading once)."""
        if self._counts is None:
            self._counts = [count_records(path) for path in self.files]
        return self._counts

    def rank_readers(self, workers: int) -> list[int]:
        """Samples each of this rank's `workers` readers yields in an epoch (the same every epoch)."""
        rank, world = self._rank_and_world()
        total = sum(self.counts())
        return [
            len(range(*reader_range(total, rank * workers + w, world * workers, self.drop_remainder)))
            for w in range(workers)
        ]

    def resume_after(self, batches: int, batch_size: int, workers: int) -> None:
        """Make the next pass over this epoch (after set_epoch) leave out its first `batches` batches.

        Each worker skips the batches it served in the uninterrupted run (the DataLoader takes
        them from the workers in turn, see shard_plan.batches_served), and DataLoader worker 0
        takes the role of the worker that was due next, so the batches that follow are the
        uninterrupted run's, in its order. Skipped samples are read and shuffled, not decoded.
        """
        sizes = self.rank_readers(max(workers, 1))
        served, self._first_worker = batches_served(sizes, batch_size, batches)
        self._skip = [min(n * batch_size, size) for n, size in zip(served, sizes)]

    def _rank_and_world(self) -> tuple[int, int]:
        rank, world = distributed_rank_and_world()
        return (rank if self.rank is None else self.rank), (world if self.world_size is None else self.world_size)

    def reader(self) -> tuple[int, int, int]:
        """(reader_id, readers, worker role) of the calling process."""
        rank, world = self._rank_and_world()
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker_id + self._first_worker) % num_workers
        return rank * num_workers + role, world * num_workers, role

    def __iter__(self) -> Iterator[dict]:
        reader_id, readers, role = self.reader()
        lines = self._lines(reader_id, readers)
        if self.shuffle_buffer_size > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{reader_id}")
            lines = shuffle_buffer(lines, self.shuffle_buffer_size, rng)
        if self._skip is not None:
            lines = islice(lines, self._skip[role], None)
        return (self.decode(line, self.files[file_no], line_no, index) for index, line, file_no, line_no in lines)

    def _lines(self, reader_id: int, readers: int) -> Iterator[RawLine]:
        if readers == 1 and not self.drop_remainder and not self.shuffle_shards and self._counts is None:
            yield from self._whole_files()  # one reader of sorted files needs no counts (no scan first)
            return
        counts = self.counts()
        offsets = [0, *accumulate(counts)]
        start, stop = reader_range(sum(counts), reader_id, readers, self.drop_remainder)
        order = file_order(len(self.files), self.seed, self.epoch, self.shuffle_shards)
        for segment in reader_segments(counts, order, start, stop):
            yield from self._segment(segment, offsets[segment.file_no])

    def _whole_files(self) -> Iterator[RawLine]:
        index = 0
        for file_no, path in enumerate(self.files):
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, start=1):
                    if line.isspace():
                        raise blank_line_error(path, line_no)
                    yield index, line, file_no, line_no
                    index += 1

    def _segment(self, segment: Segment, offset: int) -> Iterator[RawLine]:
        path = self.files[segment.file_no]
        with open(path, "rb") as f:
            skip_lines(f, segment.first, path)
            line_no = segment.first
            for line in islice(f, segment.stop - segment.first):
                line_no += 1
                if line.isspace():
                    raise blank_line_error(path, line_no)
                yield offset + line_no - 1, line, segment.file_no, line_no
        if line_no < segment.stop:
            raise changed_shard_error(path, segment.stop, line_no)


def skip_lines(f, lines: int, path: str) -> None:
    """Move a binary file to the start of line `lines` (0-based) by counting newlines in blocks."""
    seen, position = 0, 0
    while seen < lines:
        block = f.read(BLOCK)
        if not block:
            raise changed_shard_error(path, lines, seen)
        n = block.count(b"\n")
        if seen + n >= lines:
            end = -1
            for _ in range(lines - seen):
                end = block.index(b"\n", end + 1)
            f.seek(position + end + 1)
            return
        seen += n
        position += len(block)


def changed_shard_error(path: str, expected: int, found: int) -> UserError:
    return UserError(
        f"{path}: expected {expected} records but the file ends after {found}; it changed after it was "
        "counted (or its manifest.json is wrong): write the shards again with trainer/prepare_train_data.py"
    )


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream: hold `size` samples, emit a random one as each new one arrives."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer
