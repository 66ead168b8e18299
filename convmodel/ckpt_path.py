"""`--ckpt_path` checked before Lightning reads it: one line for a missing, foreign or broken file.

Lightning answers a missing file, a file that is not a checkpoint or a truncated one with a
25-37 line traceback (for a non-checkpoint it even suggests `weights_only=False`), and
`test --ckpt_path last` without a checkpoint evaluates a randomly initialised model. Here
`last` means this run's `<checkpoint folder>/last.ckpt`, and every problem is a UserError that
names the path and what to do. A fresh `fit` into a folder that already holds checkpoints is
refused too: its `last.ckpt` would mix two runs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import zipfile

from convmodel.errors import UserError
from convmodel.run_checkpoint import LAST, checkpoint_dir

OPTION = "--ckpt_path"


def checkpoint_folder(trainer) -> str | None:
    """The folder of the trainer's first ModelCheckpoint (None without one, or when Lightning picks it per version)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            return checkpoint_dir(callback, trainer)
    return None


def read_checkpoint_step(path: str) -> int:
    """The global step saved in `path`, after checking that it is a whole Lightning checkpoint."""
    return int(read_checkpoint(path)["global_step"])


def read_checkpoint(path: str) -> dict:
    """The checkpoint in `path` (tensors memory-mapped), or a UserError naming the path and what to do.

    With mmap only the pickled metadata is read here, not gigabytes of tensors.
    """
    import torch

    if not os.path.exists(path):
        raise UserError(f"{OPTION} {path}: no such file; give a .ckpt file written by trainer.py, or `last` "
                        "for this run's newest checkpoint")
    if os.path.isdir(path):
        raise UserError(f"{OPTION} {path} is a folder; give a .ckpt file in it (e.g. {os.path.join(path, LAST)})")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{OPTION} {path} is not a checkpoint: not a complete torch.save file (truncated by a crash "
                        "or a partial copy, or another kind of file); give a .ckpt file written by trainer.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if "weights only" in reason.lower() or "weights_only" in reason.lower():
            reason = "it holds Python objects that are not tensors or plain values"
        raise UserError(f"{OPTION} {path} cannot be read as a checkpoint ({reason}); give a .ckpt file written by "
                        "trainer.py") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise UserError(f"{OPTION} {path} is a torch file but not a Lightning checkpoint (no state_dict and "
                        "global_step); give a .ckpt file written by trainer.py")
    return checkpoint


def resolve_ckpt_path(subcommand: str, ckpt_path: str | None, trainer, overwrite: bool) -> str | None:
    """The checked file `subcommand` should load (None: a fresh fit), or a UserError saying what to do.

    `overwrite` (`--overwrite_checkpoints true`) lets a fresh fit delete the checkpoints already in
    the folder instead of refusing to start.
    """
    folder = checkpoint_folder(trainer)
    if ckpt_path in ("best", "hpc"):
        raise UserError(f"{OPTION} {ckpt_path}: a new trainer.py process does not know an earlier run's {ckpt_path} "
                        f"checkpoint; give its .ckpt file{f' (in {folder})' if folder else ''}, or `last`")
    if ckpt_path == "last":
        if folder is None:
            raise UserError(f"{OPTION} last needs a ModelCheckpoint with a folder in trainer.callbacks (the "
                            "configs' convmodel.run_checkpoint.RunCheckpoint); give the .ckpt file instead")
        last = os.path.join(folder, LAST)
        if os.path.isfile(last):
            return last
        if subcommand != "fit":
            raise UserError(f"{OPTION} last: no checkpoint in {folder}: nothing to {subcommand} (a model that was "
                            f"never trained); train first (fit), or give the .ckpt file with {OPTION}")
        print(f"[convmodel] {OPTION} last: no {LAST} in {folder} yet: starting a new run", flush=True)
        ckpt_path = None
    if ckpt_path is not None:
        read_checkpoint_step(ckpt_path)
        return ckpt_path
    if subcommand != "fit":
        where = f" (this run's newest: {OPTION} last)" if folder else ""
        raise UserError(f"{subcommand} needs {OPTION}: without it the model's random initial weights would be "
                        f"evaluated; give {OPTION} last{where} or a .ckpt file")
    if folder is not None:
        refuse_mixed_run(folder, earlier_log_versions(trainer), overwrite)
    return None


def earlier_log_versions(trainer) -> list[str]:
    """The logger's `version_N` folders written before this run (show_metrics reads them all as one run)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    root = getattr(logger, "root_dir", None)
    if not root or not os.path.isdir(root):
        return []
    own = os.path.realpath(getattr(logger, "log_dir", "") or "")
    return sorted(d for d in glob.glob(os.path.join(glob.escape(root), "version_*"))
                  if os.path.isdir(d) and os.path.realpath(d) != own)


def refuse_mixed_run(folder: str, log_versions: list[str], overwrite: bool) -> None:
    """A new run must not write into another run's checkpoints or logs; with `overwrite`, delete them first."""
    existing = sorted(glob.glob(os.path.join(glob.escape(folder), "*.ckpt")))
    if not existing and not log_versions:
        return
    if overwrite:
        for path in existing:
            with contextlib.suppress(FileNotFoundError):  # another rank of the same job was first
                os.remove(path)
        for path in log_versions:
            shutil.rmtree(path, ignore_errors=True)
        print(f"[convmodel] --overwrite_checkpoints: deleted {len(existing)} checkpoint(s) and "
              f"{len(log_versions)} log version(s) of an earlier run in {os.path.dirname(folder) or '.'}", flush=True)
        return
    what = (f"checkpoints of another run ({len(existing)}, e.g. {os.path.basename(existing[0])})" if existing else
            f"the logs of another run ({', '.join(os.path.basename(v) for v in log_versions)})")
    where = folder if existing else os.path.dirname(log_versions[0])
    resume = f"resume it with {OPTION} last, or " if existing else ""
    raise UserError(f"{where} already holds {what}; {resume}start a new run in another folder "
                    "(--trainer.logger.init_args.save_dir runs/NEW, or --peer_dir runs/NEW for a swarm peer), or "
                    "replace it with --overwrite_checkpoints "
                    "true (deletes them)")
