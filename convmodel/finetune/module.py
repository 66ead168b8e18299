"""FinetuneModule: a pretrained encoder or decoder with a task head, trained and scored on one task.

The transformers model is `AutoModelForTokenClassification` / `AutoModelForSequenceClassification`
built from the pretrained folder (convmodel.finetune.source), with the label names in its config
(id2label/label2id), so the exported folder works in `transformers.pipeline` as it is.
Predictions are gathered over a whole split and scored at its end (convmodel.finetune.metrics);
`val/score` repeats the metric chosen by `metric`, which the configs' early stopping and best
checkpoint monitor.
"""

import json
import math
import os

import pytorch_lightning as pl
import torch

from convmodel.errors import UserError
from convmodel.finetune.encoding import INPUT_KEYS
from convmodel.finetune.metrics import (
    DEFAULT_METRIC,
    METRICS,
    classification_scores,
    entity_scores,
    regression_scores,
)
from convmodel.finetune.readers import TaskName
from convmodel.optim import build_optimizer, build_scheduler, param_groups


class FinetuneModule(pl.LightningModule):
    """A task head on a pretrained model (BERT or GPT-2), fine-tuned end to end.

    Args:
        source: The pretrained model: a Hugging Face model folder (what export_model.py writes) or a .ckpt written by trainer.py.
        task: token_classification, sequence_classification or regression (linked from data.task).
        labels: Label names, from the training file (linked from the data section); null for regression.
        metric: Metric that picks the best checkpoint and stops early (logged as val/score); default f1 (token classification), accuracy (sequence classification), pearson (regression).
        lr: Peak learning rate, reached at the end of warmup.
        weight_decay: Decoupled weight decay on matrices (not biases or norms).
        warmup_ratio: Share of the training steps with linear warmup from 0, then linear decay to 0.
        classifier_dropout: Dropout before the head; null keeps the pretrained config's.
        random_init: Start from the source's architecture and tokenizer with random weights instead of its trained ones (the baseline that shows what pretraining brings).
    """

    def __init__(
        self,
        source: str,
        task: TaskName = "sequence_classification",
        labels: list[str] | None = None,
        metric: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        classifier_dropout: float | None = None,
        random_init: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.task, self.labels = task, None if labels is None else list(labels)
        self.metric = metric or DEFAULT_METRIC[task]
        if self.metric not in METRICS[task]:
            raise UserError(f"--model.metric {metric!r} is not a {task} metric; choose one of "
                            f"{', '.join(METRICS[task])}")
        if task != "regression" and not self.labels:
            raise UserError(f"{task} needs label names (linked from the training file); the training file has none")
        self.model = build_task_model(source, task, self.labels, classifier_dropout, random_init)
        self._outputs: list[tuple[torch.Tensor, ...]] = []

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # the split's predictions are gathered on each process, not across them
            raise UserError(f"fine-tuning scores a split on one process; give --trainer.devices 1 (not "
                            f"{self.trainer.world_size} processes)")

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**{k: batch[k] for k in INPUT_KEYS if k in batch}, labels=batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---- scoring a split ------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        out = self(batch)
        self.log(f"{prefix}/loss", out.loss, batch_size=batch["input_ids"].shape[0])
        if self.task == "token_classification":
            self._outputs.append((out.logits.argmax(-1).cpu(), batch["word_index"].cpu(), batch["word_labels"].cpu()))
        elif self.task == "sequence_classification":
            self._outputs.append((out.logits.argmax(-1).cpu(), batch["labels"].cpu()))
        else:
            self._outputs.append((out.logits.squeeze(-1).float().cpu(), batch["labels"].cpu()))

    def _eval_end(self, prefix: str) -> None:
        if not self._outputs:
            return
        scores = self.split_scores(self._outputs)
        self._outputs = []
        for name, value in scores.items():
            self.log(f"{prefix}/{name}", value)
        if prefix == "val":
            self.log("val/score", scores[self.metric], prog_bar=True)

    def split_scores(self, outputs: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
        """The task's scores over all of a split's batches."""
        if self.task == "token_classification":
            gold, predicted = [], []
            for predictions, word_index, word_labels in outputs:
                for row in range(predictions.shape[0]):
                    g, p = word_tags(predictions[row], word_index[row], word_labels[row], self.labels)
                    gold.append(g)
                    predicted.append(p)
            return entity_scores(gold, predicted)
        predicted = torch.cat([o[0] for o in outputs])
        target = torch.cat([o[1] for o in outputs])
        if self.task == "sequence_classification":
            return classification_scores(predicted, target, len(self.labels))
        return regression_scores(predicted, target)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_end("test")

    # ---- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer("adamw", param_groups(self.model, hp.weight_decay), hp.lr,
                                    weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if not 0 <= hp.warmup_ratio < 1:
            raise UserError(f"--model.warmup_ratio {hp.warmup_ratio}: give a share in [0, 1)")
        if total <= 0 or math.isinf(total):
            raise UserError("the number of training steps is unknown: set --trainer.max_steps or --trainer.max_epochs")
        scheduler = build_scheduler(optimizer, "linear", int(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def word_tags(predictions: torch.Tensor, word_index: torch.Tensor, word_labels: torch.Tensor,
              labels: list[str]) -> tuple[list[str], list[str]]:
    """Gold and predicted tags of one sentence's words; a word with no sub-token left (cut) is predicted O."""
    gold = [labels[i] for i in word_labels.tolist() if i >= 0]
    outside = "O" if "O" in labels else labels[0]
    predicted = [outside] * len(gold)
    for position in (word_index >= 0).nonzero().flatten().tolist():
        predicted[int(word_index[position])] = labels[int(predictions[position])]
    return gold, predicted


def build_task_model(source: str, task: str, labels: list[str] | None, classifier_dropout: float | None,
                     random_init: bool = False):
    """The transformers model with a fresh head for `task`, its label names and a pad id in the config.

    With random_init only the source's config is used: the same architecture, weights drawn as
    `_init_weights` draws them (under the run's seed).
    """
    import transformers

    from convmodel.finetune.source import load_source_tokenizer, pretrained_folder

    folder = pretrained_folder(source)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        if json.load(f).get("model_type") == "lean_albert":  # its classes, registered with the Auto classes
            import convmodel.models.lean_albert  # noqa: F401
    auto = (transformers.AutoModelForTokenClassification if task == "token_classification"
            else transformers.AutoModelForSequenceClassification)
    kwargs = {"num_labels": 1, "problem_type": "regression"} if labels is None else {
        "num_labels": len(labels), "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)}}
    if task == "sequence_classification":
        kwargs["problem_type"] = "single_label_classification"
    if classifier_dropout is not None:
        kwargs["classifier_dropout"] = classifier_dropout
    try:
        if random_init:
            model = auto.from_config(transformers.AutoConfig.from_pretrained(folder, **kwargs))
        else:
            model = auto.from_pretrained(folder, **kwargs)
    except ValueError as exc:  # an architecture without this head
        raise UserError(f"--model.source {source}: transformers has no {task} head for it ({exc})") from exc
    if model.config.pad_token_id is None:  # GPT-2 finds each sequence's last token by the pad id
        model.config.pad_token_id = load_source_tokenizer(source).pad_token_id
    return model.train()  # from_pretrained returns eval mode, and Lightning keeps a module's mode
