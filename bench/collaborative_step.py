"""Seconds per collaborative step for two peers on 127.0.0.1: the loopback config or the production options.

`--config loopback` is configs/collaborative/bert-tiny.yaml (AdamW, fp16 compression, nothing
delayed); `--config production` is configs/collaborative/lean-albert-tiny.yaml (the xlarge run's
options: offloaded 8-bit LAMB, delayed optimizer step and averaging, state averaged every 5
epochs, size-adaptive compression, clipping, bf16-mixed) with a LeanALBERT of the same width.
Builds a tokenizer and MLM shards from the Python docs (no download), starts two trainer.py
processes as users start them, and reads each peer's log: a line per collaborative epoch with the
seconds since the previous one (the same seconds as its `collab/samples_per_second` in TensorBoard).
Once both peers have logged `--epochs` collaborative epochs with 2 peers, both are stopped. Prints
the median seconds per step with two peers and the number of failed averaging rounds.

    python bench/collaborative_step.py [--config loopback|production] [--epochs 20] [--target_batch_size 128]
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# configs/collaborative/bert-tiny.yaml's model and data, made smaller still so that a step is milliseconds
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
# the production config's LeanALBERT at the same width and depth
TINY_ALBERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "embedding_size": 32, "max_position_embeddings": 64}
CONFIGS = {"loopback": ("configs/collaborative/bert-tiny.yaml", TINY_BERT),
           "production": ("configs/collaborative/lean-albert-tiny.yaml", TINY_ALBERT)}
BATCH_SIZE = 8
MAX_SEQ_LEN = 64


def make_data(root: Path) -> tuple[str, Path]:
    import pydoc_data.topics

    from convmodel.data import prepare_train_data
    from convmodel.tokenization import train_tokenizer

    paragraphs = [" ".join(p.split()) for t in pydoc_data.topics.topics.values() for p in t.split("\n\n")]
    docs = [p for p in paragraphs if len(p) > 200][:500]
    (root / "train.txt").write_text("\n\n".join(d.replace(". ", ".\n") for d in docs) + "\n")
    tokenizer = train_tokenizer(str(root / "train.txt"), str(root / "tokenizer"), vocab_size=400)
    prepare_train_data(str(root / "train.txt"), tokenizer, str(root / "shards"), objective="mlm",
                       max_seq_len=MAX_SEQ_LEN, num_workers=1, progress=False)
    return tokenizer, root / "shards"


def peer(workdir: Path, tokenizer: str, shards: Path, target: int, initial_peer: str | None,
         config: str = "loopback"):
    workdir.mkdir(parents=True)
    config_file, model = CONFIGS[config]
    args = ["--config", str(REPO / config_file), "--data.tokenizer", tokenizer,
            "--data.train_files", str(shards / "part-*.jsonl"), "--data.val_files", "null",
            "--data.test_files", "null", "--data.max_seq_len", str(MAX_SEQ_LEN),
            "--data.batch_size", str(BATCH_SIZE), "--model.init_args.config", json.dumps(model),
            "--trainer.max_steps", "100000",
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", "runs", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false",
            "--trainer.strategy.init_args.target_batch_size", str(target),
            # the bench stops the peers: peer a alone may race through many epochs before b has started
            "--trainer.strategy.init_args.max_collaborative_epochs", "100000",
            "--trainer.strategy.init_args.peers_file", "peers.txt"]
    if initial_peer:
        args += ["--trainer.strategy.init_args.initial_peers", json.dumps([initial_peer])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(workdir / "output.log", "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "trainer/trainer.py"), *args], cwd=workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_script_peer(script: str, workdir: Path, tokenizer: str, shards: Path, target: int,
                      initial_peer: str | None):
    """A bench script's own peer (`script --peer ...`) in workdir, its output in workdir/output.log."""
    workdir.mkdir(parents=True)
    args = [sys.executable, script, "--peer", "--tokenizer", tokenizer, "--shards", str(shards),
            "--target_batch_size", str(target)]
    if initial_peer:
        args += ["--initial_peer", initial_peer]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(workdir / "output.log", "w") as log:
        return subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


