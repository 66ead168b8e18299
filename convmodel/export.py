"""From a training checkpoint to a Hugging Face model folder a user can load and publish.

    python trainer/export_model.py --ckpt_path runs/bert-tiny/checkpoints/last.ckpt --output_dir out/model

One code path for every model family: the checkpoint names its LightningModule, Lightning
rebuilds it from the saved hyperparameters, and `module.to_hf()` gives the transformers model,
saved with `save_pretrained` (safetensors; for LeanALBERT also its code files, so the folder
loads with `trust_remote_code=True`). Beside it go the tokenizer the run trained on, fitted to
the model (a causal LM gets no [CLS]/[SEP] and no token_type_ids), and a model card.

The folder is written to a temporary sibling and renamed at the end, so a failed export never
leaves half a model behind, and `--push_to_hub` uploads only a complete folder; a failed upload
leaves it in place.
"""

import importlib
import os
import shutil
import tempfile
from typing import Any

from convmodel.errors import UserError

DTYPES = ("float32", "float16", "bfloat16")
# The Auto class that loads each objective's model, for the model card.
AUTO_CLASSES = {"mlm": "AutoModelForMaskedLM", "sop": "AutoModelForPreTraining", "clm": "AutoModelForCausalLM"}
PIPELINE_TAGS = {"mlm": "fill-mask", "sop": "fill-mask", "clm": "text-generation"}
# The transformers sub-model each family keeps in `module.model`: how a checkpoint without a
# recorded class still says which module wrote it.
FAMILY_PREFIXES = {
    "model.bert.": "convmodel.models.BertPretraining",
    "model.transformer.": "convmodel.models.Gpt2Pretraining",
    "model.albert.": "convmodel.models.lean_albert_pretraining.LeanAlbertPretraining",
}
# What Lightning adds to the hyperparameters of a module built by LightningCLI.
LIGHTNING_HPARAM_KEYS = ("_class_path", "_instantiator")


class PushError(Exception):
    """The upload to the Hub failed after the folder was written (not a mistake in the arguments)."""


def export_model(
    ckpt_path: str,
    output_dir: str,
    config: str | None = None,
    tokenizer: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    language: str | list[str] | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
) -> str:
    """Export a convmodel checkpoint as a Hugging Face model folder, optionally pushed to the Hub.

    Args:
        ckpt_path: checkpoint written by trainer.py (e.g. runs/bert-tiny/checkpoints/last.ckpt).
        output_dir: folder to write: config.json, model.safetensors, the tokenizer, README.md.
        config: the run's YAML; used for model.class_path and data.tokenizer when the checkpoint
            lacks them, and for the trainer section of the model card.
        tokenizer: tokenizer folder to ship instead of the one recorded in the checkpoint (when
            that one has moved); it must have the same vocabulary.
        push_to_hub: upload the folder to this Hub repository (NAME or ORG/NAME), created if missing;
            the token comes from HF_TOKEN or `hf auth login`.
        private: create the Hub repository as private.
        commit_message: commit message of the upload.
        dtype: float32, float16 or bfloat16: the precision of the saved weights.
        overwrite: replace output_dir if it exists and is not empty.
        language: the model card's `language` metadata: ISO 639-1 codes of the training text
            (en, or a comma-separated list); left out of the card when not given.
        license: the model card's `license` metadata, a Hub license id (e.g. apache-2.0, mit);
            left out when not given: only the model's owner can choose it.
        datasets: the model card's `datasets` metadata: Hub dataset ids the model was trained on
            (comma-separated); left out when not given.

    Returns:
        output_dir.
    """
    ckpt_path, output_dir = str(ckpt_path), str(output_dir)
    dtype = str(dtype)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if push_to_hub is not None:
        push_to_hub = check_repo_id(str(push_to_hub))
    metadata = card_metadata(language, license, datasets)
    check_output_dir(output_dir, overwrite)
    checkpoint = read_checkpoint(ckpt_path)
    run_config = read_run_config(config) if config is not None else {}
    module_class = find_module_class(checkpoint, ckpt_path, run_config, config)
    tokenizer_path = find_tokenizer(checkpoint, ckpt_path, run_config, tokenizer)
    check_not_inside(output_dir, overwrite, {"--ckpt_path": ckpt_path, "the tokenizer": tokenizer_path})
    hf_tokenizer = load_matching_tokenizer(tokenizer_path, checkpoint, tokenizer is not None)

    module = load_module(module_class, ckpt_path, tokenizer_path)
    model = prepare_model(module, hf_tokenizer, dtype)
    fit_tokenizer(hf_tokenizer, module)
    summary = training_summary(checkpoint, run_config, f"{module_class.__module__}.{module_class.__name__}")
    print(f"Loaded {type(module).__name__} from {ckpt_path} (step {summary['global_step']}); "
          f"exporting {type(model).__name__} ({dtype})")

    write_folder(output_dir, overwrite, lambda folder: save_folder(
        folder, model, hf_tokenizer, model_card(model, module, summary, push_to_hub or output_dir, metadata)))
    print(f"Saved the model to {output_dir}")
    if push_to_hub is not None:
        message = commit_message or f"Export {type(model).__name__} at step {summary['global_step']} with convmodel"
        url = push_folder(output_dir, push_to_hub, private, str(message))
        print(f"Uploaded {output_dir} to {url}")
    return output_dir


