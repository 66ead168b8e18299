"""The benchmarks' input: the sample corpus, its tokenizer and MLM shards, built once under work/bench.

Both benchmarks measure on real text, the same text `make demo` trains on.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "work", "bench")


def sample_data(max_seq_len: int = 128) -> tuple[str, str]:
    """(tokenizer dir, train shard glob), made with the project's own tools if missing."""
    text, tokenizer = os.path.join(WORK, "text"), os.path.join(WORK, "tokenizer")
    shards = os.path.join(WORK, f"shards-mlm-{max_seq_len}")
    if not os.path.exists(os.path.join(text, "train.txt")):
        subprocess.run([sys.executable, "data/make_sample_corpus.py", "--output_dir", text], cwd=ROOT, check=True)
    if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        from convmodel.tokenization import train_tokenizer

        train_tokenizer(os.path.join(text, "train.txt"), tokenizer, vocab_size=8000)
    if not os.path.isdir(shards):
        from convmodel.data.prepare import prepare_train_data

        prepare_train_data(os.path.join(text, "train.txt"), tokenizer, shards, objective="mlm",
                           max_seq_len=max_seq_len, shard_size=1000)
    return tokenizer, os.path.join(shards, "part-*.jsonl")
