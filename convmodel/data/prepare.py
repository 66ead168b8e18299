"""Raw text -> JSONL shards of token ids for one pretraining objective (mlm, sop or clm).

Input text has one sentence (or paragraph) per line; a blank line ends a document. The work is
cut into chunks of whole documents (about CHUNK_BYTES each, cut at blank lines) so that even one
huge file keeps every worker busy. Chunk boundaries and the random choices inside a chunk depend
only on the input files and `seed`, and the parent writes chunk results in input order, so the
shards are the same for any `num_workers`.

Record layouts (one JSON object per line, see docs of `prepare_train_data`):
  mlm: {"input_ids": [CLS, ..., SEP]}           whole sentences packed up to max_seq_len
  clm: {"input_ids": [...]}                      whole sentences packed, EOS after each document
  sop: {"input_ids": [CLS, A.., SEP, B.., SEP], "token_type_ids": [0.., 1..],
        "sentence_order_label": 0 in order | 1 swapped}
"""

import glob
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from convmodel.errors import UserError

OBJECTIVES = ("mlm", "sop", "clm")
SHARD_PATTERN = "part-{:05d}.jsonl"
CHUNK_BYTES = 4 << 20
# How far past a chunk's nominal end we look for a blank line before cutting at a plain line end.
BOUNDARY_SEARCH_BYTES = 1 << 20
# Fewest tokens a record needs besides content: mlm [CLS] x [SEP], sop [CLS] a [SEP] b [SEP], clm x y.
MIN_SEQ_LEN = {"mlm": 3, "sop": 5, "clm": 2}


@dataclass(frozen=True)
class Chunk:
    """A byte range of one input file that starts and ends at line boundaries."""

    path: str
    start: int
    end: int
    index: int  # position among all chunks of the job; seeds the chunk's random choices


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    eos: int
    unk: int
    all: frozenset[int]


@dataclass
class Summary:
    records: int = 0
    tokens: int = 0
    shards: int = 0
    swapped: int = 0  # sop records with sentence_order_label 1


def expand_inputs(inputs: str | list[str] | tuple[str, ...]) -> list[str]:
    """Files named by `--input`: paths or globs, a list or a comma-separated string, in that order."""
    if not isinstance(inputs, list | tuple):  # fire turns `--input 2024` into an int
        inputs = str(inputs)
    patterns = inputs.split(",") if isinstance(inputs, str) else [str(p) for p in inputs]
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise UserError("--input is empty; give a text file, a glob such as 'corpus/*.txt' (quoted), or a list")
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"--input {pattern!r} matches no file; check the path (quote globs so the shell leaves them)")
        files.extend(m for m in matches if m not in files)
    return files


