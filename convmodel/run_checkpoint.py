"""RunCheckpoint: one run, one checkpoint folder, and `last.ckpt` is always its newest state.

Lightning's ModelCheckpoint writes `last-v1.ckpt` beside an existing `last.ckpt` and keeps its
folder fixed in the YAML even when the logger's folder changes, so a second run, an export of
`last.ckpt` or `--ckpt_path last` could silently pick up another run. Here:

- the folder is `<logger save_dir>/checkpoints` unless `dirpath` is given, so moving the logger
  (`--trainer.logger.init_args.save_dir runs/x`) moves the checkpoints with it;
- `last.ckpt` is overwritten (no version counter) and written again when training ends, so it
  is the final state even when max_steps is not a multiple of every_n_train_steps;
- Ctrl-C (SIGINT) finishes the current batch, writes `last.ckpt` and prints the command that
  resumes; a second Ctrl-C stops at once without saving (the state may be mid-step). SIGTERM
  (Lightning stops after the current batch) writes `last.ckpt` the same way.

The CLI refuses a fresh `fit` into a folder that already holds checkpoints (convmodel.cli).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import timedelta
from typing import Literal

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

LAST = "last.ckpt"


class StopRequested(KeyboardInterrupt):
    """A first Ctrl-C acted on between two batches, when the state is whole: on_exception saves it.

    Raised by RunCheckpoint's own handler and by a strategy that handles Ctrl-C itself
    (HivemindStrategy, after its last collaborative step's delayed updates landed); a plain
    KeyboardInterrupt (a second Ctrl-C) stops at once without saving.
    """


def run_checkpoint_dir(trainer) -> str:
    """`<logger save_dir>/<logger name>/checkpoints`: beside the logger's version_N folders."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None or logger.save_dir is None:
        return os.path.join(trainer.default_root_dir, "checkpoints")
    root = getattr(logger, "root_dir", None) or os.path.join(logger.save_dir, str(logger.name or ""))
    return os.path.join(root, "checkpoints")


def checkpoint_dir(callback: ModelCheckpoint, trainer) -> str | None:
    """The folder `callback` writes to: its dirpath, ours for a RunCheckpoint, None when Lightning picks one per version."""
    if isinstance(callback, RunCheckpoint):
        return callback.resolve_dirpath(trainer)
    return None if callback.dirpath is None else str(callback.dirpath)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose folder follows the logger and whose last.ckpt is always this run's newest state.

    Args:
        dirpath: Checkpoint folder; default `<trainer.logger save_dir>/checkpoints` (so it follows the logger).
        filename: Name pattern of the periodic checkpoints (Lightning's default: epoch=E-step=S).
        monitor: Metric that ranks checkpoints for save_top_k (None: the newest are kept).
        mode: min or max of the monitored metric.
        save_last: Write last.ckpt (found by --ckpt_path last, read by export).
        save_top_k: Periodic checkpoints to keep (-1: all, 0: only last.ckpt).
        every_n_train_steps: Optimizer steps between checkpoints.
        train_time_interval: Or a wall-clock interval between checkpoints.
        every_n_epochs: Or epochs between checkpoints.
        save_weights_only: Leave out optimizer and loop state (such a checkpoint cannot resume a run).
        enable_version_counter: Write name-v1.ckpt instead of overwriting (off: last.ckpt is always the newest).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_weights_only: bool = False,
        enable_version_counter: bool = False,
    ):
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=save_last,
                         save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_weights_only=save_weights_only, enable_version_counter=enable_version_counter)
        self._configured_dirpath = dirpath
        #: what `fit --ckpt_path last` would be for this run; the CLI sets the real command
        self.resume_command = "the same command with --ckpt_path last"
        self.interrupted_at: int | None = None  # the step saved on Ctrl-C/SIGTERM
        self._training = False
        self._start_step = 0
        self._stop_requested = False
        self._previous_sigint = None
        self._validations = 0  # finished validations while fitting
        self._last_written_at_validation = -1  # the value of _validations when last.ckpt was last written

    @property
    def state_key(self) -> str:
        # a plain ModelCheckpoint's key: a run checkpointed by either resumes with the other, and
        # readers of checkpoint["callbacks"] that look for "ModelCheckpoint" (export's model card) find ours
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def resolve_dirpath(self, trainer) -> str:
        """Fix the folder (from the logger when dirpath was not given) before Lightning looks for `last`."""
        if self._configured_dirpath is None:
            self.dirpath = os.path.realpath(run_checkpoint_dir(trainer))
        return str(self.dirpath)

    @property
    def last_path(self) -> str:
        return os.path.join(str(self.dirpath), LAST)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._training = False  # until this fit's training starts; it stays True through the teardown after
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        # Lightning warns on every resume; a fresh run into a non-empty folder is refused by the CLI instead
        pass

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # `--ckpt_path last` means this folder's last.ckpt, not the newest of last*.ckpt or an on-exception file
        self.resolve_dirpath(trainer)
        return {self.last_path} if os.path.isfile(self.last_path) else set()

    # ---- the end of training ---------------------------------------------------------------

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if os.path.basename(filepath) == LAST:
            self._last_written_at_validation = self._validations

    def on_validation_end(self, trainer, pl_module) -> None:
        """A step's last.ckpt is written before that step's validation: write it again after, for its metrics."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting:
            self._validations += 1
        super().on_validation_end(trainer, pl_module)
        if (fitting and self.save_last and trainer.global_step == self._last_global_step_saved
                and self._last_written_at_validation != self._validations and os.path.isfile(self.last_path)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._training = True
        self._start_step = trainer.global_step  # what last.ckpt holds until this run writes one
        self._catch_ctrl_c()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # a Ctrl-C can still land after this (Lightning closes the loggers next): on_exception then reports
        # the last.ckpt that on_train_end wrote, so _training stays as it was
        self._release_ctrl_c()
        super().teardown(trainer, pl_module, stage)

    # ---- Ctrl-C and SIGTERM -------------------------------------------------------------------

    def _catch_ctrl_c(self) -> None:
        """First Ctrl-C: stop after this batch and save; only when nobody else (HivemindStrategy) handles SIGINT."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # a strategy with its own Ctrl-C logic (the swarm's goodbye), or a host that set one
        self._previous_sigint = signal.default_int_handler
        self._stop_requested = False

        def on_ctrl_c(signum, frame):
            if self._stop_requested:
                self._release_ctrl_c()
                raise KeyboardInterrupt
            self._stop_requested = True
            print("[convmodel] Ctrl-C: saving a checkpoint after this batch (Ctrl-C again to stop at once, "
                  "without saving)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_ctrl_c)

    def _release_ctrl_c(self) -> None:
        previous, self._previous_sigint = self._previous_sigint, None
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)

    def _stop_if_asked(self) -> None:
        if self._stop_requested:
            self._release_ctrl_c()
            raise StopRequested("Ctrl-C")  # Lightning's interrupt path: on_exception below, then exit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._stop_if_asked()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        # validation does not change the weights: the state is whole between two of its batches too
        if trainer.state.fn == TrainerFn.FITTING:
            self._stop_if_asked()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """On Ctrl-C or SIGTERM write last.ckpt (when whole and newer than the last one) and say how to resume."""
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        signal_name = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        step = trainer.global_step
        whole = isinstance(exception, SIGTERMException | StopRequested) or self._stop_requested
        if not (self._training and self.save_last) or trainer.sanity_checking:
            print(f"[convmodel] {signal_name} before training started: nothing to save", file=sys.stderr, flush=True)
            return
        if step != self._last_global_step_saved and whole:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        saved = None
        if os.path.isfile(self.last_path):
            saved = self._last_global_step_saved if self._last_checkpoint_saved else self._start_step
        if saved is None:
            print(f"[convmodel] {signal_name} at step {step}: no checkpoint written yet; start again "
                  "(nothing to resume)", file=sys.stderr, flush=True)
            return
        self.interrupted_at = saved
        lost = "" if saved == step else f" (stopped at once: the {step - saved} step(s) since then are lost)"
        print(f"[convmodel] {signal_name}: stopped at step {step}; {self.last_path} holds step {saved}{lost}\n"
              f"[convmodel] resume with: {self.resume_command}", file=sys.stderr, flush=True)