# ---- reading the checkpoint ------------------------------------------------------------------


def read_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint as a dict, memory-mapped (Lightning reads it again to build the module).

    Only tensors and plain values are unpickled (torch's weights_only), as Lightning does for
    local files: exporting a checkpoint never runs code stored in it.
    """
    import pickle
    import zipfile

    import torch

    if not os.path.isfile(ckpt_path):
        raise UserError(f"--ckpt_path {ckpt_path}: no such file; give a .ckpt written by trainer.py "
                        "(e.g. runs/bert-tiny/checkpoints/last.ckpt)")
    if not zipfile.is_zipfile(ckpt_path):  # torch.save has written zip archives since torch 1.6
        raise UserError(f"--ckpt_path {ckpt_path} is not a PyTorch checkpoint; give a .ckpt written by trainer.py")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise UserError(f"--ckpt_path {ckpt_path} holds Python objects other than tensors and plain values "
                        f"({detail or 'refused by torch.load(weights_only=True)'}), so it is not a checkpoint of "
                        "convmodel's trainer.py") from exc
    except Exception as exc:  # a damaged or truncated archive
        raise UserError(f"--ckpt_path {ckpt_path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); is it complete?") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (it has no state_dict); "
                        "give a .ckpt written by trainer.py")
    return checkpoint


def read_run_config(path: str) -> dict:
    """The run's YAML (`--config`), as a dict."""
    import yaml

    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file; give the YAML the run was trained with, or leave it out")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path} is not a trainer.py config (a mapping with model:, data:, trainer:)")
    return loaded


