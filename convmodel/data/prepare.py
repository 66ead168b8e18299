"""Raw text -> JSONL shards of token ids for one pretraining objective (mlm, sop or clm), and a manifest.

Input text has one sentence (or paragraph) per line; a blank line ends a document. The work is
cut into chunks of whole documents (about CHUNK_BYTES each, cut at blank lines) so that even one
huge file keeps every worker busy. Workers read and tokenize chunks; for sop they also build the
pairs, whose random choices are seeded by the chunk's index. The parent takes the results in
input order, packs mlm/clm documents with one DocumentPacker over the whole input (so only the
very last record is short) and writes the shards. Chunk boundaries depend only on the input
files, so the shards are the same for any `num_workers` (and, for mlm and clm, any chunk size).
The record layouts are in convmodel/data/records.py.

`manifest.json` (convmodel/data/manifest.py) is written after the last shard is closed, and an
old one is deleted before anything else in the folder changes: an interrupted run leaves no
manifest that describes shards which are not there.
"""

import glob
import json
import os
import random
import signal
from dataclasses import dataclass, field

from convmodel.data.manifest import MANIFEST, Manifest, tokenizer_fingerprint, write_manifest
from convmodel.data.records import DocumentPacker, sop_records
from convmodel.data.shard_writer import ShardWriter, write_packed
from convmodel.errors import UserError
from convmodel.file_patterns import expand_file_patterns
from convmodel.special_ids import SpecialIds, special_ids_of

OBJECTIVES = ("mlm", "sop", "clm")
CHUNK_BYTES = 4 << 20
# How far past a chunk's nominal end we look for a blank line before cutting at a plain line end.
BOUNDARY_SEARCH_BYTES = 1 << 20
# Fewest tokens a record needs besides content: mlm [CLS] x [SEP], sop [CLS] a [SEP] b [SEP], clm x y.
MIN_SEQ_LEN = {"mlm": 3, "sop": 5, "clm": 2}
# The special tokens the records are built from (unk replaces specials spelled out in the text).
NEEDED_SPECIALS = ("cls", "sep", "eos", "unk")


@dataclass(frozen=True)
class Chunk:
    """A byte range of one input file that starts and ends at line boundaries."""

    path: str
    start: int
    end: int
    index: int  # position among all chunks of the job; seeds the chunk's random choices


@dataclass
class ChunkResult:
    """What a worker sends back: documents for the parent's packer (mlm, clm) or finished lines (sop)."""

    nbytes: int  # input bytes the chunk covered, for the progress bar
    documents: list[list[list[int]]] = field(default_factory=list)  # sentences of token ids per document
    lines: list[str] = field(default_factory=list)  # JSON records
    line_tokens: list[int] = field(default_factory=list)  # len(input_ids) of each line
    swapped: int = 0  # sop records with sentence_order_label 1


@dataclass
class Summary:
    """What a run made: the manifest it wrote (counts, padding) and, for sop, the swapped pairs."""

    manifest: Manifest
    output_dir: str
    swapped: int = 0


def split_into_chunks(path: str, first_index: int, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut a file into ranges of about `chunk_bytes`, each ending after a blank line where possible."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes)
            f.readline()  # finish the line we landed in
            cut = f.tell()  # a plain line end: only where a document runs past the whole search
            while f.tell() - cut < BOUNDARY_SEARCH_BYTES:
                line = f.readline()
                if not line or not line.strip():  # the file's end or a blank line ends the document
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


# --- worker side -------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, objective: str, max_seq_len: int, seed: int, short_seq_prob: float,
                 in_pool: bool, tokenizer=None) -> None:
    """Load the tokenizer once per worker process (the parent passes its own when it does the work)."""
    if in_pool:  # the processes are the parallelism; a thread pool in each would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # A forked worker inherits the parent's Python signal handlers. One that only sets a flag
        # (Lightning's, a trainer's Ctrl-C handler in the same process) made pool.terminate()'s
        # SIGTERM a no-op: the worker went back to waiting for work and the join never returned.
        # Ctrl-C is the parent's to handle; it terminates the pool.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if tokenizer is None:
        from convmodel.tokenization import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, special=special_ids_of(tokenizer), objective=objective,
                   max_seq_len=max_seq_len, seed=seed, short_seq_prob=short_seq_prob)


def process_chunk(chunk: Chunk) -> ChunkResult:
    """One chunk, tokenized: its documents (mlm, clm), or its sop records as JSON lines."""
    w = _WORKER
    documents = tokenize_documents(w["tokenizer"], read_documents(chunk), w["special"])
    result = ChunkResult(nbytes=chunk.end - chunk.start)
    if w["objective"] != "sop":
        result.documents = documents
        return result
    rng = random.Random(f"{w['seed']}/{chunk.index}")
    for record in sop_records(documents, w["special"], w["max_seq_len"], rng, w["short_seq_prob"]):
        result.lines.append(json.dumps(record, separators=(",", ":")))
        result.line_tokens.append(len(record["input_ids"]))
        result.swapped += record["sentence_order_label"]
    return result


# --- parent side -------------------------------------------------------------------------------


