"""Seconds per collaborative step for two bert-tiny peers on 127.0.0.1 (configs/collaborative/bert-tiny.yaml).

Builds a tokenizer and MLM shards from the Python docs (no download), starts two trainer.py
processes as users start them, and reads each peer's `collab/samples_per_second` (target batch /
seconds between consecutive collaborative epochs) from TensorBoard. Prints the median seconds per
step with two peers and the number of failed averaging rounds.

    python bench/collaborative_step.py [--epochs 20] [--target_batch_size 128]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path) -> tuple[str, Path]:
    import pydoc_data.topics

    from convmodel.data import prepare_train_data
    from convmodel.tokenization import train_tokenizer

    paragraphs = [" ".join(p.split()) for t in pydoc_data.topics.topics.values() for p in t.split("\n\n")]
    docs = [p for p in paragraphs if len(p) > 200][:500]
    (root / "train.txt").write_text("\n\n".join(d.replace(". ", ".\n") for d in docs) + "\n")
    tokenizer = train_tokenizer(str(root / "train.txt"), str(root / "tokenizer"), vocab_size=400)
    prepare_train_data(str(root / "train.txt"), tokenizer, str(root / "shards"), objective="mlm", max_seq_len=64,
                       num_workers=1, progress=False)
    return tokenizer, root / "shards"


def peer(workdir: Path, tokenizer: str, shards: Path, epochs: int, target: int, extra: list[str]):
    workdir.mkdir(parents=True)
    model = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
    args = ["--config", str(REPO / "configs/collaborative/bert-tiny.yaml"), "--data.tokenizer", tokenizer,
            "--data.train_files", str(shards / "part-*.jsonl"), "--data.val_files", "null",
            "--data.test_files", "null", "--data.max_seq_len", "64", "--data.batch_size", "8",
            "--model.init_args.config", json.dumps(model), "--trainer.max_steps", "100000",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", "runs", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false",
            "--trainer.strategy.init_args.target_batch_size", str(target),
            "--trainer.strategy.init_args.max_collaborative_epochs", str(epochs),
            "--trainer.strategy.init_args.peers_file", "peers.txt", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "output.log", "w")
    return subprocess.Popen([sys.executable, str(REPO / "trainer/trainer.py"), *args], cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target_batch_size", type=int, default=128)
    args = parser.parse_args()
    from convmodel.run_summary import latest_version_dir, read_scalars

    root = Path(tempfile.mkdtemp(prefix="collab-bench-"))
    tokenizer, shards = make_data(root)
    procs = []
    try:
        procs.append(peer(root / "a", tokenizer, shards, args.epochs, args.target_batch_size, []))
        deadline = time.monotonic() + 300
        while not (root / "a/peers.txt").exists() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        address = (root / "a/peers.txt").read_text().split()[0]
        procs.append(peer(root / "b", tokenizer, shards, args.epochs, args.target_batch_size,
                          ["--trainer.strategy.init_args.initial_peers", json.dumps([address])]))
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for name in ("a", "b"):
        out = (root / name / "output.log").read_text()
        together = [int(e) for e in re.findall(r"collaborative epoch (\d+) \(2 peers", out)]
        rates = [v for _, v in read_scalars(latest_version_dir(str(root / name / "runs")), "collab/samples_per_second")]
        distinct = [v for i, v in enumerate(rates) if i == 0 or rates[i - 1] != v]
        seconds = [args.target_batch_size / v for v in distinct[-len(together):]] if together else []
        failed = len(re.findall(r"\[ERROR\].*Averaging step failed", out))
        dropped = out.count("of input tensors")
        median = f"{statistics.median(seconds):.2f}" if seconds else "n/a"
        print(f"peer {name}: {len(together)} collaborative steps with 2 peers, median {median} s per step, "
              f"failed averaging rounds {failed}, rounds with dropped parts {dropped}")


if __name__ == "__main__":
    main()
