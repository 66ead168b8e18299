"""Seconds per collaborative step for two bert-tiny peers on 127.0.0.1: ours vs lightning-hivemind 0.1.0.

The other half of bench/collaborative_step.py. The same tiny BERT, data, batch size and target batch
size train twice in one run: with our HivemindStrategy (trainer.py, configs/collaborative/bert-tiny.yaml)
and with lightning-hivemind's HivemindStrategy at its own defaults, in a small pl.Trainer peer script
(this file with --peer). lightning-hivemind is set only what a user must set (target_batch_size,
run_id, initial_peers as a list, 127.0.0.1 host_maddrs) plus the house rule: nothing reachable
beyond loopback. Each peer prints a line per collaborative epoch (hivemind's `local_epoch` moving);
the seconds between consecutive epochs with 2 peers are a step's seconds, as ours reports them.

lightning-hivemind is never part of our environment: it pins hivemind<=1.1.5, which does not install
on Python 3.11, so it is installed here with --no-deps under work/bench-deps/ (git-ignored) and put on
sys.path only in its peer processes, with the shims listed in `import_lightning_hivemind`.

    python bench/lightning_hivemind_step.py [--epochs 20] [--their_epochs 10] [--their_seconds 180]
        [--target_batch_size 128] [--wheel lightning_Hivemind-0.1.0-py3-none-any.whl]
        (without --wheel, pip fetches lightning-hivemind==0.1.0 into work/bench-deps/ on the first run)
"""

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
from collaborative_step import (
    BATCH_SIZE,
    MAX_SEQ_LEN,
    REPO,
    TINY_BERT,
    PeerResult,
    make_data,
    measure,
    run_pair,
    start_script_peer,
)

DEPS = REPO / "work/bench-deps/lightning-hivemind"
VERSION = "0.1.0"


# ---- their side: install, import, one peer ------------------------------------------------------


def install_lightning_hivemind(wheel: str | None) -> None:
    """pip install --no-deps --target work/bench-deps/lightning-hivemind, once."""
    if list(DEPS.glob(f"lightning_[Hh]ivemind-{VERSION}.dist-info")):
        return
    source = wheel or f"lightning-hivemind=={VERSION}"
    # --no-deps: its requirement hivemind<=1.1.5 does not build on Python 3.11; the peers use our hivemind
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(DEPS), source],
                   check=True, timeout=300)


def import_lightning_hivemind():
    """lightning_hivemind.strategy.HivemindStrategy on pytorch-lightning 2.6, with the one shim it needs."""
    import lightning_fabric.utilities.types as fabric_types
    import torch.optim.lr_scheduler

    # Shim: `ImportError: cannot import name 'LRScheduler' from 'lightning_fabric.utilities.types'`
    # (strategy.py line 38, then the same for ReduceLROnPlateau). lightning-fabric 2.6 no longer has
    # these aliases; pytorch-lightning 2.6 itself uses torch's classes under the same names
    # (pytorch_lightning/utilities/types.py), so they are what the strategy's isinstance check expects.
    fabric_types.LRScheduler = torch.optim.lr_scheduler.LRScheduler
    fabric_types.ReduceLROnPlateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    sys.path.insert(0, str(DEPS))
    from lightning_hivemind.__about__ import __version__
    from lightning_hivemind.strategy import HivemindStrategy

    assert __version__ == VERSION, f"{DEPS} holds lightning-hivemind {__version__}, not {VERSION}"
    return HivemindStrategy


@contextlib.contextmanager
def loopback_only_dht():
    """Within this block hivemind.DHT starts with NAT port mapping, AutoNAT, relays and IPFS off.

    Not a fix but the house rule (nothing beyond 127.0.0.1): lightning-hivemind builds its
    hivemind.DHT itself (strategy.py line 164) from initial_peers and host_maddrs only; its other
    keyword arguments go to hivemind.Optimizer, so no option reaches these. use_ipfs and
    use_auto_relay are off by default already; nat_port_map, auto_nat and use_relay are on.
    """
    import hivemind

    original = hivemind.DHT
    hivemind.DHT = functools.partial(original, use_ipfs=False, use_relay=False, use_auto_relay=False,
                                     nat_port_map=False, auto_nat=False)
    try:
        yield
    finally:
        hivemind.DHT = original


