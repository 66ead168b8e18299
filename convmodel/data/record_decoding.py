"""One JSONL line -> one checked sample cut to max_seq_len: the per-record work of JsonlStream.

Speed: msgspec decodes a line straight into a typed struct whose constraints (ids in
[0, vocab_size), a non-empty list, labels 0 or 1) are checked in C while it decodes. On the
sample corpus's 115-token records that is 3.1 µs a record, against 15.5 µs for json.loads plus a
Python check of every token, and 5.3 µs for orjson with the same checks in Python (one core,
3677 records of work/bench/shards-mlm-128). A line the fast decoder refuses is decoded again by the
plain-json check below, which finds what is wrong and names file:line; a bad record ends
training, so that path's speed does not matter. Without msgspec every line takes that path.

A record's optional `word_ids` (one word number or null per input id, read by the collator's
whole-word masking) is kept and cut with the ids; other extra fields are left out.

Cutting a record longer than max_seq_len:
- mlm/clm: the tail goes (mlm keeps its closing [SEP]); the DataModule reports the share of
  tokens this drops, once, before training.
- sop: `[CLS] A [SEP] B [SEP]` keeps the tokens on both sides of the A|B junction (A's tail, B's
  head), both segments non-empty, so sentence_order_label stays true. A record that is not in
  that layout cannot be cut correctly and is refused.
"""

import json
from functools import lru_cache
from typing import Annotated, Any

from convmodel.errors import UserError

try:
    import msgspec
except ImportError:  # pragma: no cover - msgspec is in install_requires; plain json still works
    msgspec = None

FIX = "re-run trainer/prepare_train_data.py to rewrite this shard, or remove it from the file list"
PAIR_FIELDS = ("token_type_ids", "sentence_order_label")
# kept when a record has it (the collator's whole-word masking reads it); one entry per input id
WORD_IDS = "word_ids"
TOKEN_FIELDS = ("input_ids", "token_type_ids", WORD_IDS)  # cut together


@lru_cache(maxsize=8)
def fast_decoder(fields: tuple[str, ...], vocab_size: int | None):
    """A msgspec decoder for records with `fields`, checking ids against `vocab_size`; None without msgspec.

    Built per process (a struct made at run time cannot be pickled to DataLoader workers).
    """
    if msgspec is None:
        return None
    token = Annotated[int, msgspec.Meta(ge=0, lt=vocab_size)] if vocab_size else Annotated[int, msgspec.Meta(ge=0)]
    bit = Annotated[int, msgspec.Meta(ge=0, le=1)]
    types: dict[str, Any] = {
        "input_ids": Annotated[list[token], msgspec.Meta(min_length=1)],
        "token_type_ids": list[bit],
        "sentence_order_label": bit,
    }
    struct = msgspec.defstruct(
        "Record",
        [("input_ids", types["input_ids"]), *((f, types.get(f, Any)) for f in fields),
         (WORD_IDS, list[int | None] | None, None)],
        gc=False,
    )
    return msgspec.json.Decoder(struct)


