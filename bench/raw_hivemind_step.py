"""Seconds per collaborative step for two bert-tiny peers on 127.0.0.1: ours vs two raw hivemind.Optimizer peers.

What our HivemindStrategy costs over hivemind itself. Both sides train the same tiny BERT
(transformers' BertForMaskedLM, bench/collaborative_step.py's TINY_BERT) on the same shards with
the same batches (our JsonlDataModule's loader), the same target batch size and the same swarm
timings and compression as configs/collaborative/bert-tiny.yaml (matchmaking 1 s, averaging
timeout 10 s, next_chunk_timeout 2 s, fp16 compression, AdamW with its lr and weight decay, a linear
warmup schedule). Ours: two trainer.py processes (Lightning, our strategy, checkpoints off). Raw:
this file with --peer: a bare loop of forward, backward, `hivemind.Optimizer.step(batch_size)`,
`zero_grad`, printing a line per collaborative epoch in the format ours prints. The sides run
alternately, `--passes` times each, so a slow minute of the machine lands on both.

    python bench/raw_hivemind_step.py [--epochs 20] [--passes 2] [--target_batch_size 128]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from collaborative_step import (
    BATCH_SIZE,
    MAX_SEQ_LEN,
    REPO,
    TINY_BERT,
    make_data,
    measure,
    run_pair,
    start_script_peer,
)

LOOPBACK_CONFIG = REPO / "configs" / "collaborative" / "bert-tiny.yaml"


# ---- the raw side: one peer ---------------------------------------------------------------------


def run_peer(args: argparse.Namespace) -> None:
    """A bare hivemind.Optimizer training loop with bert-tiny.yaml's swarm options; prints epoch lines."""
    from functools import partial

    import hivemind
    import torch
    from hivemind.compression import Float16Compression
    from transformers import BertConfig, BertForMaskedLM

    from convmodel.data import JsonlDataModule
    from convmodel.special_ids import read_special_ids

    config = yaml.safe_load(LOOPBACK_CONFIG.read_text())
    swarm, hparams = config["trainer"]["strategy"]["init_args"], config["model"]["init_args"]
    torch.manual_seed(0)
    ids = read_special_ids(args.tokenizer)
    model = BertForMaskedLM(BertConfig(vocab_size=ids.vocab_size, pad_token_id=ids.pad, **TINY_BERT))
    data = JsonlDataModule(args.tokenizer, train_files=str(Path(args.shards) / "part-*.jsonl"),
                           batch_size=BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)
    data.setup("fit")
    dht = hivemind.DHT(initial_peers=[args.initial_peer] if args.initial_peer else [],
                       host_maddrs=swarm["host_maddrs"], use_ipfs=False, use_relay=False, use_auto_relay=False,
                       nat_port_map=False, auto_nat=False, start=True)
    if not args.initial_peer:
        Path("peers.txt").write_text("\n".join(str(a) for a in dht.get_visible_maddrs()) + "\n")
    warmup = hparams["warmup_steps"]
    opt = hivemind.Optimizer(
        dht=dht, run_id="raw_bert_tiny", target_batch_size=args.target_batch_size,
        optimizer=partial(torch.optim.AdamW, lr=hparams["lr"], weight_decay=hparams["weight_decay"]),
        params=model.parameters(),
        scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: min(1.0, (step + 1) / warmup)),
        matchmaking_time=swarm["matchmaking_time"], averaging_timeout=swarm["averaging_timeout"],
        next_chunk_timeout=swarm["next_chunk_timeout"], grad_compression=Float16Compression(),
        state_averaging_compression=Float16Compression(),
        tracker_opts={"metadata_expiration": swarm["metadata_expiration"]}, verbose=False)
    opt.load_state_from_peers()
    epoch, since = opt.local_epoch, time.monotonic()
    while True:
        for batch in data.train_dataloader():
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids"), labels=batch["labels"]).loss
            loss.backward()
            opt.step(batch_size=batch["input_ids"].shape[0])
            opt.zero_grad()
            if opt.local_epoch != epoch:
                now = time.monotonic()
                peers = opt.tracker.global_progress.num_peers
                print(f"[raw-hivemind] collaborative epoch {opt.local_epoch} ({peers} peer{'s' * (peers != 1)}, "
                      f"{now - since:.2f} s)", flush=True)
                epoch, since = opt.local_epoch, now


def start_peer(workdir: Path, tokenizer: str, shards: Path, target: int, initial_peer: str | None):
    return start_script_peer(__file__, workdir, tokenizer, shards, target, initial_peer)


# ---- both sides, one run ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="collaborative epochs with 2 peers per pass and side")
    parser.add_argument("--passes", type=int, default=2, help="times each side runs, alternating")
    parser.add_argument("--target_batch_size", type=int, default=128)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--initial_peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return run_peer(args)

    root = Path(tempfile.mkdtemp(prefix="raw-hivemind-bench-"))
    tokenizer, shards = make_data(root)
    seconds: dict[str, list[float]] = {"ours": [], "raw hivemind": []}
    for n in range(args.passes):
        for side in seconds:
            folder = root / f"{side.replace(' ', '-')}-{n}"
            if side == "ours":
                results = measure(folder, tokenizer, shards, args.epochs, args.target_batch_size)
            else:
                results = run_pair(lambda workdir, address: start_peer(workdir, tokenizer, shards,
                                                                       args.target_batch_size, address),
                                   folder, args.epochs, timeout=300 + 30 * args.epochs)
            for name, result in results.items():
                print(result.line(f"pass {n + 1}, {side} peer {name}"), flush=True)
                seconds[side] += result.seconds
    medians = {side: statistics.median(values) if values else float("nan") for side, values in seconds.items()}
    print(f"ours / raw hivemind: {medians['ours'] / medians['raw hivemind']:.2f}x seconds per collaborative step "
          f"(medians over both peers' steps of all passes: {medians['ours']:.2f} s vs {medians['raw hivemind']:.2f} s); "
          f"logs under {root}")


if __name__ == "__main__":
    main()
