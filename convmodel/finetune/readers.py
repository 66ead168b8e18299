"""Reading labelled examples from the files users have: CoNLL columns, CSV/TSV and JSONL.

Every example keeps where it came from (file and line), so a later check (an unseen label, a
bad number) can name the line to fix. A mistake in a file raises one UserError naming
file:line and the option or edit that fixes it; nothing here knows about tokenizers or models.
"""

import csv
import json
import os
from dataclasses import dataclass
from typing import Literal

from convmodel.errors import UserError

FormatName = Literal["auto", "conll", "csv", "tsv", "jsonl"]
TaskName = Literal["token_classification", "sequence_classification", "regression"]
EXTENSIONS = {".conll": "conll", ".txt": "conll", ".iob": "conll", ".bio": "conll", ".csv": "csv", ".tsv": "tsv",
              ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class TaggedSentence:
    """One sentence of a token-classification file: words and their tags, and where it starts."""

    tokens: list[str]
    tags: list[str]
    where: str  # "file:line" of the sentence's first token
    line_per_token: bool = False  # CoNLL: token i is on the line i below the first

    def token_where(self, index: int) -> str:
        """file:line of token `index` (the sentence's line where a record holds the whole sentence)."""
        if not self.line_per_token:
            return self.where
        path, line = self.where.rsplit(":", 1)
        return f"{path}:{int(line) + index}"


@dataclass
class TextExample:
    """One example of a sequence task: a text (or a pair) and its label (a class name or a number)."""

    text: str
    text_pair: str | None
    label: str | float
    where: str


@dataclass
class Columns:
    """Where the fields are: CSV/TSV column names (with a header) or 0-based indices, JSONL keys.

    `token`/`tag` are the CoNLL columns (0-based; -1 is the last); `tokens`/`tags` the JSONL keys
    of a token-classification file.
    """

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    header: bool = True
    token: int = 0
    tag: int = -1
    tokens: str = "tokens"
    tags: str = "tags"


def file_format(path: str, format: str, option: str) -> str:
    """The format given, or the one the file's extension says (`auto`)."""
    if format != "auto":
        return format
    found = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if found is None:
        raise UserError(f"{option} {path}: cannot tell the format from the extension; give --data.format "
                        f"(conll, csv, tsv or jsonl)")
    return found


def read_examples(path: str, option: str, task: str, format: str, columns: Columns) -> list:
    """The examples in `path` (a TaggedSentence list for token classification, else TextExample)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: no such file")
    kind = file_format(path, format, option)
    if task == "token_classification":
        if kind == "conll":
            examples = read_conll(path, columns)
        elif kind == "jsonl":
            examples = read_tagged_jsonl(path, columns)
        else:
            raise UserError(f"{option} {path}: token classification reads conll or jsonl files, not {kind}; "
                            "convert it, or give --data.format conll|jsonl")
    elif kind in ("csv", "tsv"):
        examples = read_table(path, "," if kind == "csv" else "\t", columns, task)
    elif kind == "jsonl":
        examples = read_text_jsonl(path, columns, task)
    else:
        raise UserError(f"{option} {path}: {task} reads csv, tsv or jsonl files, not {kind}; give --data.format")
    if not examples:
        raise UserError(f"{option} {path} holds no examples")
    return examples


def read_conll(path: str, columns: Columns) -> list[TaggedSentence]:
    """Whitespace-separated columns, one token a line, a blank line between sentences; -DOCSTART- skipped."""
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in _lines(path):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                sentences.append(TaggedSentence(tokens, tags, f"{path}:{start}", True))
            tokens, tags = [], []
            continue
        try:
            token, tag = fields[columns.token], fields[columns.tag]
        except IndexError:
            raise UserError(f"{path}:{number}: {len(fields)} column(s) {line.strip()!r}, but --data.token_column "
                            f"{columns.token} and --data.tag_column {columns.tag} need more; a CoNLL line is "
                            "'TOKEN ... TAG', a blank line between sentences") from None
        if not tokens:
            start = number
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append(TaggedSentence(tokens, tags, f"{path}:{start}", True))
    return sentences


def read_tagged_jsonl(path: str, columns: Columns) -> list[TaggedSentence]:
    """`{"tokens": [...], "tags": [...]}` a line (the keys are --data.tokens_key and --data.tags_key)."""
    sentences = []
    for number, record in _records(path):
        tokens = _field(record, columns.tokens, path, number, "--data.tokens_key")
        tags = _field(record, columns.tags, path, number, "--data.tags_key")
        if not (isinstance(tokens, list) and isinstance(tags, list)):
            raise UserError(f"{path}:{number}: {columns.tokens!r} and {columns.tags!r} must be lists of strings")
        if len(tokens) != len(tags):
            raise UserError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags; give every token "
                            "exactly one tag")
        if tokens:
            sentences.append(TaggedSentence([str(t) for t in tokens], [str(t) for t in tags], f"{path}:{number}"))
    return sentences


def read_text_jsonl(path: str, columns: Columns, task: str) -> list[TextExample]:
    """`{"text": ..., "text_pair": ..., "label": ...}` a line (keys: --data.text_column, ...)."""
    examples = []
    for number, record in _records(path):
        text = _field(record, columns.text, path, number, "--data.text_column")
        pair = _field(record, columns.text_pair, path, number, "--data.text_pair_column") if columns.text_pair \
            else None
        label = _field(record, columns.label, path, number, "--data.label_column")
        examples.append(_example(text, pair, label, task, f"{path}:{number}"))
    return examples


def read_table(path: str, delimiter: str, columns: Columns, task: str) -> list[TextExample]:
    """CSV or TSV rows; columns by header name, or by 0-based index with --data.header false."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    wanted = {"--data.text_column": columns.text, "--data.label_column": columns.label}
    if columns.text_pair is not None:
        wanted["--data.text_pair_column"] = columns.text_pair
    first = 1
    if columns.header:
        if not rows:
            raise UserError(f"{path}:1: no header line; add one, or give --data.header false and column indices")
        header, first = rows[0], 2
        missing = [f"{option} {name!r}" for option, name in wanted.items() if str(name) not in header]
        if missing:
            raise UserError(f"{path}:1: the header {header} has no column {', '.join(missing)}; give the column "
                            "names the file has (or --data.header false and 0-based indices)")
        index = {option: header.index(str(name)) for option, name in wanted.items()}
    else:
        index = {}
        for option, name in wanted.items():
            try:
                index[option] = int(name)
            except ValueError:
                raise UserError(f"{path}: {option} {name!r} must be a 0-based column index with --data.header "
                                "false") from None
    examples = []
    for number, row in enumerate(rows[first - 1:], start=first):
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            cells = {option: row[i] for option, i in index.items()}
        except IndexError:
            raise UserError(f"{path}:{number}: {len(row)} column(s), but {', '.join(f'{o} {i}' for o, i in index.items())}"
                            " need more; check the delimiter (csv: ',', tsv: tab) and the column options") from None
        examples.append(_example(cells["--data.text_column"], cells.get("--data.text_pair_column"),
                                 cells["--data.label_column"], task, f"{path}:{number}"))
    return examples


def _example(text, pair, label, task: str, where: str) -> TextExample:
    if task == "regression":
        try:
            value = float(label)
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {label!r} is not a number, which regression needs; fix the line or "
                            "choose --data.task sequence_classification") from None
        return TextExample(str(text), None if pair is None else str(pair), value, where)
    return TextExample(str(text), None if pair is None else str(pair), str(label), where)


def _lines(path: str):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text ({exc.reason}); convert the file to UTF-8") from exc


def _records(path: str):
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not a JSON object ({exc.msg}); write one JSON object a line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object; write one JSON object a line")
        yield number, record


def _field(record: dict, key: str, path: str, number: int, option: str):
    if key not in record:
        raise UserError(f"{path}:{number}: no key {key!r} (keys: {sorted(record)}); give the key this file uses "
                        f"with {option}")
    return record[key]