def _start_pool(workers: int, init_args: tuple):
    """Worker processes, each with its own tokenizer.

    fork where the OS has it and this process runs no other thread: workers start with
    transformers already imported (spawn pays seconds per worker to import it again). With other
    threads (a host process: hivemind's, a test runner's) a forked child can inherit a lock one of
    them held and wait on it forever, so those hosts get spawn. The workers are started with
    SIGTERM at its default, so that pool.terminate() stops them even when the host's own handler
    only sets a flag (a child stuck before its initializer keeps the handler it was born with).
    """
    import multiprocessing
    import threading

    fork = "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
    context = multiprocessing.get_context("fork" if fork else "spawn")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL) if in_main_thread else None
    try:
        return context.Pool(workers, initializer=_init_worker, initargs=init_args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _check_options(objective: str, max_seq_len: int, shard_size: int, num_workers: int | None, short_seq_prob: float,
                   chunk_bytes: int) -> None:
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
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        problems.append(f"--chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}")
    if problems:
        raise UserError("; ".join(problems))


def _existing_outputs(output_dir: str, overwrite: bool) -> list[str]:
    """Shards and manifest already in output_dir (UserError unless overwrite); nothing is changed yet."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file; give a directory")
    existing = sorted(glob.glob(os.path.join(output_dir, "part-*.jsonl"))) + glob.glob(os.path.join(output_dir, MANIFEST))
    if existing and not overwrite:
        names = ", ".join(os.path.basename(p) for p in existing[:2]) + (", ..." if len(existing) > 2 else "")
        raise UserError(f"--output_dir {output_dir} already holds shards ({names}); "
                        "pass --overwrite to replace them or choose another directory")
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
    """Tokenize text files into JSONL shards for pretraining, and write their manifest.json.

    Args:
        input: text files or quoted globs (a list, or comma-separated); one sentence per line,
            a blank line between documents.
        tokenizer: tokenizer directory made by train_tokenizer.py.
        output_dir: where part-00000.jsonl, part-00001.jsonl, ... and manifest.json are written.
        objective: mlm (BERT/RoBERTa), sop (ALBERT: MLM + sentence order) or clm (GPT-2).
        max_seq_len: most tokens per record, special tokens included.
        shard_size: records per shard file.
        num_workers: processes tokenizing in parallel (default: all CPU cores).
        seed: seeds the sop segment cuts and swaps; same inputs and seed give the same shards.
        short_seq_prob: sop only: share of pairs given a random shorter target length.
        overwrite: replace shards (and the manifest) already in output_dir.
        chunk_bytes: bytes of text per unit of parallel work (cut at a blank line near it).
        progress: show a progress bar over the input bytes (--noprogress: none).
    """
    from tqdm import tqdm

    from convmodel.tokenization import load_tokenizer, require_text

    tokenizer, output_dir = str(tokenizer), str(output_dir)  # fire reads `--output_dir 2024` as an int
    _check_options(objective, max_seq_len, shard_size, num_workers, short_seq_prob, chunk_bytes)
    files = expand_file_patterns("--input", input)
    existing = _existing_outputs(output_dir, overwrite)
    loaded = load_tokenizer(tokenizer)  # a bad tokenizer, then an input without text, fail before any change
    special = special_ids_of(loaded)
    special.require(NEEDED_SPECIALS, tokenizer)
    manifest = Manifest(objective, max_seq_len, tokenizer, special.vocab_size, tokenizer_fingerprint(tokenizer))
    require_text(files)
    os.makedirs(output_dir, exist_ok=True)
    for path in sorted(existing, key=lambda p: not p.endswith(MANIFEST)):  # the manifest goes first
        os.remove(path)

    chunks: list[Chunk] = []
    for path in files:
        chunks.extend(split_into_chunks(path, len(chunks), chunk_bytes))
    workers = min(num_workers or os.cpu_count() or 1, max(len(chunks), 1))
    init_args = (tokenizer, objective, max_seq_len, seed, short_seq_prob, workers > 1)

    summary = Summary(manifest, output_dir)
    writer = ShardWriter(output_dir, shard_size)
    packer = None if objective == "sop" else DocumentPacker(objective, special, max_seq_len)
    # the pool starts before tqdm's monitor thread exists, so fork copies a single-threaded process
    pool = _start_pool(workers, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args, tokenizer=loaded)
    bar = tqdm(total=sum(c.end - c.start for c in chunks), unit="B", unit_scale=True, desc=f"prepare {objective}",
               disable=not progress)
    try:
        for result in pool.imap(process_chunk, chunks) if pool is not None else map(process_chunk, chunks):
            for line, tokens in zip(result.lines, result.line_tokens):
                writer.write(line, tokens)
            for document in result.documents:
                write_packed(writer, packer.add(document))
            summary.swapped += result.swapped
            bar.update(result.nbytes)
        if packer is not None:
            write_packed(writer, packer.finish())
        writer.close()
        if not writer.paths:
            raise UserError(f"--input {', '.join(files)}: the text gave no {objective} record"
                            + (" (sop needs documents of at least 2 tokens)" if objective == "sop" else ""))
    except BaseException:
        writer.remove()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest.shards = writer.counts
    write_manifest(output_dir, manifest)
    return summary


def format_summary(summary: Summary) -> str:
    m = summary.manifest
    text = (f"wrote {m.records} {m.objective} records ({m.tokens} tokens) in {len(m.shards)} shard(s) "
            f"to {summary.output_dir}; padding {m.padding_fraction:.2%} of {m.max_seq_len}-token records")
    if m.objective == "sop" and m.records:
        text += f"; {summary.swapped / m.records:.1%} of pairs swapped"
    return text


def main(argv: list[str] | None = None) -> None:
    """Entry point of trainer/prepare_train_data.py: flags checked first, errors a user can fix in one line."""
    import sys

    from convmodel.tokenization import join_input_arguments
    from convmodel.tool_cli import run_tool

    # `--input a.txt b.txt` (a glob the shell expanded) as one comma-separated --input
    summary = run_tool(prepare_train_data, join_input_arguments(sys.argv[1:] if argv is None else argv),
                       "prepare_train_data.py")
    print(format_summary(summary))
