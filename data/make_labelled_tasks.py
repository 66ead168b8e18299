"""Build two small labelled tasks, offline, from the text the sample corpus is made of.

Fine-tuning needs labelled data, and every machine that runs convmodel has the prose of Python's
standard library (data/make_sample_corpus.py cleans it into sentences). Labels that follow from
where a sentence comes from, or from what its words name, can be derived without a person:

    package/{train,dev,test}.jsonl  sentence classification: which of a few top-level packages
                                    (asyncio, email, ...) the docstring a sentence comes from belongs
                                    to; {"text": ..., "label": ...} a line, the same number per class.
    modules/{train,dev,test}.conll  NER-style tagging, one 'TOKEN TAG' line, a blank line between
                                    sentences. Words split at punctuation, so `os.path.join` is five
                                    tokens. Two entity types, B-/I- tagged:
                                      MOD   a dotted name that is a stdlib module (`os.path`,
                                            `email.message`), or a bare module name used as one:
                                            next to "module(s)"/"package" or after "import"
                                            ("the time module" is MOD, "the time it takes" is not);
                                      ATTR  a dotted name under a stdlib module that is not a module
                                            itself (`os.path.join`, `sys.argv`).
                                    Half as many sentences without entities as with, chosen first
                                    among those holding a module name used as a plain word.

Both split by docstring (a docstring's sentences stay in one split), 80/10/10, shuffled with
`--seed`, so the same Python gives the same files. The standard library only:

    python data/make_labelled_tasks.py --output_dir work/tasks

Note: these docstrings are also the sample corpus's pretraining text (as Wikipedia is both
BERT's pretraining text and the source of many benchmarks); the labels are never seen there.
"""

import argparse
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterable

