"""Which records each reader reads in an epoch, and which DataLoader worker serves which batch.

A reader is one DataLoader worker of one rank (reader_id = rank * workers + worker). Each epoch
the shards are put in an order drawn from (seed, epoch), the same on every reader, and their
records, concatenated in that order, are cut into `readers` contiguous ranges of equal size
(with drop_remainder the last `total % readers` records are left out, a different few each
epoch). A reader reads its range front to back: whole shards, plus at most a part of one shard at
either end, so every byte is parsed once per epoch by one reader. Equal ranges give every reader
the same count, which DDP needs (equal steps on all ranks), whatever the shard sizes; striding
lines over readers gave that too, but had every reader read every byte of every shard.

A sample's `index` stays its record number in the sorted file list, whatever the order read:
validation masks and the seeds of training masks depend on it, not on who reads it.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Records [first, stop) of file `file_no` (its position in the sorted file list)."""

    file_no: int
    first: int
    stop: int


def file_order(n_files: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order shards are concatenated in this epoch: sorted, or a permutation drawn from (seed, epoch)."""
    order = list(range(n_files))
    if shuffle:
        random.Random(f"{seed}/{epoch}/shards").shuffle(order)
    return order


def reader_range(total: int, reader_id: int, readers: int, drop_remainder: bool) -> tuple[int, int]:
    """[start, stop) of this reader in the epoch's concatenation of `total` records."""
    per, extra = divmod(total, readers)
    if drop_remainder:
        return reader_id * per, (reader_id + 1) * per
    start = reader_id * per + min(reader_id, extra)
    return start, start + per + (reader_id < extra)


def reader_segments(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[Segment]:
    """The parts of files that positions [start, stop) of the concatenation in `order` cover."""
    segments, position = [], 0
    for file_no in order:
        count = counts[file_no]
        first, last = max(start - position, 0), min(stop - position, count)
        if first < last:
            segments.append(Segment(file_no, first, last))
        position += count
        if position >= stop:
            break
    return segments


def batches_served(samples_per_worker: Sequence[int], batch_size: int, batches: int) -> tuple[list[int], int]:
    """(batches each worker has served, the worker serving the next one) after `batches` of an epoch.

    A DataLoader over an iterable dataset asks its workers for batches in turn, 0, 1, ..., and
    skips a worker for good once it has run out; each worker's last batch may be short. So the
    first `batches` batches of an epoch come from the workers in this fixed pattern, whatever the
    timing, and a loader that must continue after them has to start at the returned worker.
    """
    remaining = [-(-n // batch_size) for n in samples_per_worker]  # ceil: the short last batch counts
    if batches > sum(remaining):
        raise ValueError(f"{batches} batches asked, the epoch has {sum(remaining)}")
    served = [0] * len(remaining)
    cursor, left = 0, batches
    while left:
        active = [w for w in range(len(remaining)) if remaining[w] > served[w]]
        smallest = min(remaining[w] - served[w] for w in active)
        if left >= smallest * len(active):  # whole rounds until a worker runs out
            for w in active:
                served[w] += smallest
            left -= smallest * len(active)
            continue
        rounds, rest = divmod(left, len(active))
        for w in active:
            served[w] += rounds
        in_turn = sorted(active, key=lambda w: (w - cursor) % len(remaining))
        for w in in_turn[:rest]:
            served[w] += 1
        cursor = (in_turn[rest - 1] + 1) % len(remaining) if rest else cursor
        left = 0
    return served, cursor
