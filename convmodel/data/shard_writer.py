"""ShardWriter: JSON lines into part-00000.jsonl, part-00001.jsonl, ..., counted for the manifest.

The parent of prepare_train_data writes every shard through one writer, so the counts in
manifest.json are the lines it wrote, and a failed run can remove exactly the files it made.
"""

import json
import os

from convmodel.data.manifest import ShardCount

SHARD_PATTERN = "part-{:05d}.jsonl"


class ShardWriter:
    """Writes JSON lines into part-00000.jsonl, part-00001.jsonl, ... `shard_size` lines each,
    counting the records and tokens of each shard for the manifest."""

    def __init__(self, output_dir: str, shard_size: int):
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.paths: list[str] = []
        self.counts: list[ShardCount] = []  # bytes filled in by close()
        self._file = None

    def write(self, line: str, tokens: int) -> None:
        if self._file is None or self.counts[-1].records == self.shard_size:
            self._next_shard()
        self._file.write(line + "\n")
        self.counts[-1].records += 1
        self.counts[-1].tokens += tokens

    def _next_shard(self) -> None:
        self.close()
        name = SHARD_PATTERN.format(len(self.paths))
        self.paths.append(os.path.join(self.output_dir, name))
        self.counts.append(ShardCount(file=name, records=0, tokens=0, bytes=0))
        self._file = open(self.paths[-1], "w", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.counts[-1].bytes = os.path.getsize(self.paths[-1])

    def remove(self) -> None:
        self.close()
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


def write_packed(writer: ShardWriter, records) -> None:
    for input_ids in records:
        writer.write(json.dumps({"input_ids": input_ids}, separators=(",", ":")), len(input_ids))
