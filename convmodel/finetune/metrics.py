"""Task metrics over a whole split (never averaged over batches, which would bias F1 and correlations).

- token classification: entity-level precision/recall/F1 with seqeval's semantics (an entity is
  right when its type and both ends are), micro over types, plus each type's own scores;
- sequence classification: accuracy, macro-F1 and Matthews correlation (torchmetrics);
- regression: Pearson and Spearman correlation (torchmetrics).

Every score is higher-is-better, so early stopping and the best checkpoint use mode max.
"""

import torch

#: the metric that picks the best checkpoint and stops early, unless --model.metric says another
DEFAULT_METRIC = {"token_classification": "f1", "sequence_classification": "accuracy", "regression": "pearson"}
METRICS = {"token_classification": ("f1", "precision", "recall", "accuracy"),
           "sequence_classification": ("accuracy", "macro_f1", "mcc"),
           "regression": ("pearson", "spearman")}


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity precision/recall/F1 (micro over types), word accuracy, and `f1_TYPE` etc. per type."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    scores = {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
              "f1": float(micro["f1-score"]), "accuracy": float(accuracy_score(gold, predicted))}
    for name, values in report.items():
        if not name.endswith(" avg"):
            for key in ("precision", "recall"):
                scores[f"{key}_{name}"] = float(values[key])
            scores[f"f1_{name}"] = float(values["f1-score"])
    return scores


def classification_scores(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 (classes absent from both sides left out) and Matthews correlation."""
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_matthews_corrcoef

    present = torch.unique(torch.cat([predicted, target]))
    per_class = multiclass_f1_score(predicted, target, num_classes=num_classes, average="none")
    return {"accuracy": float((predicted == target).float().mean()),
            "macro_f1": float(per_class[present].mean()),
            "mcc": float(multiclass_matthews_corrcoef(predicted, target, num_classes=num_classes))}


def regression_scores(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation of predictions and gold numbers (0 where one side is constant)."""
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    predicted, target = predicted.double(), target.double()
    if predicted.numel() < 2 or predicted.std() == 0 or target.std() == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearson_corrcoef(predicted, target)),
            "spearman": float(spearman_corrcoef(predicted, target))}
