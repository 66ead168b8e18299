"""LightningDataModule over JSONL shards: streaming readers, shuffle buffer, objective's collator.

Its state_dict (saved by Lightning in every checkpoint) is the training stream's position, so
`--ckpt_path last` continues the epoch where it stopped, with the same batches and masks as an
uninterrupted run (see convmodel.data.train_position).
"""

import math
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from convmodel.data.collators import build_collator
from convmodel.data.epoch_loader import EpochDataLoader
from convmodel.data.jsonl_stream import JsonlStream
from convmodel.data.prepare import MIN_SEQ_LEN, OBJECTIVES
from convmodel.data.shard_checks import SplitShards, check_enough, report_cut_share, split_shards
from convmodel.data.train_position import FORMAT, TrainPosition, mismatches
from convmodel.data.unigram_baseline import DEFAULT_MAX_TRAIN_TOKENS, unigram_baseline
from convmodel.errors import UserError
from convmodel.file_patterns import expand_file_patterns

SHARDS_HINT = ("Make shards with trainer/prepare_train_data.py, or fix the path (it is relative to the directory "
               "you run from).")


def expand_files(option: str, patterns: str | list[str]) -> list[str]:
    """Paths or globs -> existing files in order; UserError naming the option when one matches nothing."""
    return expand_file_patterns(option, patterns, hint=SHARDS_HINT)


