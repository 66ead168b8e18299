"""Seconds per BERT training step: through Lightning (our module, Trainer, logging) vs a bare loop.

Same module, same batch, same optimizer and schedule; the bare loop calls the module's own
`compute_losses` and `configure_optimizers`, so the ratio is what Lightning and our hooks
(logging of loss, lr and tokens/s, progress bar) add. Rounds alternate between the two so
that machine noise hits both alike; the ratio of medians and the median of per-round ratios
are reported. Target: <= 1.05.

    python bench/lightning_vs_bare.py [--steps 40] [--rounds 9] [--batch_size 32]
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time

import pytorch_lightning as pl
import torch
import yaml
from sample_data import ROOT, sample_data
from torch.utils.data import DataLoader

from convmodel.data import JsonlDataModule
from convmodel.models import BertPretraining


class StepTimer(pl.Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning_seconds_per_step(module, batch, steps: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=warmup + steps, logger=pl.loggers.TensorBoardLogger(logdir),
            callbacks=[timer], enable_checkpointing=False,
            num_sanity_val_steps=0, log_every_n_steps=10, enable_model_summary=False, enable_progress_bar=True,
        )
        # batch_size=None: the loader hands out the prepared batch as it is, every step
        batches = DataLoader([batch] * (warmup + steps), batch_size=None)
        trainer.fit(module, train_dataloaders=batches)
    return (timer.end - timer.start) / steps


def bare_seconds_per_step(module, batch, steps: int, warmup: int) -> float:
    module.train()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = module.compute_losses(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / steps



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    tokenizer, shards = sample_data()
    with open(f"{ROOT}/configs/bert-tiny.yaml") as f:
        model_args = yaml.safe_load(f)["model"]["init_args"]
    model_args.update(tokenizer=tokenizer, objective="mlm", total_steps=10_000)
    data = JsonlDataModule(tokenizer, train_files=shards, batch_size=args.batch_size, max_seq_len=128)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    torch.manual_seed(0)
    reference = BertPretraining(**model_args)
    bare, ours = [], []
    for r in range(args.rounds):
        module = copy.deepcopy(reference)
        module.trainer = None
        bare.append(bare_seconds_per_step(module, batch, args.steps, args.warmup))
        ours.append(lightning_seconds_per_step(copy.deepcopy(reference), batch, args.steps, args.warmup))
        print(f"round {r}: bare {bare[-1] * 1000:.1f} ms/step, lightning {ours[-1] * 1000:.1f} ms/step", file=sys.stderr)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"bert-tiny, batch {args.batch_size}x128, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"bare PyTorch loop: {b * 1000:.1f} ms/step (median)")
    print(f"Lightning + convmodel: {o * 1000:.1f} ms/step (median)")
    per_round = statistics.median(x / y for x, y in zip(ours, bare, strict=True))
    print(f"ratio lightning/bare: {o / b:.3f} of medians, {per_round:.3f} median of per-round ratios "
          f"(target <= 1.05); rounds ranged {min(bare) * 1000:.0f}-{max(bare) * 1000:.0f} ms bare")


if __name__ == "__main__":
    main()
