"""Training samples per second: our JSONL streaming vs Hugging Face `datasets` streaming.

Both read the same MLM shards of the sample corpus, shuffle with a 10,000-sample buffer,
and batch with the same collator (our MaskedLmCollator: dynamic 15% masking) in a torch
DataLoader with the same number of workers. Each pass reads every shard once; a measurement is several passes. Passes
alternate between the two; the ratio of median throughputs is reported. Target: >= 1.

    python bench/data_pipeline.py [--rounds 3] [--num_workers 0 2]
"""

import argparse
import glob
import statistics
import time

from sample_data import sample_data
from torch.utils.data import DataLoader

from convmodel.data import JsonlDataModule, build_collator


def samples_per_second(loader, passes: int) -> float:
    """Throughput over several full passes (the sample corpus is ~1 s per pass: too short alone)."""
    start, n = time.perf_counter(), 0
    for _ in range(passes):
        for batch in loader:
            n += batch["input_ids"].shape[0]
    return n / (time.perf_counter() - start)


def ours(tokenizer: str, shards: str, batch_size: int, num_workers: int) -> DataLoader:
    data = JsonlDataModule(tokenizer, train_files=shards, batch_size=batch_size, max_seq_len=128,
                           num_workers=num_workers, shuffle_buffer_size=10_000)
    data.setup("fit")
    return data.train_dataloader()


def hf_datasets(tokenizer: str, shards: str, batch_size: int, num_workers: int) -> DataLoader:
    from datasets import load_dataset

    from convmodel.tokenization import load_tokenizer

    stream = load_dataset("json", data_files=sorted(glob.glob(shards)), split="train", streaming=True)
    stream = stream.shuffle(seed=0, buffer_size=10_000)
    collator = build_collator(load_tokenizer(tokenizer), "mlm")
    return DataLoader(stream, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5, help="epochs over the shards per measurement")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    tokenizer, shards = sample_data()
    n_files = len(glob.glob(shards))
    for workers in args.num_workers:
        a, b = [], []
        for _ in range(args.rounds):
            a.append(samples_per_second(ours(tokenizer, shards, args.batch_size, workers), args.passes))
            b.append(samples_per_second(hf_datasets(tokenizer, shards, args.batch_size, workers), args.passes))
        mine, theirs = statistics.median(a), statistics.median(b)
        print(f"num_workers={workers} ({n_files} shards, batch {args.batch_size}, {args.rounds} rounds x {args.passes} passes): "
              f"convmodel {mine:,.0f} samples/s, datasets {theirs:,.0f} samples/s, ratio {mine / theirs:.2f} "
              "(target >= 1)")


if __name__ == "__main__":
    main()