_spec = importlib.util.spec_from_file_location(
    "make_sample_corpus", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sample_corpus.py"))
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

PACKAGES = ("asyncio", "email", "tkinter", "logging", "unittest", "xml")
TOKEN = re.compile(r"\w+|[^\w\s]")
DOTTED = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
MODULE_WORDS_AFTER = {"module", "modules", "package", "packages"}  # "the time module"
MODULE_WORDS_BEFORE = {"module", "package", "import"}              # "module time", "import time"
SPLITS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder for package/ and modules/")
    parser.add_argument("--per_class", type=int, default=400,
                        help="classification sentences per package, all splits together")
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated top-level packages (classes)")
    parser.add_argument("--ner_sentences", type=int, default=3000, help="most tagging sentences, all splits together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    args = parser.parse_args()
    packages = [p for p in args.packages.split(",") if p]
    try:
        build_tasks(args.output_dir, packages, args.per_class, args.ner_sentences, args.seed)
    except OSError as exc:
        sys.exit(f"error: cannot write the tasks to --output_dir {args.output_dir}: {exc}")


def build_tasks(output_dir: str, packages: list[str], per_class: int = 400, ner_sentences: int = 3000,
                seed: int = 0, stdlib: str | None = None, only: Iterable[str] | None = None) -> dict[str, str]:
    """Write both tasks into output_dir; their folders. `only` limits the files read to those top-level names."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    names = module_names(stdlib)
    documents = documents_by_top(stdlib, set(only) if only is not None else None)
    missing = [p for p in packages if p not in documents]
    if missing:
        raise SystemExit(f"error: no docstrings for --packages {','.join(missing)} under {stdlib}")
    package_dir = os.path.join(output_dir, "package")
    write_classification(package_dir, {p: documents[p] for p in packages}, per_class, seed)
    modules_dir = os.path.join(output_dir, "modules")
    all_documents = [doc for top in sorted(documents) for doc in documents[top]]
    write_tagging(modules_dir, all_documents, names, ner_sentences, seed)
    return {"package": package_dir, "modules": modules_dir}


def module_names(stdlib: str) -> set[str]:
    """Dotted names of the standard library's modules and packages (public ones, no leading _)."""
    names = {name for name in getattr(sys, "stdlib_module_names", ()) if not name.startswith("_")}
    for path in corpus.sorted_files(stdlib):
        if not path.endswith(".py") or corpus.is_test(path):
            continue
        parts = os.path.relpath(path, stdlib)[:-3].split(os.sep)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() and not p.startswith("_") for p in parts):
            names.add(".".join(parts))
    return names


def documents_by_top(stdlib: str, only: set[str] | None) -> dict[str, list[list[str]]]:
    """{top-level module: its docstrings, each a list of prose sentences}, outside the test folders."""
    found: dict[str, list[list[str]]] = {}
    for path in corpus.sorted_files(stdlib):
        if not path.endswith(".py") or corpus.is_test(path):
            continue
        top = os.path.relpath(path, stdlib).split(os.sep)[0].removesuffix(".py")
        if only is not None and top not in only:
            continue
        for text in corpus.docstrings(path):
            sentences = corpus.prose_sentences(text)
            if sentences:
                found.setdefault(top, []).append(sentences)
    return found


def split_documents(documents: list[list[str]], total: int, rng: random.Random) -> dict[str, list[str]]:
    """Up to `total` unique sentences split 80/10/10 with each docstring in one split (dev, test first)."""
    documents = list(documents)
    rng.shuffle(documents)
    quotas = {name: int(round(share * total)) for name, share in SPLITS}
    quotas["train"] = total - quotas["dev"] - quotas["test"]
    splits: dict[str, list[str]] = {name: [] for name, _ in SPLITS}
    order = ["test", "dev", "train"]
    seen: set[str] = set()
    for document in documents:
        fresh = [s for s in dict.fromkeys(document) if s not in seen]
        if not order or not fresh:
            continue
        split = order[0]
        seen.update(fresh)
        splits[split].extend(fresh[: quotas[split] - len(splits[split])])
        if len(splits[split]) >= quotas[split]:
            order.pop(0)
    return splits


def write_classification(folder: str, documents: dict[str, list[list[str]]], per_class: int, seed: int) -> None:
    """package/{train,dev,test}.jsonl, the same number of sentences per package in each split."""
    rng = random.Random(seed)
    per_package = {p: split_documents(docs, per_class, rng) for p, docs in documents.items()}
    os.makedirs(folder, exist_ok=True)
    for split, _ in SPLITS:
        n = min(len(s[split]) for s in per_package.values())  # balanced, even where a package falls short
        records = [{"text": text, "label": p} for p, s in per_package.items() for text in s[split][:n]]
        rng.shuffle(records)
        path = os.path.join(folder, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{path}: {len(records)} sentences, {n} per package ({', '.join(documents)})")


def tag_sentence(sentence: str, names: set[str]) -> tuple[list[str], list[str], bool]:
    """(tokens, B-/I- tags, whether a module name stands there as a plain word)."""
    matches = list(TOKEN.finditer(sentence))
    tokens = [m.group() for m in matches]
    tags = ["O"] * len(tokens)
    start_of = {m.start(): i for i, m in enumerate(matches)}
    end_of = {m.end(): i for i, m in enumerate(matches)}
    covered: set[int] = set()
    for dotted in DOTTED.finditer(sentence):
        parts = dotted.group().split(".")
        if dotted.group() in names:
            kind = "MOD"
        elif any(".".join(parts[:k]) in names for k in range(1, len(parts))):
            kind = "ATTR"
        else:
            continue
        first, last = start_of[dotted.start()], end_of[dotted.end()]
        tags[first: last + 1] = [f"B-{kind}"] + [f"I-{kind}"] * (last - first)
        covered.update(range(first, last + 1))
    plain_use = False
    for i, token in enumerate(tokens):
        if i in covered or token not in names or "." in token:
            continue
        after = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
        before = tokens[i - 1].lower() if i else ""
        if after in MODULE_WORDS_AFTER or before in MODULE_WORDS_BEFORE:
            tags[i] = "B-MOD"
        elif len(token) > 2 and token.islower():
            plain_use = True  # "time", "string", "copy" as English words: O, and only context says so
    return tokens, tags, plain_use


def write_tagging(folder: str, documents: list[list[str]], names: set[str], total: int, seed: int) -> None:
    """modules/{train,dev,test}.conll: sentences with entities, and half as many without."""
    rng = random.Random(seed + 1)
    tagged = {}
    for document in documents:
        for sentence in document:
            if sentence not in tagged:
                tagged[sentence] = tag_sentence(sentence, names)
    positive = [s for s, (_, tags, _) in tagged.items() if any(t != "O" for t in tags)]
    hard = [s for s, (_, tags, plain) in tagged.items() if plain and all(t == "O" for t in tags)]
    easy = [s for s, (_, tags, plain) in tagged.items() if not plain and all(t == "O" for t in tags)]
    rng.shuffle(hard)
    rng.shuffle(easy)
    n_positive = min(len(positive), total * 2 // 3)
    positive = rng.sample(positive, n_positive)
    chosen = set(positive) | set((hard + easy)[: n_positive // 2])
    kept = [[s for s in document if s in chosen] for document in documents]
    splits = split_documents([d for d in kept if d], len(chosen), rng)
    os.makedirs(folder, exist_ok=True)
    for split, sentences in splits.items():
        path = os.path.join(folder, f"{split}.conll")
        with open(path, "w", encoding="utf-8") as f:
            for sentence in sentences:
                tokens, tags, _ = tagged[sentence]
                f.write("".join(f"{token} {tag}\n" for token, tag in zip(tokens, tags)) + "\n")
        n_entities = sum(t.startswith("B-") for s in sentences for t in tagged[s][1])
        print(f"{path}: {len(sentences)} sentences, {n_entities} entities")


if __name__ == "__main__":
    main()
