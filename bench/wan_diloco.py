"""DiLoCo vs synchronous data-parallel training between two peers on a 50 Mbit/s link: bytes, time, loss.

Why: a synchronous swarm (hivemind.Optimizer through SwarmPeer) averages gradients at every
collaborative epoch, so on a slow link it waits on the wire; DiLoCo (convmodel.collaborative.diloco)
averages pseudo-gradients once every H inner steps. This measures both on a real narrow link:
two network namespaces joined by a veth pair whose ends are shaped by `tc tbf` (bench/netns.py),
one peer in each, the byte counters read from the veth ends.

Four runs, each on the same bert-tiny masked LM (configs/bert-tiny.yaml: model, optimizer
hyperparameters, masking), the same initial weights (seed 0) and the same batches, built once from
the sample corpus (bench/sample_data.py) and saved: peer 0 trains on the first half, peer 1 on
the second, and the single-process runs on both halves interleaved, so every run trains on the
same samples. Held-out batches (after both halves) give the validation loss at the end.

- sync: each peer a bare loop of forward, backward and `SwarmPeer.step` (hivemind.Optimizer, the
  swarm options of configs/collaborative/bert-tiny.yaml, `--target_batch_size` samples of the
  swarm per collaborative epoch: 64, at least 2 local steps of each peer; hivemind's progress
  reports lag, so an epoch takes somewhat more);
- diloco: each peer its own AdamW, and every `--inner_steps` (H) steps `OuterOptimizer.end_round`
  (outer SGD lr 0.7, Nesterov momentum 0.9, fp16 pseudo-gradients);
- alone: one DiLoCo peer on all the samples, `end_round(average=False)`: what the outer step
  does without a partner;
- local: one plain AdamW loop on all the samples, no swarm.

The learning rate warms up linearly over the first 1600 samples of the run (in each mode's own
optimizer steps: collaborative epochs for sync, each peer's inner steps for DiLoCo), then stays.

Reported per run: bytes per sample (both veth ends' tx bytes during the training loops / samples
trained), seconds per sample (the longest peer loop / samples), compute utilisation (time in
zero_grad, forward, backward and, except for sync, the inner optimizer step, divided by the loop's
wall time; averaged over the peers; sync's AdamW step runs inside `peer.step` and is not counted),
how busy the link was (the busier end's tx bytes during its loop ÷ the rate one TCP stream measured
before the runs ÷ the loop's seconds) and the validation loss. Torch uses 1 thread per peer.
Needs root, Linux and iproute2 (skips otherwise); the namespaces are deleted on exit, Ctrl-C included.

    sudo python bench/wan_diloco.py [--rate 50mbit] [--steps_per_peer 200] [--inner_steps 50]
        [--target_batch_size 64] [--modes sync diloco alone local]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from netns import VethPair, unavailable
from sample_data import ROOT, sample_data

MODES = ("sync", "diloco", "alone", "local")
WARMUP_SAMPLES = 1600  # samples of the whole run over which the learning rate rises to its peak
RUN_TIMEOUT_S = 600.0
SWARM_OPTIONS_FROM_CONFIG = ("matchmaking_time", "averaging_timeout", "metadata_expiration", "next_chunk_timeout",
                             "bootstrap_timeout", "grad_compression", "state_averaging_compression")
DILOCO_TIMINGS = {"averaging_timeout": 60.0, "matchmaking_time": 5.0, "request_timeout": 3.0}


def read_config(path: str) -> dict:
    import yaml

    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


# ---- data and model: the same in every run -------------------------------------------------------------------

def write_batches(path: Path, steps_per_peer: int, batch_size: int, max_seq_len: int, val_batches: int) -> None:
    """Both peers' halves and the held-out batches, masked once, saved for every run."""
    import torch

    from convmodel.data import JsonlDataModule

    data_config = read_config("configs/bert-tiny.yaml")["data"]
    tokenizer, shards = sample_data(max_seq_len)
    data = JsonlDataModule(tokenizer=tokenizer, train_files=shards, objective="mlm", batch_size=batch_size,
                           max_seq_len=max_seq_len, whole_word_mask=data_config["whole_word_mask"],
                           mlm_probability=data_config["mlm_probability"], seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    needed, batches = 2 * steps_per_peer + val_batches, []
    for batch in data.train_dataloader():
        if batch["input_ids"].shape[0] == batch_size:
            batches.append(batch)
        if len(batches) == needed:
            break
    if len(batches) < needed:
        raise SystemExit(f"the sample shards give {len(batches)} batches of {batch_size}, the run needs {needed}: "
                         "lower --steps_per_peer or --val_batches")
    torch.save({"tokenizer": tokenizer, "halves": [batches[:steps_per_peer], batches[steps_per_peer:2 * steps_per_peer]],
                "val": batches[2 * steps_per_peer:]}, path)


def build_model(tokenizer: str):
    """configs/bert-tiny.yaml's BertPretraining (seed 0: the same weights in every process)."""
    import torch

    from convmodel.models import BertPretraining

    init_args = dict(read_config("configs/bert-tiny.yaml")["model"]["init_args"])
    for key in ("tokenizer", "objective", "schedule", "warmup_steps", "total_steps"):
        init_args.pop(key, None)
    torch.manual_seed(0)
    return BertPretraining(tokenizer=tokenizer, objective="mlm", **init_args)


def build_inner_optimizer(module, warmup_steps: int):
    """AdamW with the module's hyperparameters (decay on matrices only), linear warmup then constant."""
    import torch

    from convmodel.optim import build_scheduler, param_groups

    optimizer = torch.optim.AdamW(param_groups(module, module.weight_decay), lr=module.lr, betas=module.betas,
                                  eps=module.eps, weight_decay=module.weight_decay)
    return optimizer, build_scheduler(optimizer, "constant", max(warmup_steps, 1))


def validation_loss(module, batches) -> float:
    """Masked-LM cross entropy over the held-out batches, weighted by their masked tokens."""
    import torch

    module.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            losses = module.compute_losses(batch)
            total += float(losses.lm_loss) * int(losses.n_targets)
            tokens += int(losses.n_targets)
    module.train()
    return total / tokens


# ---- one peer (a process inside a namespace) ----------------------------------------------------------------

def wait_for_file(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.05)


def meet(workdir: Path, label: str, index: int, partner: int | None) -> None:
    """Say this peer reached `label`, then wait until the partner has too (no-op alone)."""
    (workdir / f"{label}-{index}").touch()
    if partner is not None:
        wait_for_file(workdir / f"{label}-{partner}")


def swarm_peer(settings: dict, args, peers_file: Path | None):
    from convmodel.collaborative.swarm_options import SwarmOptions
    from convmodel.collaborative.swarm_peer import SwarmPeer

    strategy = read_config("configs/collaborative/bert-tiny.yaml")["trainer"]["strategy"]["init_args"]
    initial_peers = None
    if args.index == 1:
        wait_for_file(peers_file)
        initial_peers = peers_file.read_text().split()
    return SwarmPeer(SwarmOptions(
        run_id=f"wan_{args.mode}", target_batch_size=settings["target_batch_size"],
        host_maddrs=[f"/ip4/{args.address}/tcp/0"], initial_peers=initial_peers, use_ipfs=False, use_relay=False,
        use_auto_relay=False, nat_port_map=False, auto_nat=False,
        peers_file=str(peers_file) if args.index == 0 and peers_file else None,
        **{key: strategy[key] for key in SWARM_OPTIONS_FROM_CONFIG}))


def interface_bytes(interface: str | None) -> tuple[int, int]:
    """(tx, rx) bytes of this namespace's veth end; (0, 0) for the local run, which has none."""
    if interface is None:
        return 0, 0
    base = Path("/sys/class/net") / interface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def run_peer(args) -> None:
    import torch

    from convmodel.collaborative.diloco import OuterOptimizer

    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    settings = json.loads((workdir / "settings.json").read_text())
    data = torch.load(workdir / "batches.pt", weights_only=False)
    mode, batch_size, inner_steps = args.mode, settings["batch_size"], settings["inner_steps"]
    two_peers = mode in ("sync", "diloco")
    if two_peers:
        batches = data["halves"][args.index]
    else:  # one process trains on both halves, interleaved as the two peers would meet them
        batches = [b for pair in zip(*data["halves"], strict=True) for b in pair]
    partner = 1 - args.index if two_peers else None
    module = build_model(data["tokenizer"])
    module.train()
    loss_before = validation_loss(module, data["val"])
    swarm_samples_per_step = batch_size * (2 if two_peers else 1)
    peer = outer = None
    if mode == "sync":
        optimizer, scheduler = build_inner_optimizer(module, WARMUP_SAMPLES // settings["target_batch_size"])
        peer = swarm_peer(settings, args, workdir / "peers-sync.txt")
        peer.join(optimizer, scheduler, module=module)
        peer.catch_up()
    else:
        optimizer, scheduler = build_inner_optimizer(module, WARMUP_SAMPLES // swarm_samples_per_step)
        if mode != "local":
            peer = swarm_peer(settings, args, workdir / f"peers-{mode}.txt" if two_peers else None)
            peer.start_dht()
            outer = OuterOptimizer(peer.dht, f"wan_{mode}", module.parameters(), outer_lr=0.7, outer_momentum=0.9,
                                   compression="fp16", target_group_size=2 if two_peers else None, **DILOCO_TIMINGS)
    meet(workdir, f"ready-{mode}", args.index, partner)

    rounds, compute, forming = [], 0.0, 0.0
    tx_start, rx_start = interface_bytes(args.interface)
    loop_start = time.perf_counter()
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        module.zero_grad(set_to_none=True)
        module.compute_losses(batch).loss.backward()
        if mode != "sync":
            optimizer.step()
            scheduler.step()
        compute += time.perf_counter() - started
        if mode == "sync":
            peer.step(batch_size)
            if step == 0:  # as in tests/test_swarm_options_alone.py: not alone from the first epoch on
                formed = time.perf_counter()
                while peer.optimizer.tracker.global_progress.num_peers < 2 and time.perf_counter() - formed < 60:
                    time.sleep(0.05)
                forming = time.perf_counter() - formed
        elif outer is not None and ((step + 1) % inner_steps == 0 or step + 1 == len(batches)):
            round_started = time.perf_counter()
            samples = ((step % inner_steps) + 1) * batch_size
            result = outer.end_round(samples, average=two_peers)
            rounds.append({**asdict(result), "seconds": time.perf_counter() - round_started})
    loop_seconds = time.perf_counter() - loop_start - forming
    tx_end, rx_end = interface_bytes(args.interface)

    outcome = {"mode": mode, "index": args.index, "samples": len(batches) * batch_size, "steps": len(batches),
               "loop_seconds": loop_seconds, "forming_seconds": forming, "compute_seconds": compute,
               "tx_bytes": tx_end - tx_start, "rx_bytes": rx_end - rx_start, "rounds": rounds,
               "val_loss_before": loss_before, "val_loss": validation_loss(module, data["val"])}
    if mode == "sync":
        failures = peer.report.failures
        outcome["epochs"] = peer.optimizer.local_epoch
        outcome["failed_rounds"] = failures.gradients + failures.state if failures is not None else None
        peer.leave()
    elif peer is not None:
        if two_peers:
            meet(workdir, f"done-{mode}", args.index, partner)  # neither leaves while the other may still average
        outer.shutdown()
        peer.leave()
    tmp = workdir / f".{mode}-{args.index}.json"
    tmp.write_text(json.dumps(outcome))
    tmp.replace(workdir / f"{mode}-{args.index}.json")


# ---- the orchestrating parent ------------------------------------------------------------------------------

def start_peer(link: VethPair | None, index: int, mode: str, workdir: Path) -> subprocess.Popen:
    command = [sys.executable, os.path.abspath(__file__), "--role", "peer", "--mode", mode, "--index", str(index),
               "--workdir", str(workdir)]
    if link is not None:
        command = [*link.exec_in(index), *command, "--address", link.addresses[index],
                   "--interface", link.interfaces[index]]
    log = open(workdir / f"{mode}-{index}.log", "w")
    with log:  # the child holds its own descriptor
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the peer, its averagers and p2pd daemon
            except ProcessLookupError:
                pass
            process.wait()


def run_mode(mode: str, link: VethPair, workdir: Path) -> dict:
    """Start the mode's peers, wait for their results; whole-process tx bytes of the veth ends beside them."""
    count = 2 if mode in ("sync", "diloco") else 1
    before = [link.tx_bytes(i) for i in range(2)]
    started = time.perf_counter()
    processes = [start_peer(None if mode == "local" else link, i, mode, workdir) for i in range(count)]
    try:
        for index, process in enumerate(processes):
            remaining = RUN_TIMEOUT_S - (time.perf_counter() - started)
            try:
                code = process.wait(max(remaining, 1))
            except subprocess.TimeoutExpired:
                code = f"still running after {RUN_TIMEOUT_S:g} s"
            if code != 0:
                tail = (workdir / f"{mode}-{index}.log").read_text()[-3000:]
                raise RuntimeError(f"{mode} peer {index}: exit {code}; the end of its log:\n{tail}")
    finally:
        stop(processes)
    peers = [json.loads((workdir / f"{mode}-{i}.json").read_text()) for i in range(count)]
    return {"peers": peers, "process_tx_bytes": sum(link.tx_bytes(i) - before[i] for i in range(2)),
            "seconds": time.perf_counter() - started}


def summarise(run: dict, mbit: float) -> dict:
    """The run's figures; `link_busy`: the busier veth end's tx during its loop, as a share of the measured rate."""
    peers = run["peers"]
    samples = sum(p["samples"] for p in peers)
    rounds = [r for p in peers for r in p["rounds"]]
    return {"samples": samples, "tx_bytes": sum(p["tx_bytes"] for p in peers),
            "bytes_per_sample": sum(p["tx_bytes"] for p in peers) / samples,
            "process_bytes_per_sample": run["process_tx_bytes"] / samples,
            "seconds_per_sample": max(p["loop_seconds"] for p in peers) / samples,
            "utilisation": sum(p["compute_seconds"] / p["loop_seconds"] for p in peers) / len(peers),
            "link_busy": max(p["tx_bytes"] * 8 / (mbit * 1e6 * p["loop_seconds"]) for p in peers),
            "val_loss": sum(p["val_loss"] for p in peers) / len(peers),
            "val_loss_before": peers[0]["val_loss_before"],
            "epochs": [p.get("epochs") for p in peers], "rounds": len(rounds) // max(len(peers), 1),
            "fell_back": sum(r["fell_back"] for r in rounds), "peer_val_losses": [p["val_loss"] for p in peers],
            "failed_rounds": [p.get("failed_rounds") for p in peers],
            "approx_bytes_sent": sum(r["approx_bytes_sent"] for r in rounds),
            "round_seconds": [round(r["seconds"], 2) for r in rounds]}


def report(summaries: dict, settings: dict, mbit: float) -> None:
    print(f"\nlink: {settings['rate']} tbf on both veth ends, one TCP stream measured {mbit:.1f} Mbit/s; "
          f"batch {settings['batch_size']} x {settings['max_seq_len']} tokens, {settings['steps_per_peer']} steps per "
          f"peer, H = {settings['inner_steps']}, sync target_batch_size {settings['target_batch_size']}")
    print("\n| run | samples | tx bytes (both peers) | bytes / sample | s / sample | compute utilisation | "
          "link busy | val loss (before: {:.3f}) | averaging |".format(next(iter(summaries.values()))["val_loss_before"]))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, s in summaries.items():
        if mode == "sync":
            averaging = (f"{s['epochs'][0]} / {s['epochs'][1]} collaborative epochs, "
                         f"{s['failed_rounds'][0]} / {s['failed_rounds'][1]} failed rounds")
        elif mode == "local":
            averaging = "none"
        else:
            averaging = f"{s['rounds']} rounds, {s['fell_back']} fell back"
        print(f"| {mode} | {s['samples']} | {s['tx_bytes']:,} | {s['bytes_per_sample']:,.0f} | "
              f"{s['seconds_per_sample'] * 1000:.1f} ms | {s['utilisation']:.1%} | {s['link_busy']:.1%} | {s['val_loss']:.4f} | {averaging} |")
    if "sync" in summaries and "diloco" in summaries:
        sync, diloco = summaries["sync"], summaries["diloco"]
        ratio = sync["bytes_per_sample"] / max(diloco["bytes_per_sample"], 1e-9)
        loss_gap = diloco["val_loss"] / sync["val_loss"] - 1
        print(f"\nsync / DiLoCo bytes per sample: {ratio:.1f}x (target >= 20x)"
              f"\nDiLoCo compute utilisation: {diloco['utilisation']:.1%} (target >= 85%), sync {sync['utilisation']:.1%}"
              f"\nsync / DiLoCo seconds per sample: {sync['seconds_per_sample'] / diloco['seconds_per_sample']:.2f}x"
              f"\nDiLoCo val loss vs sync: {loss_gap:+.1%} (target within 5%)")
    print("\n" + json.dumps(summaries))


def interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C: the peers are stopped and the namespaces deleted on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="50mbit", help="tc tbf rate of each veth end")
    parser.add_argument("--steps_per_peer", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=64)
    parser.add_argument("--inner_steps", type=int, default=50, help="DiLoCo's H: inner steps per outer round")
    parser.add_argument("--target_batch_size", type=int, default=64, help="sync: swarm samples per epoch")
    parser.add_argument("--val_batches", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--role", choices=["bench", "peer"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--address", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "peer":
        return run_peer(args)
    reason = unavailable()
    if reason:
        print(f"bench/wan_diloco.py: skipped: {reason}")
        return
    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="wan-diloco-"))
    settings = {key: getattr(args, key) for key in ("rate", "steps_per_peer", "batch_size", "max_seq_len",
                                                    "inner_steps", "target_batch_size", "val_batches")}
    (workdir / "settings.json").write_text(json.dumps(settings))
    write_batches(workdir / "batches.pt", args.steps_per_peer, args.batch_size, args.max_seq_len, args.val_batches)
    print(f"peers' logs and results in {workdir}", flush=True)
    with VethPair(rate=args.rate) as link:
        mbit = link.measure_mbit()
        summaries = {}
        for mode in args.modes:
            print(f"== {mode} ==", flush=True)
            summaries[mode] = summarise(run_mode(mode, link, workdir), mbit)
            print(json.dumps(summaries[mode]), flush=True)
    report(summaries, settings, mbit)


if __name__ == "__main__":
    main()
