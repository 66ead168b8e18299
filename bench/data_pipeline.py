"""Training samples per second: our loader end to end vs what a user would build from `datasets`.

All sides read the same MLM shards of the sample corpus (JSONL, <= 128 tokens) into batches of
32 for masked LM, in a torch DataLoader with the same number of workers:

- convmodel: `JsonlDataModule.train_dataloader()`: read, parse, shuffle (10,000 samples), mask
  (15%, BERT's 80/10/10), pad and collate;
- datasets: `load_dataset("json", streaming=True).shuffle(buffer_size=10_000)` batched by
  transformers' `DataCollatorForLanguageModeling` (15%), the usual choice without convmodel;
- ceiling: batches gathered from one padded token array in memory (no parsing, no masking):
  what any loader reading these shards could at most reach.

The sample corpus is small (3,677 records, a pass takes well under a second), so the shards are
copied `--copies` times (8: 32 shards, 29k records a pass): otherwise starting the DataLoader's
worker processes, which every side pays once per pass, would be most of what is measured.
Each measurement is several passes over the shards; rounds alternate between the sides and the
ratio of medians is reported. Target: convmodel >= 3x datasets.

    python bench/data_pipeline.py [--rounds 3] [--passes 2] [--copies 8] [--num_workers 0 2]
"""

import argparse
import glob
import os
import shutil
import statistics
import time

import torch
from sample_data import sample_data
from torch.utils.data import DataLoader

from convmodel.data import JsonlDataModule

BATCH = 32
BUFFER = 10_000


def copied_shards(shards: str, copies: int) -> str:
    """The shards `copies` times over in a folder beside them (made once); returns its glob."""
    files = sorted(glob.glob(shards))
    folder = os.path.join(os.path.dirname(os.path.dirname(files[0])), f"{os.path.basename(os.path.dirname(files[0]))}"
                          f"-x{copies}")
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for copy in range(copies):
            for i, path in enumerate(files):
                shutil.copyfile(path, os.path.join(folder + ".tmp", f"part-{copy * len(files) + i:05d}.jsonl"))
        os.replace(folder + ".tmp", folder)
    return os.path.join(folder, "part-*.jsonl")


def samples_per_second(make_loader, passes: int) -> float:
    """Throughput over several full passes, the loader built anew (workers started) as a user's epoch would."""
    loader = make_loader()
    start, n = time.perf_counter(), 0
    for _ in range(passes):
        for batch in loader:
            n += batch["input_ids"].shape[0]
    return n / (time.perf_counter() - start)


def ours(tokenizer: str, shards: str, num_workers: int):
    data = JsonlDataModule(tokenizer, train_files=shards, batch_size=BATCH, max_seq_len=128,
                           num_workers=num_workers, shuffle_buffer_size=BUFFER)
    data.setup("fit")
    return data.train_dataloader()


def hf_datasets(tokenizer: str, shards: str, num_workers: int):
    from datasets import load_dataset
    from transformers import DataCollatorForLanguageModeling

    from convmodel.tokenization import load_tokenizer

    stream = load_dataset("json", data_files=sorted(glob.glob(shards)), split="train", streaming=True)
    stream = stream.shuffle(seed=0, buffer_size=BUFFER)
    collator = DataCollatorForLanguageModeling(load_tokenizer(tokenizer), mlm=True, mlm_probability=0.15,
                                               return_tensors="pt")
    return DataLoader(stream, batch_size=BATCH, collate_fn=collator, num_workers=num_workers)


class TokenArray(torch.utils.data.IterableDataset):
    """Every record preloaded into one padded [N, 128] tensor; batches are random row gathers."""

    def __init__(self, shards: str):
        import json

        rows = [json.loads(line)["input_ids"] for path in sorted(glob.glob(shards)) for line in open(path)]
        self.ids = torch.zeros(len(rows), 128, dtype=torch.long)
        for i, row in enumerate(rows):
            self.ids[i, : len(row)] = torch.tensor(row)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = torch.randperm(len(self.ids))[worker::workers]
        for start in range(0, len(order), BATCH):
            rows = self.ids[order[start:start + BATCH]]
            yield {"input_ids": rows, "attention_mask": rows != 0}


def ceiling(shards: str, num_workers: int):
    return DataLoader(TokenArray(shards), batch_size=None, num_workers=num_workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="epochs over the shards per measurement")
    parser.add_argument("--copies", type=int, default=8, help="copies of the sample shards read in a pass")
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    tokenizer, shards = sample_data()
    shards = copied_shards(shards, args.copies)
    n_files = len(glob.glob(shards))
    sides = {"convmodel": lambda w: ours(tokenizer, shards, w), "datasets": lambda w: hf_datasets(tokenizer, shards, w),
             "ceiling": lambda w: ceiling(shards, w)}
    for workers in args.num_workers:
        results = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, make in sides.items():
                results[name].append(samples_per_second(lambda make=make, workers=workers: make(workers), args.passes))
        median = {name: statistics.median(values) for name, values in results.items()}
        print(f"num_workers={workers} ({n_files} shards, batch {BATCH}, {args.rounds} rounds x {args.passes} passes): "
              + ", ".join(f"{name} {value:,.0f} samples/s" for name, value in median.items())
              + f"; convmodel / datasets {median['convmodel'] / median['datasets']:.2f} (target >= 3), "
              f"convmodel / ceiling {median['convmodel'] / median['ceiling']:.2f}", flush=True)


if __name__ == "__main__":
    main()
