"""Seconds per fine-tuning epoch: our trainer/finetune.py path against transformers' `Trainer`.

Same model folder (the demo's bert-tiny export, or --model_dir), same task (the package
classification of data/make_labelled_tasks.py), the same encoded examples, collator, batch size,
optimizer (AdamW, weight decay on matrices only), learning rate and linear schedule with warmup.
Ours is the FinetuneCLI that trainer/finetune.py runs (FinetuneModule, FinetuneDataModule, the
config's logger and callbacks), fit for --epochs with validation off; the Trainer trains the same
transformers model class from the same folder. Each epoch's training time is measured inside one
run; the first epoch of each is dropped (warm-up) and the median of the others compared. Rounds
alternate between the two so that machine noise hits both alike. Target: ours <= 1.1x.

transformers' Trainer needs `accelerate` (`pip install accelerate`), which convmodel itself does not.

    python bench/finetune_vs_trainer.py [--model_dir runs/bert-tiny/model] [--epochs 2] [--rounds 2]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import pytorch_lightning as pl
import torch
from sample_data import ROOT

TASKS = os.path.join(ROOT, "work", "tasks")


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (batches only: validation is off)."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self.start)


def ours(model_dir: str, epochs: int, batch_size: int, lr: float) -> tuple[list[float], object]:
    """Epoch seconds of the FinetuneCLI path, and its data module (whose encoded examples the Trainer reuses)."""
    from convmodel.finetune.cli import FinetuneCLI

    with tempfile.TemporaryDirectory() as runs:
        cli = FinetuneCLI(args=[
            "--config", os.path.join(ROOT, "configs", "finetune", "classification.yaml"), "--model.source", model_dir,
            "--data.train_file", os.path.join(TASKS, "package", "train.jsonl"),
            "--data.val_file", os.path.join(TASKS, "package", "dev.jsonl"), "--data.test_file", "null",
            "--data.batch_size", str(batch_size), "--model.lr", str(lr), "--trainer.max_epochs", str(epochs),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", runs,
            "--trainer.accelerator", "cpu"])
        # nothing to monitor without validation: the config's early stopping and best checkpoint go
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, pl.callbacks.EarlyStopping)
                                 and not isinstance(c, pl.callbacks.ModelCheckpoint)]
        timer = EpochTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds, cli.datamodule


def hf_trainer(model_dir: str, data, epochs: int, batch_size: int, lr: float) -> list[float]:
    """Epoch seconds of transformers' Trainer on the same model class, examples and collator."""
    import transformers

    from convmodel.finetune.encoding import Collator

    class Timer(transformers.TrainerCallback):
        seconds: list[float] = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    labels = data.labels
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, problem_type="single_label_classification")
    timer = Timer()
    timer.seconds = []
    total = -(-len(data.encoded["train"]) // batch_size) * epochs  # warmup 10% of the steps, as ours
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
            weight_decay=0.01, warmup_steps=int(0.1 * total), lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
            logging_steps=10, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data.encoded["train"],
                                       data_collator=Collator(data.tokenizer.pad_token_id), callbacks=[timer])
        trainer.train()
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=os.path.join(ROOT, "runs", "bert-tiny", "model"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is dropped")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"error: --model_dir {args.model_dir} has no config.json; run `make demo` (or give a model folder)")
    if not os.path.isfile(os.path.join(TASKS, "package", "train.jsonl")):
        import subprocess

        subprocess.run([sys.executable, "data/make_labelled_tasks.py", "--output_dir", TASKS], cwd=ROOT, check=True)
    torch.set_num_threads(torch.get_num_threads())  # the same threads for both
    ours_epochs, trainer_epochs = [], []
    for round_ in range(args.rounds):
        seconds, data = ours(args.model_dir, args.epochs, args.batch_size, args.lr)
        ours_epochs += seconds[1:]
        trainer_epochs += hf_trainer(args.model_dir, data, args.epochs, args.batch_size, args.lr)[1:]
        print(f"round {round_ + 1}: ours {[f'{s:.2f}' for s in seconds]} s, Trainer "
              f"{[f'{s:.2f}' for s in trainer_epochs[-(args.epochs - 1):]]} s per epoch", flush=True)
    a, b = statistics.median(ours_epochs), statistics.median(trainer_epochs)
    steps = -(-len(data.encoded["train"]) // args.batch_size)
    print(f"{len(data.encoded['train'])} examples, batch {args.batch_size}, {steps} steps an epoch, "
          f"{torch.get_num_threads()} threads")
    print(f"median seconds per epoch: ours {a:.3f}, transformers Trainer {b:.3f}; ratio ours/Trainer {a / b:.3f} "
          f"(target <= 1.1)")


if __name__ == "__main__":
    main()
