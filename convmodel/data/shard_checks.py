"""Before the first step: are a split's shards the ones the data options ask for, and enough of them?

A mistake found here costs the user seconds; found by a reader it costs a crash in the middle of
training (or, worse, nothing at all: a run on shards made for another objective or tokenizer
trains on garbage). Every check names the data.* option that fixes it.
"""

import sys
from dataclasses import dataclass
from itertools import islice

from convmodel.data.manifest import Manifest, tokenizer_fingerprint
from convmodel.data.shard_counts import count_records, manifest_counts
from convmodel.errors import UserError

CUT_SAMPLE_RECORDS = 20_000  # records decoded to measure the share of tokens cutting drops


@dataclass
class SplitShards:
    """One split's shards: the option they came from, the files, their record counts."""

    option: str  # e.g. data.train_files
    files: list[str]
    counts: list[int]
    longest_made_for: int | None  # the largest max_seq_len the manifests name; None: a shard has no entry


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[convmodel] {message}", file=sys.stderr, flush=True)


def split_shards(option: str, files: list[str], objective: str, tokenizer: str, max_seq_len: int,
                 quiet: bool = False) -> SplitShards:
    """Counts from manifest.json, by reading the shards it does not vouch for (one progress line), after its checks."""
    counts, manifests = manifest_counts(files)
    check_manifests(option, manifests, objective, tokenizer)
    missing = [k for k, count in enumerate(counts) if count is None]
    if missing:
        say(f"counting records in {len(missing)} shard{'s' * (len(missing) != 1)} (no manifest.json) for {option} ...",
            quiet)
        for k in missing:
            counts[k] = count_records(files[k])
    vouched = not missing and manifests
    longest = max(m.max_seq_len for m in manifests.values()) if vouched else None
    return SplitShards(option, files, counts, longest)


def check_manifests(option: str, manifests: dict[str, Manifest], objective: str, tokenizer: str) -> None:
    """One UserError listing every folder made for another objective or tokenizer."""
    problems, fingerprint = [], None
    for folder, manifest in manifests.items():
        if manifest.objective != objective:
            problems.append(
                f"{folder} holds shards made for objective {manifest.objective!r} (its manifest.json) but "
                f"data.objective is {objective!r}: set data.objective: {manifest.objective}, or make shards "
                f"with trainer/prepare_train_data.py --objective {objective}"
            )
        fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
        if manifest.tokenizer_fingerprint != fingerprint:
            problems.append(
                f"{folder} holds shards made with another tokenizer ({manifest.tokenizer_path}, per its "
                f"manifest.json) than data.tokenizer {tokenizer}: set data.tokenizer to the one they were made "
                f"with, or make shards with trainer/prepare_train_data.py --tokenizer {tokenizer}"
            )
    if problems:
        raise UserError(f"{option}: " + "; ".join(problems))


def check_enough(shards: SplitShards, batch_size: int, readers: int, equal_counts: bool) -> None:
    """No record at all is an error; so is less than a batch per reader when every reader must match."""
    total = sum(shards.counts)
    names = ", ".join(shards.files[:3]) + (f" and {len(shards.files) - 3} more" if len(shards.files) > 3 else "")
    if total == 0:
        raise UserError(f"{shards.option}: the shards hold no record ({names}); give non-empty shards made by "
                        "trainer/prepare_train_data.py")
    if equal_counts and total < readers * batch_size:
        raise UserError(
            f"{shards.option}: {total} records are fewer than one batch for each of the {readers} readers "
            f"(devices x max(1, data.num_workers)) at data.batch_size={batch_size} ({names}); give more shards, "
            "or lower data.batch_size or data.num_workers"
        )


def report_cut_share(shards: SplitShards, stream, max_seq_len: int, quiet: bool = False) -> float | None:
    """The share of tokens cutting to max_seq_len drops, measured on the first records; one line when > 0.

    Only when a shard can hold longer records: made for a longer max_seq_len, or without manifest.
    `stream` reads the split's files in order without cutting.
    """
    if shards.longest_made_for is not None and shards.longest_made_for <= max_seq_len:
        return None
    tokens = dropped = records = 0
    for sample in islice(stream, CUT_SAMPLE_RECORDS):
        n = len(sample["input_ids"])
        tokens, dropped, records = tokens + n, dropped + max(0, n - max_seq_len), records + 1
    share = dropped / tokens if tokens else 0.0
    if share > 0:
        made = (f"shards made for max_seq_len {shards.longest_made_for}" if shards.longest_made_for
                else "shards without manifest.json")
        say(f"warning: {shards.option}: data.max_seq_len={max_seq_len} cuts records of {made}: "
            f"{100 * share:.1f}% of the tokens of the first {records} records are dropped; make shards with "
            f"trainer/prepare_train_data.py --max_seq_len {max_seq_len} to keep them", quiet)
    return share
