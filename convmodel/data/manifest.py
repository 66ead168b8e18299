"""manifest.json: what a folder of shards was made for, written by prepare, read by the DataModule.

A folder of JSONL shards says nothing about the objective, sequence length or tokenizer it was
made with, so a reader had to count every line at start and could not tell that shards made for
`sop` at 512 were being read as `mlm` at 128 or with another tokenizer. `prepare_train_data.py`
writes this file beside its shards; readers use its counts instead of a scan and refuse shards
made for something else. Shards without a manifest (written by hand or by older versions) still
work: they are counted by reading them.

Layout (`FORMAT` 1):

    {"format": 1, "objective": "mlm", "max_seq_len": 128,
     "tokenizer": {"path": "...", "vocab_size": 4000, "fingerprint": "sha256:..."},
     "records": 1234, "tokens": 150000, "padding_fraction": 0.08,
     "shards": [{"file": "part-00000.jsonl", "records": 1234, "tokens": 150000, "bytes": 987654}]}

`padding_fraction` is the share of the `records x max_seq_len` positions a fixed-length batch
would fill with padding. `bytes` lets a reader notice a shard changed after the manifest was written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from convmodel.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
# sentencepiece model files hashed when a folder has no tokenizer.json (ours write spm.model)
_SENTENCEPIECE_FILES = ("spm.model", "spiece.model")


@dataclass
class ShardCount:
    file: str  # name inside the folder
    records: int
    tokens: int
    bytes: int


@dataclass
class Manifest:
    objective: str
    max_seq_len: int
    tokenizer_path: str
    vocab_size: int
    tokenizer_fingerprint: str
    shards: list[ShardCount] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(shard.records for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def padding_fraction(self) -> float:
        positions = self.records * self.max_seq_len
        return 0.0 if positions == 0 else 1.0 - self.tokens / positions

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "objective": self.objective,
            "max_seq_len": self.max_seq_len,
            "tokenizer": {"path": self.tokenizer_path, "vocab_size": self.vocab_size,
                          "fingerprint": self.tokenizer_fingerprint},
            "records": self.records,
            "tokens": self.tokens,
            "padding_fraction": round(self.padding_fraction, 6),
            "shards": [vars(shard) for shard in self.shards],
        }


def tokenizer_fingerprint(tokenizer_path: str) -> str:
    """sha256 of the tokenizer's pieces and special tokens: equal for copies of the same tokenizer.

    Hashes what defines the ids (tokenizer.json's vocabulary and added tokens, read as JSON so a
    re-saved copy with other formatting or metadata hashes the same), else the sentencepiece model file.
    """
    digest = hashlib.sha256()
    tokenizer_json = os.path.join(tokenizer_path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        try:
            with open(tokenizer_json, encoding="utf-8") as f:
                raw = json.load(f)
            ids = {"vocab": raw["model"].get("vocab"),
                   "added": sorted((t["id"], t["content"]) for t in raw.get("added_tokens", []))}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{tokenizer_json} cannot be read as a tokenizer ({exc}); is {tokenizer_path} a "
                            "tokenizer folder made by trainer/train_tokenizer.py?") from None
        digest.update(json.dumps(ids, sort_keys=True).encode())
        return "sha256:" + digest.hexdigest()
    for name in _SENTENCEPIECE_FILES:
        path = os.path.join(tokenizer_path, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
            return "sha256:" + digest.hexdigest()
    raise UserError(f"{tokenizer_path}: no tokenizer.json or sentencepiece model to fingerprint; is it a tokenizer "
                    "folder made by trainer/train_tokenizer.py?")


def write_manifest(folder: str, manifest: Manifest) -> str:
    """Write `folder/manifest.json` atomically (a reader never sees half a file); returns its path."""
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str) -> Manifest | None:
    """The manifest of a shard folder, None when it has none; a damaged one is an error naming the file."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, this convmodel reads format {FORMAT}")
        tokenizer = raw["tokenizer"]
        return Manifest(
            objective=str(raw["objective"]),
            max_seq_len=int(raw["max_seq_len"]),
            tokenizer_path=str(tokenizer["path"]),
            vocab_size=int(tokenizer["vocab_size"]),
            tokenizer_fingerprint=str(tokenizer["fingerprint"]),
            shards=[ShardCount(file=str(s["file"]), records=int(s["records"]), tokens=int(s["tokens"]),
                               bytes=int(s["bytes"])) for s in raw["shards"]],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); write the shards again with prepare_train_data.py "
                        f"--overwrite, or delete {MANIFEST} to have them counted by reading") from None