# "[convmodel] collaborative epoch 7 (2 peers, lr 0.0016, 1.32 s[, 1 averaging round(s) failed])", and
# lightning_hivemind_step.py's "[lightning-hivemind] collaborative epoch 7 (2 peers, 10.61 s[, ...])": the
# seconds since the previous epoch, and the rounds hivemind gave up on meanwhile (averaging_failures.py)
EPOCH_LINE = re.compile(r"collaborative epoch (\d+) \((\d+) peers?, (?:lr [^,]+, )?([\d.]+|nan) s"
                        r"(?:, (\d+) averaging round\(s\) failed)?\)")


def epochs_in(log: Path) -> list[tuple[int, int, float, int]]:
    """(epoch, peers, seconds since the previous epoch, failed rounds) for each epoch line of a peer's log."""
    return [(int(e), int(n), float(s), int(f or 0))
            for e, n, s, f in EPOCH_LINE.findall(log.read_text(errors="replace"))]


@dataclass
class PeerResult:
    """What one peer's log says: its collaborative epochs with 2 peers, the seconds each took, failures."""

    steps: int
    seconds: list[float]
    failed: int
    dropped: int

    @classmethod
    def read(cls, log: Path) -> "PeerResult":
        seen = epochs_in(log)
        # an epoch's seconds count when it follows the previous one, not after a jump (state loaded
        # from the other peer); our strategy's collab/samples_per_second follows the same rule
        seconds = [s for i, (e, n, s, _) in enumerate(seen)
                   if n == 2 and not math.isnan(s) and (i == 0 or seen[i - 1][0] == e - 1)]
        out = log.read_text(errors="replace")
        # steady state: after the first epoch with 2 peers (the round during the join may fail or lose
        # a part while the newcomer loads the state). hivemind logs timeouts only at DEBUG; we count them all
        together = [i for i, (_, n, _, _) in enumerate(seen) if n == 2]
        failed = sum(f for _, n, _, f in seen[together[0] + 1:] if n == 2) if together else 0
        first_line = re.search(r"collaborative epoch \d+ \(2 peers", out)
        dropped = out[first_line.end():].count("of input tensors") if first_line else 0
        return cls(len(together), seconds, failed, dropped)

    def line(self, name: str) -> str:
        median = f"{statistics.median(self.seconds):.2f}" if self.seconds else "n/a"
        return (f"{name}: {self.steps} collaborative steps with 2 peers, median {median} s per step, "
                f"steady state: failed averaging rounds {self.failed}, rounds with dropped parts {self.dropped}")


def run_pair(start: Callable[[Path, str | None], subprocess.Popen], root: Path, epochs: int,
             timeout: float) -> dict[str, PeerResult]:
    """Start peer a, then b with a's address (a writes it to peers.txt), under root/a and root/b;
    stop both once each has logged `epochs` collaborative epochs with 2 peers, or after `timeout` s."""
    procs = []
    try:
        procs.append(start(root / "a", None))
        peers_file, deadline = root / "a/peers.txt", time.monotonic() + 300
        addresses: list[str] = []
        while not addresses and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
            addresses = peers_file.read_text().split() if peers_file.exists() else []
        if not addresses:
            raise RuntimeError(f"peer a wrote no address; see {root / 'a/output.log'}")
        procs.append(start(root / "b", addresses[0]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if all(sum(n == 2 for _, n, _, _ in epochs_in(root / name / "output.log")) >= epochs for name in "ab"):
                break
            time.sleep(1)
        else:
            print(f"a peer exited or {timeout:.0f} s passed before {epochs} epochs with 2 peers; "
                  f"see {root}/[ab]/output.log", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for p in procs:
            p.wait(timeout=30)
    return {name: PeerResult.read(root / name / "output.log") for name in ("a", "b")}


def measure(root: Path, tokenizer: str, shards: Path, epochs: int, target: int,
            config: str = "loopback") -> dict[str, PeerResult]:
    """Our HivemindStrategy: trainer.py peers a and b under root/a and root/b."""
    return run_pair(lambda workdir, address: peer(workdir, tokenizer, shards, target, address, config), root,
                    epochs, timeout=300 + 30 * epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="loopback")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target_batch_size", type=int, default=128)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="collab-bench-"))
    tokenizer, shards = make_data(root)
    results = measure(root, tokenizer, shards, args.epochs, args.target_batch_size, args.config)
    print(f"--config {args.config} ({CONFIGS[args.config][0]})")
    for name, result in results.items():
        print(result.line(f"peer {name}"))


if __name__ == "__main__":
    main()