def split_into_chunks(path: str, first_index: int, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut a file into ranges of about `chunk_bytes`, each ending after a blank line where possible."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes)
            f.readline()  # finish the line we landed in
            cut = f.tell()
            while f.tell() - cut < BOUNDARY_SEARCH_BYTES:
                line = f.readline()
                if not line:
                    break
                if not line.strip():
                    cut = f.tell()
                    break
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return [Chunk(path, a, b, first_index + i) for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line holding byte `offset` (only needed to report an error)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def read_documents(chunk: Chunk) -> list[list[str]]:
    """The documents of a chunk as lists of non-blank lines; undecodable bytes -> UserError at file:line."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_number(chunk.path, chunk.start + exc.start)
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise UserError(
            f"{chunk.path}:{line}: not valid UTF-8 ({exc.reason} at byte {column} of the line); "
            "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove the line"
        ) from None
    if chunk.start == 0 and text.startswith("\ufeff"):
        text = text[1:]
    documents: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


def tokenize_documents(tokenizer, documents: list[list[str]], special: SpecialIds) -> list[list[list[int]]]:
    """Token ids per sentence per document, without specials; empty sentences are dropped.

    Raw text that spells a special token ("[SEP]", "<|endoftext|>") must not become that token:
    it would forge record structure, so such ids are replaced by [UNK].
    """
    lines = [line for doc in documents for line in doc]
    if not lines:
        return []
    encoded = tokenizer(lines, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    ids = iter(encoded["input_ids"])
    result = []
    for doc in documents:
        sentences = []
        for _ in doc:
            sentence = next(ids)
            if not special.all.isdisjoint(sentence):
                sentence = [special.unk if t in special.all else t for t in sentence]
            if sentence:
                sentences.append(sentence)
        if sentences:
            result.append(sentences)
    return result


def pack_sentences(
    documents: Iterable[list[list[int]]], budget: int, doc_separator: int | None = None, doc_end: int | None = None
) -> Iterator[list[int]]:
    """Pack whole sentences into sequences of at most `budget` tokens (RoBERTa FULL-SENTENCES).

    Sequences run across documents: `doc_end` (clm: EOS) is appended to each document's last
    sentence; `doc_separator` (mlm: [SEP]) goes between two documents sharing a sequence. A
    sentence longer than `budget` is cut into budget-sized pieces rather than dropped.
    """
    current: list[int] = []
    for doc in documents:
        sentences = list(doc)
        if doc_end is not None:
            sentences[-1] = sentences[-1] + [doc_end]
        for i, sentence in enumerate(sentences):
            glue = [doc_separator] if i == 0 and current and doc_separator is not None else []
            if len(current) + len(glue) + len(sentence) <= budget:
                current += glue + sentence
                continue
            if current:
                yield current
            while len(sentence) > budget:
                yield sentence[:budget]
                sentence = sentence[budget:]
            current = list(sentence)
    if current:
        yield current


def mlm_records(documents: list[list[list[int]]], special: SpecialIds, max_seq_len: int) -> Iterator[dict]:
    """[CLS] packed sentences [SEP]; documents sharing a record are separated by [SEP].

    Crossing document ends keeps records full (no padding spent on short documents); RoBERTa
    found FULL-SENTENCES within noise of stopping at document ends (DOC-SENTENCES).
    """
    for content in pack_sentences(documents, max_seq_len - 2, doc_separator=special.sep):
        yield {"input_ids": [special.cls, *content, special.sep]}


def clm_records(documents: list[list[list[int]]], special: SpecialIds, max_seq_len: int) -> Iterator[dict]:
    """Packed sentences with EOS closing each document, GPT-2 style (no [CLS])."""
    for content in pack_sentences(documents, max_seq_len, doc_end=special.eos):
        yield {"input_ids": content}


def _split_pair(chunk: list[list[int]], rng: random.Random) -> tuple[list[int], list[int]] | None:
    """Segments A and B of a chunk in document order: cut at a random sentence boundary, or inside
    the only sentence; None when a lone sentence has fewer than two tokens."""
    if len(chunk) >= 2:
        a_end = rng.randint(1, len(chunk) - 1)
        return [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s]
    tokens = chunk[0]
    if len(tokens) < 2:
        return None
    cut = rng.randint(1, len(tokens) - 1)
    return tokens[:cut], tokens[cut:]


def _truncate_pair(a: list[int], b: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Trim the longer segment from its outer end (A's front, B's back) until both fit `limit`.

    Keeping the A|B junction intact keeps the sentence-order signal: the in-order concatenation
    is always a contiguous span of the document.
    """
    cut_a = cut_b = 0
    while len(a) - cut_a + len(b) - cut_b > limit:
        if len(a) - cut_a > len(b) - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return a[cut_a:], b[: len(b) - cut_b]


def sop_records(
    documents: list[list[list[int]]], special: SpecialIds, max_seq_len: int, rng: random.Random, short_seq_prob: float
) -> Iterator[dict]:
    """ALBERT sentence-order pairs: A and B are consecutive spans of one document, swapped with p=0.5.

    Sentences are accumulated into a chunk up to a target length (max_seq_len - 3, or with
    probability `short_seq_prob` a random shorter one), the chunk is cut into A and B, and the pair
    is trimmed to fit. B is always the text that follows A, never a copy of it.
    """
    limit = max_seq_len - 3
    for doc in documents:
        sentences = [s[i : i + limit] for s in doc for i in range(0, len(s), limit)]
        target = limit if rng.random() >= short_seq_prob else rng.randint(2, limit)
        chunk: list[list[int]] = []
        length = 0
        for i, sentence in enumerate(sentences):
            chunk.append(sentence)
            length += len(sentence)
            if i < len(sentences) - 1 and length < target:
                continue
            pair = _split_pair(chunk, rng)
            chunk, length = [], 0
            target = limit if rng.random() >= short_seq_prob else rng.randint(2, limit)
            if pair is None:
                continue
            a, b = _truncate_pair(*pair, limit)
            swapped = rng.random() < 0.5
            if swapped:
                a, b = b, a
            yield {
                "input_ids": [special.cls, *a, special.sep, *b, special.sep],
                "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                "sentence_order_label": int(swapped),
            }


# --- worker side -------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(
    tokenizer_path: str, objective: str, max_seq_len: int, seed: int, short_seq_prob: float, in_pool: bool
) -> None:
    """Load the tokenizer once per worker process."""
    if in_pool:  # the processes are the parallelism; a thread pool in each would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from convmodel.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(
        tokenizer=tokenizer,
        special=special_ids(tokenizer, tokenizer_path),
        objective=objective,
        max_seq_len=max_seq_len,
        seed=seed,
        short_seq_prob=short_seq_prob,
    )