def find_module_class(checkpoint: dict, ckpt_path: str, run_config: dict, config_path: str | None) -> type:
    """The PretrainingModule subclass that wrote the checkpoint.

    In order: the class LightningCLI records in the hyperparameters (`_class_path`), the one our
    own section records (`convmodel.class_path`), `model.class_path` of --config, and last the
    family the state_dict's parameter names show.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    ours = checkpoint.get("convmodel")
    recorded = hparams.get("_class_path") or (ours.get("class_path") if isinstance(ours, dict) else None)
    model_section = run_config.get("model")
    configured = model_section.get("class_path") if isinstance(model_section, dict) else None
    if recorded is None and ours is None:
        raise UserError(
            f"--ckpt_path {ckpt_path} was not written by convmodel's trainer.py: it has no 'convmodel' section "
            "and its hyperparameters name no model class; export_model.py exports convmodel checkpoints only")
    if recorded and configured and _class_name(recorded) != _class_name(configured):
        raise UserError(f"--config {config_path} trains {configured} but the checkpoint was written by {recorded}; "
                        "give the run's own config, or leave --config out")
    class_path = recorded or configured or _family_from_state_dict(checkpoint["state_dict"])
    if class_path is None:
        raise UserError(f"--ckpt_path {ckpt_path} does not say which model class wrote it; give the run's YAML "
                        "with --config (its model.class_path names the class)")
    return _import_module_class(str(class_path))


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _family_from_state_dict(state_dict: dict) -> str | None:
    for prefix, class_path in FAMILY_PREFIXES.items():
        if any(name.startswith(prefix) for name in state_dict):
            return class_path
    return None


def _import_module_class(class_path: str) -> type:
    from convmodel.models import PretrainingModule

    if "." not in class_path:  # a short name, as jsonargparse accepts for imported classes
        class_path = f"convmodel.models.{class_path}"
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"the checkpoint's model class {class_path} cannot be imported ({exc}); "
                        "install the convmodel version that trained it") from exc
    if not (isinstance(found, type) and issubclass(found, PretrainingModule)):
        raise UserError(f"the checkpoint's model class {class_path} is not a convmodel PretrainingModule; "
                        "export_model.py exports checkpoints of convmodel's trainer.py only")
    return found


def find_tokenizer(checkpoint: dict, ckpt_path: str, run_config: dict, override: str | None) -> str:
    """The tokenizer folder of the run: --tokenizer, else the recorded path, found from here or the checkpoint.

    A relative path was relative to where trainer.py ran, usually the repository root; the
    checkpoint usually lies a few folders below it (runs/NAME/checkpoints/), so the checkpoint's
    folder and its parents are searched too.
    """
    if override is not None:
        override = str(override)
        if not os.path.isdir(override):
            raise UserError(f"--tokenizer {override}: no such folder; give the tokenizer folder the model was "
                            "trained with")
        return override
    hparams = checkpoint.get("hyper_parameters") or {}
    data_section = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    recorded = [path for path in (hparams.get("tokenizer"), data_section.get("tokenizer")) if isinstance(path, str)]
    if not recorded:
        raise UserError(f"--ckpt_path {ckpt_path} records no tokenizer; give the tokenizer folder the model was "
                        "trained with as --tokenizer DIR")
    for path in dict.fromkeys(recorded):
        for base in _search_bases(ckpt_path):
            candidate = path if os.path.isabs(path) else os.path.join(base, path)
            if os.path.isdir(candidate):
                return os.path.normpath(candidate)
    raise UserError(
        f"the tokenizer the model was trained with, {recorded[0]}, is not there (looked from the current "
        f"folder and from the checkpoint's folder and its parents); give its new place as --tokenizer DIR")


def _search_bases(ckpt_path: str) -> list[str]:
    bases = [os.getcwd()]
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    while folder not in bases:
        bases.append(folder)
        folder = os.path.dirname(folder)
    return bases


def load_matching_tokenizer(path: str, checkpoint: dict, overridden: bool):
    """The tokenizer in `path`, refused if its vocabulary is not the one the checkpoint was trained with."""
    from convmodel.tokenization import load_tokenizer

    hf_tokenizer = load_tokenizer(path)
    ours = checkpoint.get("convmodel") if isinstance(checkpoint.get("convmodel"), dict) else {}
    trained = ours.get("vocab_size")
    if trained is not None and trained != len(hf_tokenizer):
        option = "--tokenizer" if overridden else "the tokenizer"
        raise UserError(f"{option} {path} has {len(hf_tokenizer)} tokens but the checkpoint was trained with "
                        f"{trained} ({ours.get('tokenizer')}); give the tokenizer the model was trained with")
    return hf_tokenizer


def load_module(module_class: type, ckpt_path: str, tokenizer_path: str):
    """The module rebuilt from its hyperparameters (tokenizer found above) with the trained weights."""
    try:
        return module_class.load_from_checkpoint(ckpt_path, map_location="cpu", tokenizer=tokenizer_path)
    except Exception as exc:  # jsonargparse (LightningCLI's instantiator) wraps our UserErrors
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


# ---- fitting the model and tokenizer for transformers ----------------------------------------


def prepare_model(module, hf_tokenizer, dtype: str):
    """`module.to_hf()` in eval mode and `dtype`, with the tokenizer's special ids in its config."""
    import torch

    model = module.to_hf().eval()
    config = model.config
    ids = {"pad_token_id": hf_tokenizer.pad_token_id}
    if module.objective == "clm":  # documents are separated by end-of-text, which also starts generation
        ids |= {"bos_token_id": hf_tokenizer.eos_token_id, "eos_token_id": hf_tokenizer.eos_token_id}
    else:
        ids |= {"cls_token_id": hf_tokenizer.cls_token_id, "sep_token_id": hf_tokenizer.sep_token_id,
                "mask_token_id": hf_tokenizer.mask_token_id}
    for name, value in ids.items():
        if getattr(config, name, None) is None and value is not None:
            setattr(config, name, value)
    from convmodel.tokenization import TOKENIZER_CLASS

    config.tokenizer_class = TOKENIZER_CLASS
    return model.to(getattr(torch, dtype))


