"""Build a small English sample corpus, offline, from the prose Python ships with.

Tests, the demo and smoke runs need real text, and every machine that runs convmodel already
has some: the docstrings of the standard library, the language reference that `pydoc` shows
(`pydoc_data.topics`) and the few .txt/.rst files beside them. This script turns them into
the text format that `prepare_train_data.py` and `train_tokenizer.py` read:

    one sentence per line, a blank line between documents (one docstring or topic = one document)

It drops what is not prose (doctests, code blocks, reST markup, argument tables), shuffles the
documents with `--seed`, and splits them 90/5/5 into train.txt, valid.txt and test.txt.
It uses the standard library only, so it runs before convmodel is installed:

    python data/make_sample_corpus.py --output_dir data/sample

How much text there is depends on the Python version: CPython 3.11 gives about 2.1 MB, less
than the 4 MB default target; the script then uses all of it and says so.
"""

import argparse
import ast
import os
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

# Folders of the standard library that hold no prose of their own (installed packages,
# compiled modules, the build configuration).
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
# Folders whose .txt files are test data (number tables, e-mails), not prose.
TEST_DIRS = {"test", "tests", "idle_test"}

# Section headers of Google/NumPy-style docstrings; what follows them is a table of names.
TABLE_HEADERS = re.compile(
    r"^(args|arguments|parameters|params|returns?|yields?|raises|attributes|keyword arguments|"
    r"examples?|usage|see also|notes?|methods|variables|functions|classes|exceptions|options)\s*:?\s*$",
    re.IGNORECASE,
)
UNDERLINE = re.compile(r"^\s*([=\-~^*+#`'\".:_])\1{2,}\s*$")
BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)]|\(\w\)|[a-z][.)])\s+")
# reST inline markup, from the most to the least specific.
ROLE = re.compile(r":[\w:.+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
LITERAL = re.compile(r"``([^`]+)``")
LINK = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{1,2}")
INTERPRETED = re.compile(r"`([^`]+)`")
STRONG = re.compile(r"\*\*(\S[^*]*?)\*\*")
EMPHASIS = re.compile(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.", "approx.", "resp.")
# A "plain word": letters, maybe an apostrophe or hyphen, maybe wrapped in brackets/quotes
# and followed by punctuation. Code (calls, operators, dotted names) is not.
PLAIN_WORD = re.compile(r"^[(\"'\[]?[A-Za-z]+(?:['’-][A-Za-z]+)*[)\"'\]]?[.,;:!?]?[)\"'\]]?$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder for train.txt, valid.txt, test.txt")
    parser.add_argument("--target_mb", type=float, default=4.0, help="stop after this many MB of text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    args = parser.parse_args()
    try:
        build_corpus(args.output_dir, target_mb=args.target_mb, seed=args.seed)
    except OSError as exc:
        sys.exit(f"error: cannot write the corpus to --output_dir {args.output_dir}: {exc}")


def build_corpus(output_dir: str, target_mb: float = 4.0, seed: int = 0) -> dict[str, int]:
    """Write train/valid/test.txt into output_dir; return the bytes written per split.

    The test suite's docstrings ("Test that ...") are the weakest prose and half the parsing
    time, so they are read only when the rest falls short of the target.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    target_bytes = int(target_mb * 1_000_000)
    documents = unique(cleaned_documents(stdlib, in_test_dirs=False))
    if size(documents) < target_bytes:
        documents = unique(documents + cleaned_documents(stdlib, in_test_dirs=True))
    random.Random(seed).shuffle(documents)

    chosen, total = [], 0
    for document in documents:
        if total >= target_bytes:
            break
        chosen.append(document)
        total += size([document])
    if not chosen:
        raise SystemExit(f"error: found no docstrings under {stdlib}; is this a full Python install?")

    n_heldout = max(1, len(chosen) // 20)
    splits = {
        "valid": chosen[:n_heldout],
        "test": chosen[n_heldout : 2 * n_heldout],
        "train": chosen[2 * n_heldout :],
    }
    os.makedirs(output_dir, exist_ok=True)
    sizes = {}
    for name, docs in splits.items():
        path = os.path.join(output_dir, f"{name}.txt")
        text = "\n\n".join(docs) + "\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        sizes[name] = len(text.encode("utf-8"))
        n_lines = sum(doc.count("\n") + 1 for doc in docs)
        print(f"{path}: {len(docs)} documents, {n_lines} lines, {sizes[name] / 1e6:.2f} MB")
    written = sum(sizes.values()) / 1e6
    if total < target_bytes:
        print(
            f"note: the Python at {stdlib} holds {written:.2f} MB of prose, less than --target_mb "
            f"{target_mb:g}; the corpus uses all of it."
        )
    return sizes


def unique(documents: Iterable[str]) -> list[str]:
    """Documents in order of first appearance, each once (many methods share one docstring)."""
    return list(dict.fromkeys(documents))


def size(documents: list[str]) -> int:
    """Bytes the documents take in a corpus file, separators included."""
    return sum(len(document.encode("utf-8")) + 1 for document in documents)


def cleaned_documents(stdlib: str, in_test_dirs: bool) -> list[str]:
    """The cleaned documents of the standard library, outside or inside its test folders.

    Each string is one document, one sentence a line. Files are parsed in parallel (parsing
    is most of the run time); `map` keeps their order.
    """
    files = [path for path in sorted_files(stdlib) if is_test(path) == in_test_dirs and is_source(path)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        per_file = pool.map(cleaned_file, files, chunksize=16)
        documents = [document for file_documents in per_file for document in file_documents]
    if not in_test_dirs:
        documents.extend(cleaned(pydoc_topics()))
    return documents


def is_test(path: str) -> bool:
    """Whether the file lies in one of the standard library's test folders."""
    return bool(TEST_DIRS.intersection(path.split(os.sep)))


def is_source(path: str) -> bool:
    """Python files anywhere; text files only outside test folders (those hold test data)."""
    return path.endswith(".py") or (path.endswith((".txt", ".rst")) and not is_test(path))


def cleaned_file(path: str) -> list[str]:
    """The cleaned documents of one file: its docstrings, or the whole text file as one."""
    if path.endswith(".py"):
        return cleaned(docstrings(path))
    try:
        with open(path, encoding="utf-8") as f:
            return cleaned([f.read()])
    except (OSError, UnicodeDecodeError):
        return []


def cleaned(raw_documents: Iterable[str]) -> list[str]:
    """Raw documents as prose, one sentence a line; documents left empty are dropped."""
    documents = []
    for raw in raw_documents:
        sentences = prose_sentences(raw)
        if sentences:
            documents.append("\n".join(sentences))
    return documents


def sorted_files(root: str) -> Iterator[str]:
    """All files under root in sorted order, so the corpus is the same on every run."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def docstrings(path: str) -> Iterator[str]:
    """Module, class and function docstrings of one Python file (none if it does not parse)."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules
            tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return  # the test suite ships files that are deliberately broken
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node)
            if text:
                yield text


def pydoc_topics() -> Iterator[str]:
    """The language reference pages that `help("for")` prints, one document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield topics[name]


def prose_sentences(text: str) -> list[str]:
    """The prose of one document as a list of sentences; code, tables and markup dropped."""
    sentences = []
    for paragraph in prose_paragraphs(text):
        for sentence in split_sentences(strip_markup(paragraph)):
            if is_prose(sentence):
                sentences.append(sentence)
    return sentences


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs (and list items) joined into one line each, skipping code and tables.

    A paragraph ends at a blank line. Skipped: doctests (from `>>>` to the paragraph's end),
    literal blocks (indented paragraphs after one ending in `::`), reST directives and
    comments (`.. `), section titles, and the tables after "Args:"-style headers.
    """
    paragraphs = re.split(r"\n\s*\n", text.expandtabs(4))
    base_indent = 0
    in_literal = in_table = False
    for paragraph in paragraphs:
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if in_literal and indent > base_indent:
            continue
        if in_table and indent > 0:
            continue
        in_literal = in_table = False
        base_indent = indent
        first = lines[0].strip()
        if first.startswith(".."):
            in_literal = True  # a directive's body is indented like a literal block
            continue
        if TABLE_HEADERS.match(first):
            in_table = True
            continue
        kept: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith((">>>", "...", "$ ", "%")):
                break  # a doctest or shell session runs to the end of the paragraph
            if UNDERLINE.match(stripped):
                if kept:
                    kept.pop()  # the title above the underline
                continue
            if stripped.startswith(":") or stripped.startswith("|"):
                continue  # field lists (":param x:") and line blocks
            if BULLET.match(line) and kept:
                yield " ".join(kept)
                kept = []
            kept.append(BULLET.sub("", stripped, count=1))
        if kept:
            joined = " ".join(kept)
            if joined.endswith("::"):
                in_literal = True
                joined = joined[:-2].rstrip() + ":"
            yield joined
        elif lines[-1].rstrip().endswith("::"):
            in_literal = True


def strip_markup(paragraph: str) -> str:
    """reST inline markup replaced by its text: :func:`os.open` -> os.open, ``x`` -> x."""
    text = ROLE.sub(lambda m: m.group(1).strip(), paragraph)
    text = LITERAL.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = INTERPRETED.sub(r"\1", text)
    text = STRONG.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def split_sentences(paragraph: str) -> list[str]:
    """Split at ". " before a capital, except after common abbreviations like "e.g."."""
    sentences: list[str] = []
    for piece in SENTENCE_END.split(paragraph):
        if sentences and sentences[-1].endswith(ABBREVIATIONS):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return [s.strip() for s in sentences if s.strip()]


def is_prose(sentence: str) -> bool:
    """At least four words, most of them plain words rather than code or symbols."""
    words = sentence.split()
    if len(words) < 4:
        return False
    plain = sum(1 for word in words if PLAIN_WORD.match(word))
    return plain >= 0.75 * len(words) and (sentence[0].isalnum() or sentence[0] in "\"'(")


if __name__ == "__main__":
    main()