def special_ids(tokenizer, tokenizer_path: str) -> SpecialIds:
    names = ("cls", "sep", "eos", "unk")
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in names}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise UserError(
            f"--tokenizer {tokenizer_path}: no {', '.join(m + '_token' for m in missing)}; "
            "make the tokenizer with trainer/train_tokenizer.py"
        )
    return SpecialIds(**ids, all=frozenset(tokenizer.all_special_ids))


def process_chunk(chunk: Chunk) -> tuple[list[str], int, int, int]:
    """One chunk -> (JSON lines, tokens, swapped pairs, bytes read)."""
    w = _WORKER
    documents = tokenize_documents(w["tokenizer"], read_documents(chunk), w["special"])
    if w["objective"] == "mlm":
        records = mlm_records(documents, w["special"], w["max_seq_len"])
    elif w["objective"] == "clm":
        records = clm_records(documents, w["special"], w["max_seq_len"])
    else:
        rng = random.Random(f"{w['seed']}/{chunk.index}")
        records = sop_records(documents, w["special"], w["max_seq_len"], rng, w["short_seq_prob"])
    lines, tokens, swapped = [], 0, 0
    for record in records:
        lines.append(json.dumps(record, separators=(",", ":")))
        tokens += len(record["input_ids"])
        swapped += record.get("sentence_order_label", 0)
    return lines, tokens, swapped, chunk.end - chunk.start


# --- parent side -------------------------------------------------------------------------------


class ShardWriter:
    """Writes JSON lines into part-00000.jsonl, part-00001.jsonl, ... `shard_size` lines each."""

    def __init__(self, output_dir: str, shard_size: int):
        self.output_dir = output_dir
        self.shard_size = shard_size
        self.paths: list[str] = []
        self._file = None
        self._lines_in_shard = 0

    def write(self, lines: list[str]) -> None:
        for line in lines:
            if self._file is None or self._lines_in_shard == self.shard_size:
                self._next_shard()
            self._file.write(line + "\n")
            self._lines_in_shard += 1

    def _next_shard(self) -> None:
        self.close()
        path = os.path.join(self.output_dir, SHARD_PATTERN.format(len(self.paths)))
        self.paths.append(path)
        self._file = open(path, "w", encoding="utf-8")
        self._lines_in_shard = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)


def _start_pool(workers: int, init_args: tuple):
    """Worker processes, each with its own tokenizer.

    fork where the OS has it: workers start with transformers already imported (spawn pays
    seconds per worker to import it again). They use no torch and none of the parent's threads.
    """
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=init_args)