class JsonlDataModule(pl.LightningDataModule):
    """Streams JSONL shards made by trainer/prepare_train_data.py into batches for one objective.

    Batches are dicts of tensors: input_ids, attention_mask, labels (-100 = not predicted), and
    for sop also token_type_ids and sentence_order_label. Each sample is read once per epoch
    across all ranks and DataLoader workers; validation and test masks are the same every time.

    Args:
        tokenizer: tokenizer directory made by trainer/train_tokenizer.py (the one the shards were made with).
        train_files: training shards: a path, a glob such as data/train/*.jsonl, or a list of them.
        val_files: validation shards (path, glob or list); read in order, masks fixed.
        test_files: test shards (path, glob or list); read in order, masks fixed.
        objective: mlm (BERT), sop (ALBERT: MLM + sentence order) or clm (GPT-2); must match the shards.
        whole_word_mask: mlm/sop: mask whole words (all pieces of a word together) instead of single pieces.
        mlm_probability: mlm/sop: share of tokens (or words) chosen for prediction.
        batch_size: samples per batch on each device.
        max_seq_len: longer records are cut to this many tokens (sop: around the A|B junction); the share dropped is reported.
        num_workers: DataLoader worker processes per device (0 reads in the training process).
        shuffle_buffer_size: training samples held for shuffling per worker (0 or 1: none; shard order is still drawn per epoch).
        seed: seeds the shard order, the shuffle and the masks.
        baseline_train_tokens: training tokens counted for val/unigram_baseline, the frequency-only val/loss (0: off).
    """

    def __init__(
        self,
        tokenizer: str,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        objective: Literal["mlm", "sop", "clm"] = "mlm",
        whole_word_mask: bool = False,
        mlm_probability: float = 0.15,
        batch_size: int = 32,
        max_seq_len: int = 128,
        num_workers: int = 0,
        shuffle_buffer_size: int = 10000,
        seed: int = 0,
        baseline_train_tokens: int = DEFAULT_MAX_TRAIN_TOKENS,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.train_files = train_files
        self.val_files = val_files
        self.test_files = test_files
        self.objective = objective
        self.whole_word_mask = whole_word_mask
        self.mlm_probability = mlm_probability
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.num_workers = num_workers
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.baseline_train_tokens = baseline_train_tokens
        self._check_options()
        self._tokenizer = None
        self._files: dict[str, list[str]] = {}
        self._shards: dict[str, SplitShards] = {}
        self._baseline: float | None = None
        self._baseline_done = False
        self._position = TrainPosition()
        self._saved_layout: dict = {}
        self._train_stream: JsonlStream | None = None

    def _check_options(self) -> None:
        """All problems with the options at once, each naming its data.* key."""
        problems = []
        if not self.tokenizer_path or not isinstance(self.tokenizer_path, str):
            problems.append("data.tokenizer is required: the tokenizer directory made by trainer/train_tokenizer.py")
        if self.objective not in OBJECTIVES:
            problems.append(f"data.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        elif not isinstance(self.max_seq_len, int) or self.max_seq_len < MIN_SEQ_LEN[self.objective]:
            problems.append(
                f"data.max_seq_len must be >= {MIN_SEQ_LEN[self.objective]} for {self.objective}, got {self.max_seq_len!r}"
            )
        if self.objective == "clm" and self.whole_word_mask:
            problems.append("data.whole_word_mask applies to mlm/sop only; set it to false for clm")
        if self.objective != "clm" and not 0.0 < self.mlm_probability < 1.0:
            problems.append(f"data.mlm_probability must be between 0 and 1 (exclusive), got {self.mlm_probability!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            problems.append(f"data.batch_size must be > 0, got {self.batch_size!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {self.num_workers!r}")
        if not isinstance(self.shuffle_buffer_size, int) or self.shuffle_buffer_size < 0:
            problems.append(f"data.shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"data.seed must be an integer >= 0, got {self.seed!r}")
        if type(self.baseline_train_tokens) is not int or self.baseline_train_tokens < 0:
            problems.append(
                f"data.baseline_train_tokens must be an integer >= 0 (0: no val/unigram_baseline), "
                f"got {self.baseline_train_tokens!r}"
            )
        for split in ("train", "val", "test"):
            value = getattr(self, f"{split}_files")
            if value is not None and not (
                isinstance(value, str) or (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value))
            ):
                problems.append(f"data.{split}_files must be a path, a glob or a list of them, got {value!r}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer, loaded on first use (UserError if data.tokenizer is not one)."""
        if self._tokenizer is None:
            from convmodel.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Check the splits `stage` needs before it starts: files, manifests, record counts, tokenizer.

        UserError naming the option for a pattern matching nothing, shards made for another
        objective or tokenizer, a split without records (or, across devices, with fewer than a
        batch per reader); one warning line when max_seq_len cuts tokens off.
        """
        needed = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": [],
            None: ["train", "val", "test"],
        }.get(stage, [])
        if stage == "fit" and self.train_files is None:
            raise UserError("data.train_files is required for training: give the training shards (a glob or list)")
        if stage == "validate" and self.val_files is None:
            raise UserError("data.val_files is required to validate: give the validation shards (a glob or list)")
        if stage == "test" and self.test_files is None:
            raise UserError("data.test_files is required to test: give the test shards (a glob or list)")
        for split in needed:
            patterns = getattr(self, f"{split}_files")
            if patterns is not None and split not in self._files:
                self._files[split] = expand_files(f"data.{split}_files", patterns)
        _ = self.tokenizer  # load now, so a bad tokenizer fails before training starts
        for split in needed:
            if getattr(self, f"{split}_files") is not None:
                self._split_shards(split)

    def _split_shards(self, split: str) -> SplitShards:
        """The split's counts and checks, done once (see setup)."""
        if split not in self._shards:
            quiet = self.trainer is not None and self.trainer.global_rank != 0
            shards = split_shards(f"data.{split}_files", self._split_files(split), self.objective,
                                  self.tokenizer_path, self.max_seq_len, quiet=quiet)
            train = split == "train"
            world = self.trainer.world_size if self.trainer is not None else 1
            check_enough(shards, self.batch_size, world * max(self.num_workers, 1), equal_counts=train and world > 1)
            reader = self._stream(shards.files, shards.counts, max_seq_len=None, rank=0, world_size=1)
            report_cut_share(shards, reader, self.max_seq_len, quiet=quiet)
            self._shards[split] = shards
        return self._shards[split]

    def _rank_and_world(self) -> tuple[int | None, int | None]:
        """From the attached Trainer (None lets the stream ask torch.distributed)."""
        if self.trainer is None:
            return None, None
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _split_files(self, split: str) -> list[str]:
        if split not in self._files:
            patterns = getattr(self, f"{split}_files")
            if patterns is None:
                raise UserError(f"data.{split}_files is not set; give the {split} shards (a glob or list)")
            self._files[split] = expand_files(f"data.{split}_files", patterns)
        return self._files[split]

    def _end_token_id(self) -> int | None:
        """The id a cut record keeps last: mlm/sop records keep their closing [SEP]."""
        return None if self.objective == "clm" else self.tokenizer.sep_token_id

    def _stream(self, files: list[str], counts: list[int], **options) -> JsonlStream:
        return JsonlStream(
            files,
            seed=self.seed,
            required_fields=("input_ids", "token_type_ids", "sentence_order_label")
            if self.objective == "sop"
            else ("input_ids",),
            end_token_id=self._end_token_id(),
            vocab_size=len(self.tokenizer),
            counts=counts,
            **options,
        )

    def _dataset(self, split: str, shuffle: bool) -> JsonlStream:
        shards = self._split_shards(split)
        rank, world = self._rank_and_world()
        return self._stream(
            shards.files,
            shards.counts,
            max_seq_len=self.max_seq_len,
            shuffle_buffer_size=self.shuffle_buffer_size if shuffle else 0,
            shuffle_shards=shuffle,
            rank=rank,
            world_size=world,
            # DDP ranks must take the same number of training steps, or the last all-reduce hangs
            drop_remainder=shuffle and (world or 1) > 1,
        )

    def unigram_baseline(self) -> float | None:
        """The val/loss a model that knows only token frequencies would reach, computed once.

        See convmodel.data.unigram_baseline: the unigram cross-entropy of the validation shards
        under the counts of the first data.baseline_train_tokens training targets (for sop + ln 2).
        A pretrained model's val/loss should end clearly below it. None without train or val
        files, with data.baseline_train_tokens 0, or when the validation shards have no target.
        Every DDP rank computes the same value from all the files.
        """
        if not self._baseline_done:
            self._baseline = self._compute_baseline()
            self._baseline_done = True
        return self._baseline

    def _compute_baseline(self) -> float | None:
        if self.baseline_train_tokens == 0 or self.train_files is None or self.val_files is None:
            return None
        from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

        try:
            train_files = self._split_files("train")
        except UserError as exc:  # `validate` needs no training shards; without them there is no baseline
            rank_zero_warn(f"no val/unigram_baseline: {exc}")
            return None
        tokenizer = self.tokenizer
        result = unigram_baseline(
            train_files,
            self._split_files("val"),
            self.objective,
            vocab_size=len(tokenizer),
            special_ids={*tokenizer.all_special_ids, tokenizer.pad_token_id} - {None},
            max_seq_len=self.max_seq_len,
            end_token_id=self._end_token_id(),
            max_train_tokens=self.baseline_train_tokens,
        )
        if result is None:
            return None
        order = " + ln 2 for the sentence order" if self.objective == "sop" else ""
        rank_zero_info(
            f"val/unigram_baseline {result.loss:.4f}: the val/loss of a model that knows only token "
            f"frequencies (cross-entropy of {result.val_tokens} validation targets under the counts of "
            f"{result.train_tokens} training targets{order}); val/loss should end below it"
        )
        return result.loss

    def _loader(self, split: str, train: bool) -> DataLoader:
        collator = build_collator(
            self.tokenizer,
            self.objective,
            whole_word_mask=self.whole_word_mask,
            mlm_probability=self.mlm_probability,
            seed=self.seed,
            deterministic=not train,
        )
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        dataset = self._dataset(split, shuffle=train)
        if train:
            self._train_stream = dataset
        return EpochDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collator,
            num_workers=self.num_workers,
            pin_memory=on_gpu and torch.cuda.is_available(),
            persistent_workers=False,
            start_fn=self._begin_pass if train else None,
            on_batch=self._count_batch if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_files is None:
            return []  # Lightning then skips validation
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # ---- exact resume ----------------------------------------------------------------------

    def _trainer_processed(self) -> int | None:
        """The Trainer's total of processed training batches (None without a Trainer)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _batches_per_pass(self) -> int:
        """Training batches this rank takes in one pass over the shards."""
        sizes = self._train_stream.rank_readers(max(self.num_workers, 1))
        return sum(math.ceil(n / self.batch_size) for n in sizes)

    def _begin_pass(self) -> tuple[int, int]:
        pending = self._position.pending
        if pending is not None and pending[1]:
            differences = mismatches(self._saved_layout, self._layout())
            if differences:
                raise UserError(
                    f"cannot continue the checkpoint's epoch {pending[0]} after its {pending[1]} batches with other "
                    f"data options: {'; '.join(differences)}. Set them back to resume exactly, or resume from a "
                    "checkpoint saved at the end of an epoch"
                )
        return self._position.begin_pass(self._current_epoch(), self._batches_per_pass, self._trainer_processed())

    def _count_batch(self) -> None:
        self._position.yielded += 1

    def _layout(self) -> dict:
        """What a mid-epoch position depends on besides the files' content (see train_position.LAYOUT)."""
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "world_size": self.trainer.world_size if self.trainer is not None else 1, "seed": self.seed,
                "shuffle_buffer_size": self.shuffle_buffer_size, "records": sum(self._split_shards("train").counts)}

    def state_dict(self) -> dict:
        """Where training stands in the data: saved by Lightning in every checkpoint."""
        position = self._position
        if position.started:
            epoch, batches = position.epoch, position.consumed(self._trainer_processed())
        else:
            epoch, batches = position.pending or (self._current_epoch(), 0)
        state = {"format": FORMAT, "epoch": epoch, "batches": batches}
        if self.train_files is not None and batches:
            state.update(self._layout())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue at the saved position when the training stream next starts (see _begin_pass)."""
        if state_dict.get("format") != FORMAT:
            return  # a checkpoint from before positions were saved: the epoch starts over, as it did then
        self._position = TrainPosition()
        self._position.pending = (int(state_dict["epoch"]), int(state_dict["batches"]))
        self._saved_layout = state_dict