class RecordDecoder:
    """Decodes, checks and cuts records of one stream.

    Args:
        required_fields: fields every record must have (sop: token_type_ids, sentence_order_label).
        vocab_size: ids must be below it (None: not checked).
        max_seq_len: longer records are cut (None: never).
        end_token_id: an mlm record ending with it keeps it last when cut.
    """

    def __init__(self, required_fields: tuple[str, ...], vocab_size: int | None, max_seq_len: int | None,
                 end_token_id: int | None):
        self.fields = tuple(dict.fromkeys(("input_ids", *required_fields)))
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.end_token_id = end_token_id
        self.pair = all(f in self.fields for f in PAIR_FIELDS)

    def __call__(self, line: bytes, path: str, line_no: int, index: int) -> dict:
        """The sample of one line: its fields plus `index`; UserError naming path:line_no when it is bad."""
        decoder = fast_decoder(self.fields[1:], self.vocab_size)
        sample = None
        if decoder is not None:
            try:
                record = decoder.decode(line)
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
            else:
                ids, words = record.input_ids, record.word_ids
                sample = {f: getattr(record, f) for f in self.fields} if len(self.fields) > 1 else {"input_ids": ids}
                if words is not None:
                    sample[WORD_IDS] = words
                if (words is not None and len(words) != len(ids)) or (
                        self.pair and len(sample["token_type_ids"]) != len(ids)):
                    sample = None  # the reference check says what is wrong
        if sample is None:
            sample = self.reference_check(line, path, line_no)
        if self.max_seq_len is not None and len(sample["input_ids"]) > self.max_seq_len:
            self.cut(sample, path, line_no)
        sample["index"] = index
        return sample

    def reference_check(self, line: bytes, path: str, line_no: int) -> dict:
        """Plain json and Python checks: what exactly is wrong with a line, or the record when nothing is."""
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{where}: not a valid JSON record ({exc}); {FIX}") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: not a JSON object with input_ids; {FIX}")
        if "input_ids" not in record:
            raise UserError(f"{where}: record has no 'input_ids'; {FIX}")
        for field in self.fields:
            if field not in record:
                raise UserError(
                    f"{where}: record has no {field!r}; the shard was made for another objective: "
                    "make shards with trainer/prepare_train_data.py --objective set as data.objective"
                )
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(t) is int for t in ids):
            raise UserError(f"{where}: input_ids must be a non-empty list of integers; {FIX}")
        low, high = min(ids), max(ids)
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            bad = low if low < 0 else high
            vocabulary = "" if self.vocab_size is None else f" of {self.vocab_size}"
            raise UserError(
                f"{where}: token id {bad} is outside the tokenizer's vocabulary{vocabulary}; "
                "the shard was made with another tokenizer: re-run trainer/prepare_train_data.py with the "
                "tokenizer given as data.tokenizer"
            )
        if self.pair:
            types, label = record["token_type_ids"], record["sentence_order_label"]
            if not isinstance(types, list) or len(types) != len(ids) or any(t not in (0, 1) for t in types):
                raise UserError(f"{where}: token_type_ids must hold one 0 or 1 per input id; {FIX}")
            if type(label) is not int or label not in (0, 1):
                raise UserError(f"{where}: sentence_order_label must be 0 or 1, got {label!r}; {FIX}")
        sample = {f: record[f] for f in self.fields}
        words = record.get(WORD_IDS)
        if words is not None:
            if not isinstance(words, list) or len(words) != len(ids) or any(
                    w is not None and type(w) is not int for w in words):
                raise UserError(f"{where}: word_ids must hold one word number (or null) per input id; {FIX}")
            sample[WORD_IDS] = words
        return sample

    def cut(self, sample: dict, path: str, line_no: int) -> None:
        """Shorten a sample to max_seq_len in place, its per-token fields alike (see the module docstring)."""
        n, ids = self.max_seq_len, sample["input_ids"]
        if self.pair:
            keep = pair_positions(sample["token_type_ids"], n, f"{path}:{line_no}")
        elif self.end_token_id is not None and ids[-1] == self.end_token_id:
            keep = [*range(n - 1), len(ids) - 1]
        else:
            keep = range(n)
        for field in TOKEN_FIELDS:
            if field in sample:
                values = sample[field]
                sample[field] = [values[i] for i in keep]


def pair_positions(types: list[int], n: int, where: str) -> list[int]:
    """Positions `[CLS] A [SEP] B [SEP]` keeps in n tokens: A's tail and B's head, both non-empty.

    The tokens nearest the junction are where the order of A and B shows; the label stays true
    because A still comes before (or, swapped, after) B in the document.
    """
    junction = types.index(1) if 1 in types else len(types)  # first token of B
    a, b = junction - 2, len(types) - junction - 1  # content tokens of A and of B
    layout = a >= 1 and b >= 1 and not any(types[:junction]) and all(types[junction:])
    budget = n - 3
    if not layout or budget < 2:
        reason = (f"data.max_seq_len={n} leaves no room for both segments" if layout else
                  "it is not [CLS] A [SEP] B [SEP] with token_type_ids 0 then 1")
        raise UserError(
            f"{where}: a sentence-order record longer than data.max_seq_len={n} cannot be cut: {reason}; "
            f"make the shards with trainer/prepare_train_data.py --objective sop --max_seq_len {n}"
        )
    keep_a = min(a, max(budget - b, (budget + 1) // 2))
    keep_b = budget - keep_a
    return [0, *range(junction - 1 - keep_a, junction), *range(junction, junction + keep_b), len(types) - 1]
