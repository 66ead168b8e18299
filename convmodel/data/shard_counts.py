"""Records per shard: from the folder's manifest.json when it vouches for the file, else by reading.

Readers need every shard's record count before the first sample (to cut the epoch into equal
ranges). prepare_train_data.py writes them into manifest.json; a manifest entry is trusted only
while the file still has the size in bytes it recorded. Shards without one are counted by
reading them, at memchr speed (newlines counted in 1 MiB blocks, no JSON decoding).

A record is a line. A blank or whitespace-only line is an error naming file:line, found while
counting: skipping it silently would make line numbers and record numbers disagree, and leaving
it in would hand one reader a record that is not there.
"""

import os
import re
from collections.abc import Sequence

from convmodel.data.manifest import Manifest, read_manifest
from convmodel.errors import UserError

BLOCK = 1 << 20
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def blank_line_error(path: str, line_no: int) -> UserError:
    return UserError(
        f"{path}:{line_no}: blank line; a shard holds one JSON record per line: delete the line, "
        "or write the shard again with trainer/prepare_train_data.py"
    )


def count_records(path: str) -> int:
    """Lines of one shard (a last line without newline included); UserError at the first blank line."""
    count = 0
    tail = b""  # the unfinished line carried into the next block
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            data = tail + block
            end = data.rfind(b"\n") + 1
            whole, tail = data[:end], data[end:]
            if whole:
                blank = BLANK_LINE.search(b"\n" + whole)  # the leading \n: a blank first line shows too
                if blank:
                    raise blank_line_error(path, count + whole.count(b"\n", 0, blank.start()) + 1)
                count += whole.count(b"\n")
    if tail:
        if not tail.strip():
            raise blank_line_error(path, count + 1)
        count += 1
    return count


def manifest_counts(files: Sequence[str]) -> tuple[list[int | None], dict[str, Manifest]]:
    """(each file's count from its folder's manifest, None where it has no matching entry; {folder: manifest})."""
    manifests: dict[str, Manifest] = {}
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in files):
        manifest = read_manifest(folder)
        if manifest is not None:
            manifests[folder] = manifest
    counts: list[int | None] = []
    for path in files:
        manifest = manifests.get(os.path.dirname(os.path.abspath(path)))
        entry = None if manifest is None else next(
            (s for s in manifest.shards if s.file == os.path.basename(path)), None)
        counts.append(entry.records if entry is not None and entry.bytes == os.path.getsize(path) else None)
    return counts, manifests
