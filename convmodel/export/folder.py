"""Writing the exported folder: checks on --output_dir, a staging sibling renamed at the end."""

import os
import shutil
import tempfile

from convmodel.errors import UserError


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
