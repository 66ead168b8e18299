"""What a SIGKILLed peer costs the survivor: two bert-tiny peers of the shipped loopback config, one killed.

The peers train together (configs/collaborative/bert-tiny.yaml: averaging_timeout 10 s,
metadata_expiration 15 s) until each has logged `--together` epochs with 2 peers; then peer b's whole
process group is SIGKILLed, as a crashed machine would vanish. Peer a's log gives the seconds from the
kill to its first epoch counted alone, the failed rounds in between, and its median epoch alone. The
cost of the kill is the first minus what that many epochs take alone.

    python bench/dead_peer_cost.py [--together 5] [--alone 5]
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from collaborative_step import epochs_in, make_data, peer


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--together", type=int, default=5, help="epochs with 2 peers before the kill")
    parser.add_argument("--alone", type=int, default=5, help="epochs alone after it")
    parser.add_argument("--target_batch_size", type=int, default=128)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dead_peer_cost-"))
    print(f"peers' logs: {root}/[ab]/output.log", file=sys.stderr)
    if True:
        tokenizer, shards = make_data(root)
        procs = []
        try:
            procs.append(peer(root / "a", tokenizer, shards, args.target_batch_size, None))
            wait_until(lambda: (root / "a/peers.txt").exists(), 300, "peer a's address")
            address = (root / "a/peers.txt").read_text().split()[0]
            procs.append(peer(root / "b", tokenizer, shards, args.target_batch_size, address))
            log_a = root / "a/output.log"

            def together() -> int:
                return sum(n == 2 for _, n, _, _ in epochs_in(log_a))

            wait_until(lambda: together() >= args.together, 600, f"{args.together} epochs with 2 peers")
            killed_at_epoch = epochs_in(log_a)[-1][0]
            killed = time.monotonic()
            os.killpg(procs[1].pid, signal.SIGKILL)
            alone_since: list[float] = []

            def alone() -> list:
                after = [line for line in epochs_in(log_a) if line[0] > killed_at_epoch]
                first = next((i for i, (_, n, _, _) in enumerate(after) if n == 1), None)
                if first is not None and not alone_since:
                    alone_since.append(time.monotonic())
                return [] if first is None else after[first:]

            wait_until(lambda: len(alone()) > args.alone, 300, f"{args.alone} epochs alone")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            for proc in procs:
                proc.wait(timeout=30)
        after = [line for line in epochs_in(log_a) if line[0] > killed_at_epoch]
        first_alone = next(i for i, (_, n, _, _) in enumerate(after) if n == 1)
        to_alone = sum(s for _, _, s, _ in after[:first_alone + 1])
        solo = statistics.median(s for _, _, s, _ in after[first_alone + 1:])
        failed = sum(f for _, _, _, f in after[:first_alone + 1])
        cost = to_alone - solo * (first_alone + 1)
        print(f"kill at epoch {killed_at_epoch}: {first_alone + 1} epoch(s) and {to_alone:.2f} s until the survivor "
              f"counted itself alone ({failed} failed averaging round(s)); an epoch alone takes {solo:.2f} s; "
              f"cost of the kill: {cost:.2f} s (averaging_timeout 10 s)")
        print(f"(wall clock from the kill to the first epoch alone: {alone_since[0] - killed:.1f} s, polled)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
