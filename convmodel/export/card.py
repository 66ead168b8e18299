"""The exported folder's README.md: metadata, how the model was trained, how to use it."""

import os
from typing import Any

from convmodel.errors import UserError

# The Auto class that loads each objective's model, for the model card.
AUTO_CLASSES = {"mlm": "AutoModelForMaskedLM", "sop": "AutoModelForPreTraining", "clm": "AutoModelForCausalLM"}
PIPELINE_TAGS = {"mlm": "fill-mask", "sop": "fill-mask", "clm": "text-generation"}
# What Lightning adds to the hyperparameters of a module built by LightningCLI.
LIGHTNING_HPARAM_KEYS = ("_class_path", "_instantiator")


def training_summary(checkpoint: dict, run_config: dict, class_path: str) -> dict[str, Any]:
    """Steps, epoch, last metrics and the training config recorded in the checkpoint."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path") or class_path
    for key in LIGHTNING_HPARAM_KEYS:
        hparams.pop(key, None)
    data = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k not in
            LIGHTNING_HPARAM_KEYS}
    training_config: dict[str, Any] = {"model": {"class_path": class_path, "init_args": hparams}}
    if data:
        training_config["data"] = data
    if isinstance(run_config.get("trainer"), dict):
        training_config["trainer"] = run_config["trainer"]
    return {
        "global_step": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "metrics": recorded_metrics(checkpoint),
        "metrics_step": _metrics_step(checkpoint),
        "config": _plain(training_config),
    }


def recorded_metrics(checkpoint: dict) -> dict[str, float]:
    """The last validation metrics the checkpoint holds.

    Lightning keeps logged metrics out of checkpoints; they are there when convmodel recorded
    them (`convmodel.metrics`) or when a ModelCheckpoint monitored one (its current score).
    """
    metrics: dict[str, float] = {}
    ours = checkpoint.get("convmodel")
    if isinstance(ours, dict) and isinstance(ours.get("metrics"), dict):
        metrics |= {str(k): float(v) for k, v in ours["metrics"].items() if _is_number(v)}
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if str(name).startswith("ModelCheckpoint") and isinstance(state, dict):
            monitor, score = state.get("monitor"), state.get("current_score")
            if monitor and monitor not in metrics and _is_number(score):
                metrics[str(monitor)] = float(score)
    return metrics


def _metrics_step(checkpoint: dict) -> int | None:
    """The global step of the validation behind the recorded metrics, when the checkpoint says it.

    A step's checkpoint (ModelCheckpoint's every_n_train_steps) is written before that step's
    validation runs, so the recorded val/* can be an earlier validation's; only this step tells.
    """
    ours = checkpoint.get("convmodel")
    step = ours.get("metrics_step") if isinstance(ours, dict) else None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def _is_number(value) -> bool:
    try:
        return value is not None and float(value) == float(value)  # NaN is no result
    except (TypeError, ValueError, RuntimeError):
        return False


def _plain(value):
    """A value yaml.safe_dump can write: tuples as lists, tensors and other objects as numbers or text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def card_metadata(language, license, datasets) -> dict[str, Any]:
    """The card's optional YAML fields from --language, --license and --datasets, checked before any work."""
    metadata: dict[str, Any] = {}
    for option, value in (("language", language), ("datasets", datasets)):
        if value is None:
            continue
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else None
        items = [str(item).strip() for item in items or [] if str(item).strip()]
        if not items:
            raise UserError(f"--{option} {value!r} names nothing; give e.g. --{option} "
                            + ("en (or en,ja)" if option == "language" else "wikitext (or several, comma-separated)"))
        metadata[option] = items[0] if option == "language" and len(items) == 1 else items
    if license is not None:
        if not isinstance(license, str) or not license.strip() or " " in license.strip():
            raise UserError(f"--license {license!r} is not a license id; give a Hub license id such as apache-2.0")
        metadata["license"] = license.strip()
    return metadata


def metrics_lines(summary: dict) -> str:
    """The card's validation results, saying which step they were measured at.

    "final" only when the checkpoint records that its validation ran at its own step: a step's
    checkpoint is written before that step's validation, so val/loss may be an earlier one's.
    """
    metrics, step, measured = summary["metrics"], summary["global_step"], summary.get("metrics_step")
    val_loss = metrics.get("val/loss")
    if val_loss is None:
        loss_line = "- final validation loss: not recorded in the checkpoint\n"
    else:
        value = f"{val_loss:.4f}" + (f" (perplexity {metrics['val/ppl']:.2f})" if "val/ppl" in metrics else "")
        if measured == step:
            loss_line = f"- final validation loss: {value}\n"
        elif measured is not None:
            loss_line = (f"- validation loss at step {measured}: {value} (the last validation before the "
                         f"checkpoint of step {step})\n")
        else:
            loss_line = (f"- last validation loss before the checkpoint: {value} (the checkpoint does not record "
                         "the step it was measured at)\n")
    others = "".join(f"- {k}: {v:.4f}\n" for k, v in sorted(metrics.items()) if k not in ("val/loss", "val/ppl"))
    return loss_line + others


def usage_example(pipeline_tag: str, auto_class: str, name: str, trust: str) -> str:
    """The card's Python example; for text generation, the prompt and its continuation decoded together.

    transformers' text-generation pipeline decodes the new tokens apart from the prompt; a
    sentencepiece tokenizer drops the space at the start of a decoded text, so the pipeline
    would glue the two ("Return the list ofthe list").
    """
    load = (f'tokenizer = AutoTokenizer.from_pretrained("{name}"{trust})\n'
            f'model = {auto_class}.from_pretrained("{name}"{trust})\n')
    if pipeline_tag == "fill-mask":
        return (f"from transformers import AutoTokenizer, {auto_class}, pipeline\n\n{load}\n"
                f'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)\n'
                'print(fill("The capital of France is [MASK]."))\n')
    return (f"from transformers import AutoTokenizer, {auto_class}\n\n{load}\n"
            'inputs = tokenizer("The meaning of life is", return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=20, do_sample=True, top_k=40)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))  # the prompt and its continuation\n")


def model_card(model, module, summary: dict, name: str, metadata: dict[str, Any] | None = None) -> str:
    """README.md: what the model is, how it was trained and how to load it."""
    import yaml

    objective = module.objective
    auto_class = AUTO_CLASSES.get(objective, "AutoModel")
    pipeline_tag = PIPELINE_TAGS.get(objective, "feature-extraction")
    remote = bool(getattr(model.config, "auto_map", None))
    trust = ", trust_remote_code=True" if remote else ""
    tags = ["convmodel", model.config.model_type, objective]
    front_matter = yaml.safe_dump({**(metadata or {}), "library_name": "transformers", "pipeline_tag": pipeline_tag,
                                   "tags": tags}, sort_keys=False, allow_unicode=True)
    config_yaml = yaml.safe_dump(summary["config"], sort_keys=False, allow_unicode=True)
    remote_note = ("\nThe model's code ships in this folder (modeling_*.py), hence `trust_remote_code=True`; "
                   "read it before running it.\n" if remote else "")
    return f"""---
{front_matter}---

# {os.path.basename(os.path.normpath(name))}

A {type(model).__name__} ({model.num_parameters():,} parameters) pretrained from scratch with
convmodel ({type(module).__name__}, objective `{objective}`).

## Training

- optimizer steps: {summary['global_step']}
- epoch: {summary['epoch']}
{metrics_lines(summary)}
Training config (from the checkpoint):

```yaml
{config_yaml}```

## How to use

```python
{usage_example(pipeline_tag, auto_class, name, trust)}```
{remote_note}"""
