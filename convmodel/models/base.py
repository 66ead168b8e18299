"""PretrainingModule: what every pretraining LightningModule shares.

Steps and logging (loss, perplexity, learning rate, tokens/s), optimizer and schedule,
checks that stop a mismatched tokenizer, data or checkpoint with one clear message, and
`to_hf()` for export. A subclass only builds its transformers model and says how a batch
becomes a loss (`compute_losses`).
"""

import inspect
import math
import os
import time
from typing import Literal, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from convmodel.errors import UserError
from convmodel.optim import build_optimizer, build_scheduler, param_groups
from convmodel.special_ids import read_special_ids

PREDICTION_ROWS = 128  # the MLM vocabulary projection runs on a multiple of this many masked tokens


class Losses(NamedTuple):
    """What one batch gives: the loss to optimise and the language-model part of it.

    `lm_loss` is the mean cross entropy over the `n_targets` predicted tokens (masked
    tokens for MLM, next tokens for CLM); perplexity is exp of its token-weighted mean.
    For MLM and CLM `loss` is `lm_loss`; SOP adds the sentence-order loss.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    n_targets: torch.Tensor


def make_hf_config(config_class: type, user: dict | None, fixed: dict, option: str = "model.init_args.config"):
    """`config_class(**user, **fixed)`, refusing typos and keys that come from the tokenizer.

    transformers configs accept any keyword silently, so `hidden_sizes: 64` would train a
    default-size model; we name every unknown key at once instead.
    """
    user = dict(user or {})
    signature = inspect.signature(config_class.__init__).parameters
    known = {n for n, p in signature.items() if p.kind is not p.VAR_KEYWORD and n != "self"}
    known |= set(getattr(config_class, "attribute_map", {})) | {"attn_implementation"}
    problems = []
    unknown = sorted(set(user) - known)
    if unknown:
        problems.append(f"unknown key(s) {unknown} for {config_class.__name__}")
    from_tokenizer = sorted(set(user) & set(fixed))
    if from_tokenizer:
        problems.append(f"{from_tokenizer} come(s) from the tokenizer (data.tokenizer); remove them")
    if problems:
        raise UserError(f"{option}: " + "; ".join(problems))
    defaults = {n: p.default for n, p in signature.items() if p.default is not p.empty}
    attribute_map = getattr(config_class, "attribute_map", {})
    for key, value in user.items():
        default = defaults.get(attribute_map.get(key, key))
        user[key] = typed_config_value(value, default, f"{option}.{key}", config_class.__name__)
    return config_class(**user, **fixed)


def typed_config_value(value, default, option: str, class_name: str):
    """A command-line string as the type of the config class's default (`num_hidden_layers 4` is 4, not '4').

    jsonargparse cannot know the types inside the free-form `config` dict, so
    `--model.init_args.config.num_hidden_layers 4` arrives as the string '4', which transformers
    accepts and the model build then fails on far from the option. Strings stay strings where
    the default is a string (`hidden_act gelu`).
    """
    if not isinstance(value, str) or isinstance(default, str):
        return value
    import yaml

    kind = type(default)
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)  # also 1e-3, which YAML 1.1 reads as a string
        parsed = yaml.safe_load(value)
    except (ValueError, yaml.YAMLError):
        parsed = value
    if default is None or (kind is bool and isinstance(parsed, bool)) or (kind in (list, tuple) and isinstance(
            parsed, list)) or (kind is dict and isinstance(parsed, dict)) or kind not in (bool, int, float, list,
                                                                                           tuple, dict):
        return parsed
    wanted = {bool: "true or false", int: "an int", float: "a number", list: "a list", tuple: "a list",
              dict: "a mapping"}[kind]
    raise UserError(f"{option}: {value!r} is not {wanted} (the type of {class_name}'s default {default!r}); "
                    f"give e.g. {default!r}")


class PretrainingModule(pl.LightningModule):
    """Base of the pretraining modules: steps, logging, optimizer, schedule and checks.

    Args:
        tokenizer: Tokenizer folder; vocabulary size and special ids come from it (linked from data.tokenizer).
        objective: Pretraining objective: mlm, sop or clm (linked from data.objective).
        optimizer: adamw, lamb (fp32 state) or lamb8bit (the same LAMB step, moments in 8 bits; needs bitsandbytes); LAMB's trust ratio applies to matrices, biases and norms take Adam steps.
        lr: Peak learning rate, reached at the end of warmup.
        weight_decay: Decoupled weight decay, applied to matrices only (not biases or norms).
        betas: Adam/LAMB moment coefficients (beta1, beta2).
        eps: Adam/LAMB epsilon added to the root of the second moment.
        schedule: linear (warmup, then linear decay to 0 at total_steps) or constant (warmup, then flat).
        warmup_steps: Optimizer steps of linear warmup from 0 to lr.
        total_steps: Optimizer steps of the linear schedule; default trainer.max_steps.
    """

    def __init__(
        self,
        tokenizer: str,
        objective: str = "mlm",
        optimizer: Literal["adamw", "lamb", "lamb8bit"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        schedule: Literal["linear", "constant"] = "linear",
        warmup_steps: int = 1000,
        total_steps: int | None = None,
    ):
        super().__init__()
        self.tokenizer_path = tokenizer
        self.objective = objective
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.special_ids = read_special_ids(tokenizer)
        self.vocab_size = self.special_ids.vocab_size
        self.model = None  # the transformers model; built by the subclass
        self._last_batch_end: float | None = None
        self._eval_sums: torch.Tensor | None = None

    # ---- what a subclass provides -------------------------------------------------------

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> Losses:
        """Turn a collated batch into losses (subclasses implement this)."""
        raise NotImplementedError

    def masked_lm_losses(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], lm_head, sop_logits=None) -> Losses:
        """MLM loss on the masked positions only (+ SOP for objective sop), shared by the encoder families.

        `lm_head` maps (N, H) -> (N, V); `sop_logits()` gives the (B, 2) sentence-order logits.
        Projecting only the ~15% masked tokens onto the vocabulary is the point: with a small
        hidden size and an 8k vocabulary that projection costs more than the encoder.
        """
        labels = batch["labels"]  # (B, T), -100 where not masked
        targets = labels != -100
        n_targets = targets.sum()
        if n_targets > 0:
            positions = targets.flatten().nonzero().squeeze(1)  # (N,), N = masked tokens
            # N changes every batch; rounded up to a multiple of PREDICTION_ROWS (extra rows
            # predict position 0 with label -100: no loss, no gradient), the (N, V) logits and
            # their gradients come in a few sizes that the allocator reuses. Exact sizes made
            # glibc's heap grow by ~2 MB a step on CPU, as no freed block fitted the next one.
            padding = -positions.numel() % PREDICTION_ROWS
            rows = F.pad(positions, (0, padding))
            logits = lm_head(hidden.flatten(0, 1)[rows])  # (N + padding, V)
            lm_loss = F.cross_entropy(logits.float(), F.pad(labels.flatten()[positions], (0, padding), value=-100))
        else:  # no masked token: zero loss that still reaches every parameter (no NaN)
            lm_loss = hidden.sum() * 0.0
        if self.objective != "sop":
            return Losses(lm_loss, lm_loss, n_targets)
        if "sentence_order_label" not in batch:
            raise UserError("objective sop needs 'sentence_order_label' in every batch; prepare the shards "
                            "with objective sop (prepare_train_data.py --objective sop)")
        sop_loss = F.cross_entropy(sop_logits().float(), batch["sentence_order_label"].view(-1))
        return Losses(lm_loss + sop_loss, lm_loss, n_targets)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings can take."""
        raise NotImplementedError

    max_positions_option = "model.init_args.config.max_position_embeddings"

    def to_hf(self):
        """The transformers PreTrainedModel being trained (export saves it with save_pretrained)."""
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---- training -------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        batch_size = batch["input_ids"].shape[0]
        # this rank's values, not synced: under DDP a collective per micro-batch would cost a
        # round trip every step for a number that is only logged every log_every_n_steps; the
        # learning rate is logged here only (configs carry no LearningRateMonitor)
        self.log("train/loss", losses.loss, prog_bar=True, batch_size=batch_size)
        self.log("train/lr", self._current_lr(), batch_size=batch_size)
        return losses.loss

    def _current_lr(self) -> float:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else float("nan")

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None

    def on_train_batch_end(self, outputs, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # tokens/s over the wall time between consecutive batch ends: data loading, forward,
        # backward and optimizer step of this batch. The job's throughput is this rank's times
        # the number of ranks (DDP ranks step in lockstep on equally sized batches), so no
        # collective runs per micro-batch
        now = time.perf_counter()
        if self._last_batch_end is not None and now > self._last_batch_end:
            mask = batch.get("attention_mask")
            # a tensor, not a float: no device sync on every step
            tokens = mask.sum() if mask is not None else torch.tensor(float(batch["input_ids"].numel()))
            ranks = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/tokens_per_s", tokens.float() * ranks / (now - self._last_batch_end), on_step=True,
                     on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self._last_batch_end = now

    # ---- evaluation: token-weighted loss over the whole epoch ------------------------------

    def on_validation_epoch_start(self) -> None:
        self._last_batch_end = None  # the time spent validating is not training throughput
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    on_test_epoch_start = on_validation_epoch_start

    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        losses = self.compute_losses(batch)
        n = losses.n_targets.to(torch.float64)
        if n > 0:
            self._eval_sums += torch.stack([losses.loss.double() * n, losses.lm_loss.double() * n, n])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def _epoch_metrics(self, stage: str) -> dict[str, float] | None:
        """`{stage}/loss` and `{stage}/ppl`, each batch weighted by its number of predicted tokens."""
        sums = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        loss_sum, lm_sum, n = (float(x) for x in sums)
        if n == 0:
            return None
        return {f"{stage}/loss": loss_sum / n, f"{stage}/ppl": math.exp(min(lm_sum / n, 700.0))}

    def on_validation_epoch_end(self) -> None:
        metrics = self._epoch_metrics("val")
        if metrics is None:
            return
        baseline = self._unigram_baseline()
        if baseline is not None:  # beside val/loss, so TensorBoard shows whether the model beat frequencies
            metrics["val/unigram_baseline"] = baseline
        if self.trainer.sanity_checking:
            # Lightning drops what is logged during the sanity check; write it straight to the
            # loggers so the validation curve starts before the first training step
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
            return
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name.endswith("loss"), sync_dist=True)
        self._metrics_step = self.global_step  # the model card says "final" only when it is this step's

    def _unigram_baseline(self) -> float | None:
        """The val/loss of a frequency-only model, from a datamodule that offers one (JsonlDataModule).

        Duck-typed: other datamodules (hand-built batches in tests, a user's own) have none.
        The datamodule caches it, so only the first validation pays for reading the shards.
        """
        compute = getattr(getattr(self.trainer, "datamodule", None), "unigram_baseline", None)
        return compute() if callable(compute) else None

    def on_test_epoch_end(self) -> None:
        metrics = self._epoch_metrics("test")
        if metrics is not None:
            for name, value in metrics.items():
                self.log(name, value, sync_dist=True)

    # ---- optimizer and schedule -------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = build_optimizer(
            self.optimizer_name,
            param_groups(self, self.weight_decay),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        total = self.total_steps
        if total is None and self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        if self.schedule == "linear" and total is not None and total < self.warmup_steps:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"model.init_args.warmup_steps ({self.warmup_steps}) >= total steps ({total}): "
                           "the learning rate never reaches model.init_args.lr")
        scheduler = build_scheduler(optimizer, self.schedule, self.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checks -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        max_seq_len = getattr(datamodule, "max_seq_len", None)
        if max_seq_len is not None and max_seq_len > self.max_positions:
            raise UserError(
                f"data.max_seq_len ({max_seq_len}) is longer than the model's position embeddings "
                f"({self.max_positions}, {self.max_positions_option}); lower data.max_seq_len or "
                f"raise {self.max_positions_option}")
        # JsonlDataModule keeps the path in `tokenizer_path` (its `tokenizer` is the loaded one)
        data_tokenizer = getattr(datamodule, "tokenizer_path", None)
        if isinstance(data_tokenizer, str) and not _same_path(data_tokenizer, self.tokenizer_path):
            data_vocab = read_special_ids(data_tokenizer).vocab_size
            if data_vocab != self.vocab_size:
                raise UserError(
                    f"data.tokenizer {data_tokenizer} has {data_vocab} tokens but the model was built for "
                    f"tokenizer {self.tokenizer_path} with {self.vocab_size}; use the same tokenizer for both")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning keeps no logged metrics in checkpoints; export's model card reads them here
        metrics = {} if self._trainer is None else {
            name: float(value) for name, value in self.trainer.callback_metrics.items()
            if name.startswith(("val/", "train/loss")) and value.numel() == 1}
        checkpoint["convmodel"] = {
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_path,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "metrics": metrics,
            # the step of the validation behind val/*: a step's checkpoint can be written before it
            "metrics_step": getattr(self, "_metrics_step", None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # runs before the state dict is loaded, so a mismatch ends in one message, not a wall
        # of size-mismatch lines
        saved = checkpoint.get("convmodel", {})
        if saved.get("vocab_size") is not None and saved["vocab_size"] != self.vocab_size:
            raise UserError(
                f"the checkpoint was trained with tokenizer {saved.get('tokenizer')} ({saved['vocab_size']} "
                f"tokens) but data.tokenizer is {self.tokenizer_path} ({self.vocab_size} tokens); set "
                f"data.tokenizer to the checkpoint's tokenizer, or start a new run without --ckpt_path")
        own = self.state_dict()
        mismatched = [
            f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(own[name].shape)}"
            for name, value in checkpoint.get("state_dict", {}).items()
            if name in own and hasattr(value, "shape") and value.shape != own[name].shape
        ]
        if mismatched:
            more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
            raise UserError(
                "the checkpoint does not fit the model: " + "; ".join(mismatched[:3]) + more
                + "; use the model.init_args.config the checkpoint was trained with")


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
