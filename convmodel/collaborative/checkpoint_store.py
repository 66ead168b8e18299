"""The auxiliary peer's checkpoints of the swarm: what one holds, and how it reaches the disk whole.

A stored checkpoint is a Lightning checkpoint like the ones trainer.py writes, so the same file
resumes a trainer (`trainer.py --config ... --ckpt_path DIR/latest.ckpt`) and exports a model
(`export_model.py --ckpt_path DIR/latest.ckpt`). Files in DIR:

    epoch-000012.ckpt   the swarm's state at collaborative epoch 12 (the last `keep` are kept)
    latest.ckpt         the newest of them (a hard link, or a copy where links are not supported)

Every file is written to a hidden temporary name in DIR, flushed to the disk and renamed into
place, so a reader (or a process killed mid-write) never sees half a checkpoint: latest.ckpt is
always the previous complete one until the next one is complete. Temporary files left by a
killed writer are removed when the store opens.
"""

import os
import re
from typing import Any

from convmodel.errors import UserError

LATEST = "latest.ckpt"
EPOCH_FILE = re.compile(r"^epoch-(\d+)\.ckpt$")
TEMP_SUFFIX = ".tmp"


def epoch_file_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}.ckpt"


def make_checkpoint(module, optimizer_state: dict | None, epoch: int, datamodule=None,
                    metrics: dict[str, float] | None = None, run_id: str | None = None,
                    diloco: dict | None = None) -> dict[str, Any]:
    """A Lightning checkpoint of the swarm's state that trainer.py resumes from and export_model.py exports.

    `optimizer_state` is the state_dict of the swarm's optimizer (hivemind's inner optimizer); the
    collaborative epoch goes in as `state["local_epoch"]`, the format of hivemind.Optimizer.state_dict,
    which HivemindStrategy loads. There are no `loops`: a resumed trainer counts its own local steps
    from 0, and `global_step` records the swarm's optimizer steps (collaborative epochs) for the model
    card. `lr_schedulers` is empty because HivemindStrategy steps the schedule to the epoch itself.

    A DiLoCo run's state is `diloco` (the outer state, as HivemindStrategy saves it; `epoch` is its
    round) and no optimizer state: each trainer's inner optimizer is its own, a resumed one starts afresh.
    """
    import pytorch_lightning as pl

    optimizer_states = []
    if optimizer_state is not None:
        optimizer_state = dict(optimizer_state)
        optimizer_state["state"] = dict(optimizer_state["state"], local_epoch=int(epoch))
        optimizer_states.append(optimizer_state)
    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": int(epoch),
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {name: value.detach().cpu() for name, value in module.state_dict().items()},
        "optimizer_states": optimizer_states,
        "lr_schedulers": [],
        module.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams),
    }
    if getattr(module, "_hparams_name", None):
        checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
    if datamodule is not None and datamodule.hparams:
        checkpoint[datamodule.CHECKPOINT_HYPER_PARAMS_KEY] = dict(datamodule.hparams)
    module.on_save_checkpoint(checkpoint)  # our "convmodel" section: class, tokenizer, vocab size, metrics
    ours = checkpoint.setdefault("convmodel", {})
    if metrics:
        ours["metrics"] = {**ours.get("metrics", {}), **metrics}
    ours["collaborative"] = {"epoch": int(epoch), "run_id": run_id}
    if diloco is not None:
        checkpoint["diloco"] = diloco
    return checkpoint