def fit_tokenizer(hf_tokenizer, module) -> None:
    """Make the run's tokenizer encode text the way the model saw it in training.

    The tokenizer adds [CLS] ... [SEP] and token_type_ids, as BERT wants. A causal LM was
    trained on plain token runs: it gets no special tokens and no token_type_ids (GPT-2's
    forward takes them and would add a segment embedding it never learnt).
    """
    from tokenizers import processors

    if module.objective == "clm":
        hf_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        hf_tokenizer.model_input_names = ["input_ids", "attention_mask"]
        if hf_tokenizer.bos_token is None:
            hf_tokenizer.bos_token = hf_tokenizer.eos_token
    hf_tokenizer.model_max_length = max_positions(module)


def max_positions(module) -> int:
    """Longest input the model takes; for position-free models (rotary) the configured length."""
    positions = module.max_positions
    if positions >= 2**31 - 1:
        positions = getattr(module.to_hf().config, "max_position_embeddings", positions)
    return int(positions)


# ---- the model card --------------------------------------------------------------------------


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


# ---- writing and publishing ------------------------------------------------------------------


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file; give a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UserError(f"--output_dir {output_dir} exists and is not empty; choose another folder, "
                        "or add --overwrite to replace it")


def check_not_inside(output_dir: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """Refuse an --overwrite that would delete the export's own inputs or the current folder."""
    if not overwrite or not os.path.isdir(output_dir):
        return
    root = os.path.realpath(output_dir)
    for what, path in {**inputs, "the current folder": os.getcwd()}.items():
        real = os.path.realpath(path)
        if real == root or real.startswith(root + os.sep):
            raise UserError(f"--output_dir {output_dir} --overwrite would delete {what} ({path}); "
                            "choose another --output_dir")


def write_folder(output_dir: str, overwrite: bool, write) -> None:
    """Run `write(folder)` on a temporary sibling of output_dir, then put it in output_dir's place."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.", dir=parent)
    except OSError as exc:
        raise UserError(f"--output_dir {output_dir} cannot be written: {exc.strerror}; choose another folder") from exc
    try:
        write(staging)
        # mkdtemp makes the folder private and safetensors its files; an export is for sharing
        os.chmod(staging, 0o777 & ~_umask())
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o666 & ~_umask())
        if os.path.isdir(output_dir):
            if os.listdir(output_dir) and not overwrite:  # appeared while we were writing
                raise UserError(f"--output_dir {output_dir} exists and is not empty; add --overwrite to replace it")
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_folder(folder: str, model, hf_tokenizer, card: str) -> None:
    from convmodel.tokenization import save_tokenizer

    model.save_pretrained(folder)
    save_tokenizer(hf_tokenizer, folder)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--push_to_hub {repo_id!r} is not a Hub repository name (NAME or ORG/NAME): {exc}") from exc
    return repo_id


def push_folder(folder: str, repo_id: str, private: bool, commit_message: str) -> str:
    """Create the Hub repository if needed and upload the folder; the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    step = f"creating the repository {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = f"uploading {folder} to {repo_id}"
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                   repo_type="model")
    except Exception as exc:  # network, auth, permissions: all end the same way for the user
        detail = " ".join(str(exc).split())[:500] or "no detail"
        retry = f"hf upload {repo_id} {folder} ." + (" --private" if private else "")
        raise PushError(
            f"--push_to_hub {repo_id}: the upload failed while {step} ({type(exc).__name__}: {detail}). The "
            f"exported model is complete in {folder}; check the network and your token (HF_TOKEN or "
            f"`hf auth login`), then upload it with `{retry}`") from exc
    return str(getattr(commit, "commit_url", None) or f"{api.endpoint}/{repo_id}")