def _check_options(objective: str, max_seq_len: int, shard_size: int, num_workers: int | None, short_seq_prob: float) -> None:
    problems = []
    if objective not in OBJECTIVES:
        problems.append(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    elif not isinstance(max_seq_len, int) or max_seq_len < MIN_SEQ_LEN[objective]:
        problems.append(f"--max_seq_len must be an integer >= {MIN_SEQ_LEN[objective]} for {objective}, got {max_seq_len!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        problems.append(f"--shard_size must be a positive number of records, got {shard_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        problems.append(f"--num_workers must be >= 0 (0 or 1: tokenize in this process), got {num_workers!r}")
    if not 0.0 <= short_seq_prob <= 1.0:
        problems.append(f"--short_seq_prob must be within [0, 1], got {short_seq_prob!r}")
    if problems:
        raise UserError("; ".join(problems))


def _existing_shards(output_dir: str, overwrite: bool) -> list[str]:
    """Shards already in output_dir (UserError unless overwrite); nothing is changed yet."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file; give a directory")
    existing = sorted(glob.glob(os.path.join(output_dir, "part-*.jsonl")))
    if existing and not overwrite:
        raise UserError(
            f"--output_dir {output_dir} already holds {len(existing)} shard(s) ({os.path.basename(existing[0])}, ...); "
            "pass --overwrite to replace them or choose another directory"
        )
    return existing


def prepare_train_data(
    input: str | list[str],
    tokenizer: str,
    output_dir: str,
    objective: str = "mlm",
    max_seq_len: int = 128,
    shard_size: int = 10000,
    num_workers: int | None = None,
    seed: int = 0,
    short_seq_prob: float = 0.1,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
) -> Summary:
    """Tokenize text files into JSONL shards for pretraining.

    Args:
        input: text files or quoted globs (a list, or comma-separated); one sentence per line,
            a blank line between documents.
        tokenizer: tokenizer directory made by train_tokenizer.py.
        output_dir: where part-00000.jsonl, part-00001.jsonl, ... are written.
        objective: mlm (BERT/RoBERTa), sop (ALBERT: MLM + sentence order) or clm (GPT-2).
        max_seq_len: most tokens per record, special tokens included.
        shard_size: records per shard file.
        num_workers: processes tokenizing in parallel (default: all CPU cores).
        seed: seeds the sop segment cuts and swaps; same inputs and seed give the same shards.
        short_seq_prob: sop only: share of pairs given a random shorter target length.
        overwrite: replace shards already in output_dir.
        chunk_bytes: size of the units of parallel work (tests make it small).
        progress: show a tqdm bar over input bytes.
    """
    from tqdm import tqdm

    from convmodel.tokenization import load_tokenizer

    _check_options(objective, max_seq_len, shard_size, num_workers, short_seq_prob)
    files = expand_inputs(input)
    existing = _existing_shards(output_dir, overwrite)
    special_ids(load_tokenizer(tokenizer), tokenizer)  # a bad tokenizer fails here, before any change
    os.makedirs(output_dir, exist_ok=True)
    for path in existing:
        os.remove(path)

    chunks: list[Chunk] = []
    for path in files:
        chunks.extend(split_into_chunks(path, len(chunks), chunk_bytes))
    total_bytes = sum(c.end - c.start for c in chunks)
    workers = min(num_workers or os.cpu_count() or 1, max(len(chunks), 1))
    init_args = (tokenizer, objective, max_seq_len, seed, short_seq_prob, workers > 1)

    summary = Summary()
    writer = ShardWriter(output_dir, shard_size)
    # the pool starts before tqdm's monitor thread exists, so fork copies a single-threaded process
    pool = _start_pool(workers, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"prepare {objective}", disable=not progress)
    try:
        results = pool.imap(process_chunk, chunks) if pool is not None else map(process_chunk, chunks)
        for lines, tokens, swapped, nbytes in results:
            writer.write(lines)
            summary.records += len(lines)
            summary.tokens += tokens
            summary.swapped += swapped
            bar.update(nbytes)
    except BaseException:
        writer.remove()
        raise
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.shards = len(writer.paths)
    return summary


def format_summary(summary: Summary, objective: str, output_dir: str) -> str:
    text = (
        f"wrote {summary.records} {objective} records ({summary.tokens} tokens) "
        f"in {summary.shards} shard(s) to {output_dir}"
    )
    if objective == "sop" and summary.records:
        text += f"; {summary.swapped / summary.records:.1%} of pairs swapped"
    return text


def main(argv: list[str] | None = None) -> None:
    """Entry point of trainer/prepare_train_data.py: flags checked first, errors a user can fix in one line."""
    import sys

    from convmodel.tokenization import join_input_arguments
    from convmodel.tool_cli import run_tool

    def run(
        input: str | list[str],
        tokenizer: str,
        output_dir: str,
        objective: str = "mlm",
        max_seq_len: int = 128,
        shard_size: int = 10000,
        num_workers: int | None = None,
        seed: int = 0,
        short_seq_prob: float = 0.1,
        overwrite: bool = False,
    ) -> None:
        """Tokenize text (one sentence per line, blank line between documents) into JSONL shards.

        Args:
            input: text files or quoted globs (a list, or comma-separated).
            tokenizer: tokenizer directory made by train_tokenizer.py.
            output_dir: where part-00000.jsonl, ... are written.
            objective: mlm, sop or clm.
            max_seq_len: most tokens per record, special tokens included.
            shard_size: records per shard file.
            num_workers: processes tokenizing in parallel (default: all CPU cores).
            seed: seeds the sop segment cuts and swaps.
            short_seq_prob: sop only: share of pairs given a random shorter target length.
            overwrite: replace shards already in output_dir.
        """
        tokenizer, output_dir = str(tokenizer), str(output_dir)  # fire reads `--output_dir 2024` as an int
        summary = prepare_train_data(
            input, tokenizer, output_dir, objective, max_seq_len, shard_size, num_workers, seed, short_seq_prob, overwrite
        )
        print(format_summary(summary, objective, output_dir))

    # `--input a.txt b.txt` (a glob the shell expanded) as one comma-separated --input
    run_tool(run, join_input_arguments(sys.argv[1:] if argv is None else argv), "prepare_train_data.py")
