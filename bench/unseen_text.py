"""Do the tiny configs learn on English the project has never seen? Nats below the frequency-only baseline.

`make demo` tunes nothing on its own corpus that a user's text would not also get: this runs
the shipped configs/bert-tiny.yaml and configs/gpt2-tiny.yaml, unchanged but for the data
paths, on another few MB of English, with the demo's tokenizer size (4000) and shard lengths
(64 tokens for BERT, 128 for GPT-2), and prints how far each model's last val/loss is below `val/unigram_baseline` (the loss of
a model that knows only token frequencies). Target: BERT >= 0.5 nat, GPT-2 >= 2 nats.

The default text is Debian's fortune cookies and the Jargon File (3.7 MB; packages `fortunes`
and `jargon-text`: `apt-get install fortunes jargon-text`): quotations, jokes and definitions,
nothing like the docstrings of the sample corpus. Any folder with train.txt and valid.txt in the
corpus format (one paragraph a line, a blank line between documents) works too, and
`--source man` takes 4 MB of the machine's own section-1 manual pages instead (technical prose,
closer to the docstrings; rendered with `man`):

    python bench/unseen_text.py [--source fortunes|man | --text_dir DIR] [--workdir work/unseen]
"""

import argparse
import gzip
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNES = "/usr/share/games/fortunes"
JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


def debian_documents() -> list[str]:
    """One document per fortune cookie and per Jargon File paragraph of at least 8 words."""
    if not (os.path.isdir(FORTUNES) and os.path.isfile(JARGON)):
        sys.exit("error: no default text; apt-get install fortunes jargon-text, or give --text_dir")
    texts = []
    for name in sorted(os.listdir(FORTUNES)):
        path = os.path.join(FORTUNES, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or name in ("art", "ascii-art"):
            continue  # index files, links and ASCII drawings
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.extend(f.read().split("\n%\n"))
    with gzip.open(JARGON, "rt", encoding="utf-8", errors="replace") as f:
        texts.extend(re.split(r"\n\s*\n", f.read()))
    return [" ".join(t.split()) for t in texts if len(t.split()) >= 8]


def man_documents(limit_chars: int = 4_000_000) -> list[str]:
    """Section-1 manual pages in a fixed random order, one document each, until `limit_chars`."""
    folder = "/usr/share/man/man1"
    pages = sorted(os.listdir(folder))
    random.Random(0).shuffle(pages)
    documents, size = [], 0
    for page in pages:
        if size > limit_chars:
            break
        try:
            text = subprocess.run(["man", "-l", "--nh", "--nj", "-P", "cat", os.path.join(folder, page)],
                                  capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "MANWIDTH": "100000"}).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = re.sub(r".\x08", "", text)  # overstrike bold/underline
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 8]
        if len(paragraphs) >= 3:
            documents.append("\n".join(paragraphs))
            size += sum(map(len, paragraphs))
    return documents


def write_corpus(folder: str, read_documents: Callable[[], list[str]]) -> None:
    documents = read_documents()
    random.Random(0).shuffle(documents)
    k = len(documents) // 20  # 5% validation, the rest training (as the sample corpus)
    os.makedirs(folder, exist_ok=True)
    for split, docs in (("valid", documents[:k]), ("train", documents[k:])):
        with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("fortunes", "man"), default="fortunes",
                        help="the default text: Debian's fortunes + Jargon File, or manual pages")
    parser.add_argument("--text_dir", help="folder with train.txt and valid.txt (instead of --source)")
    parser.add_argument("--workdir", default="work/unseen")
    args = parser.parse_args()
    work = os.path.join(ROOT, args.workdir)
    text = args.text_dir or os.path.join(work, "text")
    if not args.text_dir:
        write_corpus(text, debian_documents if args.source == "fortunes" else man_documents)
    tokenizer = os.path.join(work, "tokenizer")
    run("trainer/train_tokenizer.py", "--input", f"{text}/train.txt", "--output_dir", tokenizer, "--vocab_size", "4000")
    results = {}
    for model, objective, length in (("bert-tiny", "mlm", "64"), ("gpt2-tiny", "clm", "128")):
        shards = os.path.join(work, "shards", objective)
        for split in ("train", "valid"):
            run("trainer/prepare_train_data.py", "--input", f"{text}/{split}.txt", "--tokenizer", tokenizer,
                "--output_dir", f"{shards}/{split}", "--objective", objective, "--max_seq_len", length,
                "--overwrite")
        logdir = os.path.join(work, "runs", model)
        run("trainer/trainer.py", "fit", "--config", f"configs/{model}.yaml", "--data.tokenizer", tokenizer,
            "--data.train_files", f"{shards}/train/part-*.jsonl", "--data.val_files", f"{shards}/valid/part-*.jsonl",
            "--data.test_files", "null", "--trainer.logger.init_args.save_dir", logdir,
            "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false")
        results[model] = below_baseline(logdir)
    for model, (step, loss, baseline) in results.items():
        print(f"{model}: val/loss {loss:.3f} at step {step}, baseline {baseline:.3f}: "
              f"{baseline - loss:.2f} nats below")


def below_baseline(logdir: str) -> tuple[int, float, float]:
    sys.path.insert(0, ROOT)
    from convmodel.run_summary import latest_version_dir, read_scalars

    run_dir = latest_version_dir(logdir)
    step, loss = read_scalars(run_dir, "val/loss")[-1]
    return step, loss, read_scalars(run_dir, "val/unigram_baseline")[-1][1]


if __name__ == "__main__":
    main()