def run_peer(args: argparse.Namespace) -> None:
    """One lightning-hivemind peer: our BertPretraining and JsonlDataModule in a pl.Trainer."""
    import yaml
    from pytorch_lightning.loggers import TensorBoardLogger

    from convmodel.data import JsonlDataModule
    from convmodel.models import BertPretraining

    hivemind_strategy = import_lightning_hivemind()
    config = yaml.safe_load((REPO / "configs/collaborative/bert-tiny.yaml").read_text())
    pl.seed_everything(config["seed_everything"])
    model_args = {**config["model"]["init_args"], "config": TINY_BERT}  # lr, schedule, ... as ours
    model = BertPretraining(tokenizer=args.tokenizer, objective="mlm", **model_args)
    data = JsonlDataModule(args.tokenizer, train_files=str(Path(args.shards) / "part-*.jsonl"), objective="mlm",
                           batch_size=BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)
    with loopback_only_dht():
        strategy = hivemind_strategy(
            target_batch_size=args.target_batch_size,
            run_id="bench_lightning_hivemind",
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            # a list: hivemind.DHT takes a string as one-character addresses (P2PDaemonError: failed to
            # parse multiaddr ""), and the documented PL_INITIAL_PEERS never reaches the DHT
            initial_peers=[args.initial_peer] if args.initial_peer else None,
        )
    # its join hint (a log.info) drops loopback addresses: on 127.0.0.1 it reads `INITIAL_PEERS= python ...`
    Path("peers.tmp").write_text("\n".join(str(a) for a in strategy.dht.get_visible_maddrs()) + "\n")
    Path("peers.tmp").rename("peers.txt")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=100_000,
                         logger=TensorBoardLogger("runs", name=""), log_every_n_steps=1,
                         enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[EpochPrinter()])
    trainer.fit(model, datamodule=data)


class EpochPrinter(pl.Callback):
    """Prints a line per collaborative epoch with the seconds since the previous one.

    Measured where our strategy measures it: right after the optimizer step that moved hivemind's
    `local_epoch`, on this peer's clock.
    """

    def __init__(self):
        from convmodel.collaborative.averaging_failures import AveragingFailureCounter

        self.epoch: int | None = None
        self.since = 0.0
        self.failures, self.failures_seen = AveragingFailureCounter().attach(), 0  # only reads hivemind's log

    def on_train_batch_end(self, trainer, *args) -> None:
        opt = trainer.optimizers[0]  # the strategy's hivemind.Optimizer from the first batch on
        now, epoch = time.perf_counter(), opt.local_epoch
        if self.epoch is not None and epoch != self.epoch:
            peers = opt.tracker.global_progress.num_peers
            failures = self.failures.gradients + self.failures.state
            failed = f", {failures - self.failures_seen} averaging round(s) failed" if failures > self.failures_seen else ""
            self.failures_seen = failures
            print(f"[lightning-hivemind] collaborative epoch {epoch} ({peers} peer{'s' if peers != 1 else ''}, "
                  f"{now - self.since:.2f} s{failed})", flush=True)
        if epoch != self.epoch:
            self.epoch, self.since = epoch, now


def start_peer(workdir: Path, tokenizer: str, shards: Path, target: int, initial_peer: str | None):
    return start_script_peer(__file__, workdir, tokenizer, shards, target, initial_peer)


def measure_theirs(root: Path, tokenizer: str, shards: Path, epochs: int, target: int,
                   seconds: float) -> dict[str, PeerResult]:
    """lightning-hivemind's HivemindStrategy: peers a and b under root/a and root/b, for at most `seconds`."""
    return run_pair(lambda workdir, address: start_peer(workdir, tokenizer, shards, target, address), root,
                    epochs, timeout=seconds)


# ---- both sides, one run ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="collaborative epochs with 2 peers to measure, ours")
    parser.add_argument("--their_epochs", type=int, default=10, help="the same for lightning-hivemind")
    parser.add_argument("--their_seconds", type=float, default=180,
                        help="stop lightning-hivemind's peers this long after both started, with the epochs seen "
                             "by then (a pair whose rounds all fail takes 60 s per epoch: 2 averaging timeouts)")
    parser.add_argument("--target_batch_size", type=int, default=128)
    parser.add_argument("--wheel", help="a local lightning-hivemind 0.1.0 wheel to install instead of PyPI's")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--initial_peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return run_peer(args)

    install_lightning_hivemind(args.wheel)
    root = Path(tempfile.mkdtemp(prefix="lightning-hivemind-bench-"))
    tokenizer, shards = make_data(root)
    ours = measure(root / "ours", tokenizer, shards, args.epochs, args.target_batch_size)
    theirs = measure_theirs(root / "theirs", tokenizer, shards, args.their_epochs, args.target_batch_size,
                            args.their_seconds)
    medians = {}
    for side, results in (("ours", ours), ("lightning-hivemind", theirs)):
        for name, result in results.items():
            print(result.line(f"{side} peer {name}"))
        seconds = [s for result in results.values() for s in result.seconds]
        medians[side] = statistics.median(seconds) if seconds else float("nan")
    print(f"lightning-hivemind / ours: {medians['lightning-hivemind'] / medians['ours']:.2f}x seconds per "
          f"collaborative step (medians over both peers' steps: {medians['lightning-hivemind']:.2f} s vs "
          f"{medians['ours']:.2f} s); logs under {root}")


if __name__ == "__main__":
    main()
