"""Swarm vs local: seconds per 128 samples for two bert-tiny peers on this machine vs one local trainer.

Both sides process the same samples of the same tiny model on the same 2 cores: the swarm as two
trainer.py peers with HivemindStrategy (bench/collaborative_step.py: a collaborative step is
`target_batch_size` samples, half from each peer), the local side as one Lightning trainer with
the same module, data, batch size and optimizer. The ratio swarm / local is what collaboration
costs when there is no extra compute to gain: matchmaking, averaging over loopback, two processes
sharing the cores. On separate machines the swarm's throughput would be about peers / ratio times
the local one.

    python bench/swarm_vs_local.py [--epochs 20] [--target_batch_size 128]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml
from collaborative_step import BATCH_SIZE, MAX_SEQ_LEN, REPO, TINY_BERT, make_data, measure


class SampleTimer(pl.Callback):
    """Seconds per `samples` samples, from consecutive batch ends after `warmup` batches."""

    def __init__(self, warmup: int):
        self.warmup, self.ends = warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.ends.append(time.perf_counter())


def local_seconds_per_step(tokenizer: str, shards: Path, target: int, steps: int) -> list[float]:
    """One local trainer, the collaborative config's model and optimizer, no strategy: seconds per `target` samples."""
    from convmodel.data import JsonlDataModule
    from convmodel.models import BertPretraining

    with open(REPO / "configs/collaborative/bert-tiny.yaml") as f:
        model_args = yaml.safe_load(f)["model"]["init_args"]
    model_args.update(config=TINY_BERT, tokenizer=tokenizer, objective="mlm")
    pl.seed_everything(0)
    module = BertPretraining(**model_args)
    data = JsonlDataModule(tokenizer, train_files=str(shards / "part-*.jsonl"), batch_size=BATCH_SIZE,
                           max_seq_len=MAX_SEQ_LEN)
    per_step = target // BATCH_SIZE
    timer = SampleTimer(warmup=5)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5 + per_step * (steps + 1), callbacks=[timer],
                             logger=pl.loggers.TensorBoardLogger(logdir), log_every_n_steps=1,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=data)
    ends = timer.ends
    return [ends[i + per_step] - ends[i] for i in range(0, len(ends) - per_step, per_step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target_batch_size", type=int, default=128)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="swarm-vs-local-"))
    tokenizer, shards = make_data(root)
    swarm = measure(root / "swarm", tokenizer, shards, args.epochs, args.target_batch_size)
    local = local_seconds_per_step(tokenizer, shards, args.target_batch_size, args.epochs)
    swarm_seconds = [s for result in swarm.values() for s in result.seconds]
    for name, result in swarm.items():
        print(result.line(f"swarm peer {name}"))
    s, loc = statistics.median(swarm_seconds), statistics.median(local)
    print(f"local: {len(local)} steps of {args.target_batch_size} samples, median {loc:.2f} s per step")
    print(json.dumps({"swarm_s_per_step": round(s, 3), "local_s_per_step": round(loc, 3),
                      "swarm_over_local": round(s / loc, 2)}))


if __name__ == "__main__":
    main()