def checkpoint_epoch(checkpoint: dict) -> int:
    """The collaborative epoch a checkpoint holds (the hivemind optimizer's local_epoch; a DiLoCo run's round)."""
    try:
        if isinstance(checkpoint.get("diloco"), dict):
            return int(checkpoint["diloco"]["round"])
        return int(checkpoint["optimizer_states"][0]["state"]["local_epoch"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise UserError("the checkpoint holds no collaborative epoch (optimizer_states[0].state.local_epoch); "
                        "it was not written by a collaborative run") from exc


def save_atomically(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    import torch

    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` survive a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest_checkpoint(directory: str) -> str | None:
    """DIR/latest.ckpt, else the epoch-*.ckpt with the highest plausible epoch, else None.

    When an epoch file was passed over (`plausible_epoch_files`), latest.ckpt may be that file (an
    older version stored and linked it), so the newest plausible epoch file is returned instead.
    """
    latest = os.path.join(directory, LATEST)
    kept, passed_over = plausible_epoch_files(directory)
    if not passed_over:
        if os.path.isfile(latest):
            return latest
        return os.path.join(directory, kept[-1][1]) if kept else None
    if not kept:
        return None
    newest = os.path.join(directory, kept[-1][1])
    return latest if os.path.isfile(latest) and os.path.samefile(latest, newest) else newest


def plausible_epoch_files(directory: str) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """([(epoch, name)] of the plausible epoch-N.ckpt files, oldest first; [(path, why)] of those passed over).

    A file is passed over when its epoch is more than MAX_LEAD past the previous plausible file's and
    beyond what the time between their writes allows (plausibility.py): the poisoned state an older
    version stored (epoch-1000000000.ckpt seconds after epoch-000012.ckpt) must not become the latest
    and be served to every joiner. The gap alone is not enough (a folder copied without its times
    has all files written within a second), nor is the time alone (a swarm can go on for days
    without its auxiliary peer). The lowest file is always plausible: there is nothing to judge it by,
    and the auxiliary peer compares the one it loads with the swarm's records (aux_loop.py).
    """
    from convmodel.collaborative.plausibility import MAX_LEAD, epochs_allowed

    kept: list[tuple[int, str]] = []
    passed_over: list[tuple[str, str]] = []
    previous_time = 0.0
    for epoch, name in _epoch_files(directory):
        path = os.path.join(directory, name)
        written = os.stat(path).st_mtime
        if kept and epoch > kept[-1][0] + MAX_LEAD and epoch > epochs_allowed(kept[-1][0], written - previous_time):
            passed_over.append((path, f"its collaborative epoch {epoch} is beyond what a swarm can reach in the "
                                      f"{max(written - previous_time, 0.0):.0f} s since {kept[-1][1]} was written"))
            continue
        kept.append((epoch, name))
        previous_time = written
    return kept, passed_over


def _epoch_files(directory: str) -> list[tuple[int, str]]:
    """(epoch, file name) of each epoch-N.ckpt in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := EPOCH_FILE.match(name))]
    return sorted(found)


def read_checkpoint(path: str) -> dict:
    """A stored checkpoint, loaded with torch's weights_only (a checkpoint never runs code)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); move it away and the "
                        "auxiliary peer starts from the swarm's state") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} is not a Lightning checkpoint (it has no state_dict); move it away")
    return checkpoint


class CheckpointStore:
    """Checkpoints of the swarm in one folder: epoch-N.ckpt files (the last `keep`) and latest.ckpt.

    One auxiliary peer per folder: opening the store deletes temporary files that a killed
    writer left behind.
    """

    def __init__(self, directory: str, keep: int = 3):
        self.directory, self.keep = directory, keep
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise UserError(f"--store_checkpoints {directory} is a file; give a folder")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--store_checkpoints {directory} cannot be created: {exc.strerror}") from exc
        self.removed_temp_files = self._remove_temp_files()
        self.passed_over = plausible_epoch_files(directory)[1]  # [(path, why)], said when the store is read

    def _remove_temp_files(self) -> list[str]:
        removed = []
        for name in os.listdir(self.directory):
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                os.remove(os.path.join(self.directory, name))
                removed.append(name)
        return removed

    def latest(self) -> str | None:
        return latest_checkpoint(self.directory)

    def write(self, epoch: int, checkpoint: dict) -> str:
        """Store the checkpoint of `epoch` and make it latest.ckpt; returns its path."""
        path = os.path.join(self.directory, epoch_file_name(epoch))
        save_atomically(checkpoint, path)
        self._point_latest_to(path, checkpoint)
        self._prune()
        return path

    def _point_latest_to(self, path: str, checkpoint: dict) -> None:
        latest = os.path.join(self.directory, LATEST)
        tmp = os.path.join(self.directory, f".{LATEST}.{os.getpid()}{TEMP_SUFFIX}")
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
            os.link(path, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems): a second copy
            save_atomically(checkpoint, latest)
            return
        os.replace(tmp, latest)
        fsync_folder(self.directory)

    def _prune(self) -> None:
        """Remove the oldest plausible epoch files past `keep` (files passed over are left for the user)."""
        for _, name in plausible_epoch_files(self.directory)[0][:-self.keep]:
            os.remove(os.path.join(self.directory, name))
