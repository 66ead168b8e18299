"""Reading a convmodel checkpoint: the dict itself, the run's YAML, the module class and the tokenizer.

Nothing here runs code stored in a checkpoint: tensors and plain values only (weights_only).
"""

import importlib
import os

from convmodel.errors import UserError

# The transformers sub-model each family keeps in `module.model`: how a checkpoint without a
# recorded class still says which module wrote it.
FAMILY_PREFIXES = {
    "model.bert.": "convmodel.models.BertPretraining",
    "model.transformer.": "convmodel.models.Gpt2Pretraining",
    "model.albert.": "convmodel.models.lean_albert_pretraining.LeanAlbertPretraining",
}


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


def load_module(module_class: type, ckpt_path: str, tokenizer_path: str, checkpoint: dict | None = None):
    """The module rebuilt from its hyperparameters (tokenizer found above) with the trained weights.

    A DiLoCo trainer's checkpoint (`checkpoint["diloco"]`) taken mid-round holds the peer's own inner
    weights in its state_dict; the swarm's model is the outer weights, which replace them.
    """
    try:
        module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu", tokenizer=tokenizer_path)
    except Exception as exc:  # jsonargparse (LightningCLI's instantiator) wraps our UserErrors
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    diloco = (checkpoint or {}).get("diloco")
    outer = diloco.get("outer") if isinstance(diloco, dict) else None
    if outer is not None:
        load_outer_weights(module, outer, ckpt_path)
    return module


def load_outer_weights(module, outer: list, ckpt_path: str) -> None:
    """DiLoCo's outer weights, saved in the order of `module.parameters()`, into the module's parameters."""
    import torch

    params = list(module.parameters())
    if len(params) != len(outer) or any(tuple(p.shape) != tuple(o.shape) for p, o in zip(params, outer)):
        raise UserError(f"--ckpt_path {ckpt_path}: its DiLoCo outer weights (diloco.outer, {len(outer)} tensors) do "
                        f"not fit the model's {len(params)} parameters; was it written by another version?")
    with torch.no_grad():
        for param, weight in zip(params, outer, strict=True):
            param.copy_(weight)
