"""The pretrained model a fine-tuning run starts from: a Hugging Face folder, or a convmodel .ckpt.

A .ckpt is turned into a Hugging Face folder once per process by convmodel.export (the same
code export_model.py runs: the recorded module class, the run's tokenizer fitted to the model),
into a temporary folder removed at exit. From then on both sources are the same thing: a folder
that `AutoTokenizer` and `AutoModelFor*` load, so the fine-tuning code has one path.
"""

import atexit
import os
import shutil
import tempfile

from convmodel.errors import UserError

_converted: dict[str, str] = {}  # realpath of a .ckpt -> its exported folder


def pretrained_folder(source: str, option: str = "--model.source") -> str:
    """A Hugging Face model folder for `source` (the folder itself, or a .ckpt exported once)."""
    source = str(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise UserError(f"{option} {source} has no config.json; give a model folder written by "
                            "export_model.py (or save_pretrained), or a .ckpt written by trainer.py")
        return source
    if not os.path.isfile(source):
        raise UserError(f"{option} {source}: no such file or folder; give a model folder written by export_model.py "
                        "or a .ckpt written by trainer.py")
    key = os.path.realpath(source)
    if key not in _converted:
        from convmodel.export import export_model

        parent = tempfile.mkdtemp(prefix="convmodel-finetune-source-")
        atexit.register(shutil.rmtree, parent, ignore_errors=True)
        print(f"[convmodel] {option} {source} is a pretraining checkpoint: exporting it to a model folder first")
        try:
            _converted[key] = export_model(source, os.path.join(parent, "model"))
        except UserError as exc:  # export_model's messages name its own option
            raise UserError(str(exc).replace("--ckpt_path", option)) from None
    return _converted[key]


def load_source_tokenizer(source: str):
    """The tokenizer of the pretrained model, with a pad token (GPT-2's end-of-text where it has none)."""
    from convmodel.tokenization import load_tokenizer

    tokenizer = load_tokenizer(pretrained_folder(source))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {source} has neither a pad nor an end-of-text token; batches need "
                            "one to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