# ---- checking an export ----------------------------------------------------------------------


def fill_mask(model_dir: str, text: str, top_k: int = 5, trust_remote_code: bool = False) -> list[dict]:
    """The top_k predictions of transformers' fill-mask pipeline for the [MASK] in `text`."""
    import json

    model_dir = str(model_dir)
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"--model_dir {model_dir} has no config.json; give a folder written by export_model.py")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if is_causal_lm(config):
        raise UserError(f"--model_dir {model_dir} holds a causal language model "
                        f"({', '.join(config.get('architectures') or [config.get('model_type', '?')])}), which has "
                        f"no [MASK] to fill; continue a prompt instead: trainer/generate.py --model_dir {model_dir} "
                        "--prompt 'The function returns'")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(f"--model_dir {model_dir} ships its own model code (modeling_*.py); read it, then add "
                        "--trust_remote_code to run it")
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model_dir, trust_remote_code=trust_remote_code)
    mask = fill.tokenizer.mask_token
    if text.count(mask) != 1:
        raise UserError(f"--text must contain the mask token {mask} exactly once, e.g. "
                        f"--text 'The {mask} statement defines a function.'")
    return fill(text, top_k=top_k)


def is_causal_lm(config: dict) -> bool:
    """Whether a config.json describes a causal (left-to-right) LM: its class, is_decoder or a GPT-2."""
    architectures = config.get("architectures") or []
    return (bool(config.get("is_decoder")) or config.get("model_type") == "gpt2"
            or any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures))


# ---- entry points ----------------------------------------------------------------------------


def run_tool(function, argv: list[str] | None, name: str):
    """convmodel.tool_cli.run_tool with a failed upload (PushError) ending in exit 1."""
    from convmodel.tool_cli import run_tool as run_checked

    return run_checked(function, argv, name, failures={PushError: 1})


def main(argv: list[str] | None = None) -> None:
    """`export_model.py --ckpt_path P --output_dir DIR [...]` (see export_model)."""
    run_tool(export_model, argv, "export_model.py")


def fill_mask_main(argv: list[str] | None = None) -> None:
    """`fill_mask.py --model_dir DIR --text '... [MASK] ...' [--top_k 5] [--trust_remote_code]`: prints predictions."""

    def run(model_dir: str, text: str, top_k: int = 5, trust_remote_code: bool = False) -> None:
        """Print the model's top predictions for the [MASK] in text.

        Args:
            model_dir: folder written by export_model.py.
            text: a sentence with one [MASK].
            top_k: how many predictions to print.
            trust_remote_code: allow the folder's own model code (LeanALBERT exports).
        """
        predictions = fill_mask(model_dir, str(text), int(top_k), bool(trust_remote_code))
        print(text)
        for rank, prediction in enumerate(predictions, start=1):
            print(f"{rank:>3}. {prediction['token_str']!r:<16} {prediction['score']:.4f}  {prediction['sequence']}")

    run_tool(run, argv, "fill_mask.py")
