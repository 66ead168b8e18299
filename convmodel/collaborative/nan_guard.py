"""Keeps a NaN/inf out of the swarm and out of this peer's parameters.

A non-finite loss or gradient skips the local step (its gradients are zeroed before they count
toward the swarm's average). Non-finite parameters make every later loss non-finite too, so
skipping alone would stall forever: the guard then restores an in-memory backup of parameters
and optimizer state, taken every `backup_every` collaborative epochs (or loads the swarm's state).
"""

import copy
import sys

import torch


def main_params(opt) -> list[torch.Tensor]:
    return list(opt.state_averager.main_parameters)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync for the lot, not one per tensor (a GPU model has hundreds)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def wait_for_delayed_updates(opt) -> None:
    """Let hivemind's background optimizer step and averaging round finish and land in the parameters.

    With delay_optimizer_step or delay_state_averaging they write parameters and optimizer state
    from a background thread: whatever reads or writes either (a backup, a restore, a checkpoint)
    waits for them first, or it copies a half-written state or is overwritten by a stale one.
    """
    if opt.delay_optimizer_step or opt.delay_state_averaging:
        opt.state_averager.step(wait_for_delayed_updates=True)


def drop_local_gradients(opt, reuse_grad_buffers: bool) -> None:
    """Zero this local step's gradients; reused buffers hold the epoch's sum, so this peer's epoch starts over."""
    with torch.no_grad():
        for p in main_params(opt):
            if p.grad is not None:
                p.grad.zero_()
    if reuse_grad_buffers:
        opt.grad_averager.reset_accumulated_grads_()
        opt.tracker.report_local_progress(opt.local_epoch, opt.grad_averager.local_samples_accumulated)


def params_finite(opt) -> bool:
    return all_finite(main_params(opt))


def grads_finite(opt) -> bool:
    return all_finite([p.grad for p in main_params(opt) if p.grad is not None])


class NanGuard:
    """Skips non-finite local steps and restores the last backup after non-finite parameters."""

    def __init__(self, backup_every: int, reuse_grad_buffers: bool):
        self.backup_every, self.reuse_grad_buffers = backup_every, reuse_grad_buffers
        self.skipped_steps = 0
        self.restored_backups = 0
        self._backup: dict | None = None

    def skip_step(self, opt) -> None:
        """Drop this step's gradients so a NaN/inf never reaches the swarm's average."""
        self.skipped_steps += 1
        print(f"[convmodel] non-finite loss or gradients: skipped a local step (total {self.skipped_steps})",
              file=sys.stderr, flush=True)
        drop_local_gradients(opt, self.reuse_grad_buffers)

    def after_epoch(self, opt) -> None:
        """At a new collaborative epoch: restore if the step made parameters non-finite, else maybe back up."""
        if not params_finite(opt):
            self.restore(opt)
        elif self.backup_every and opt.local_epoch % self.backup_every == 0:
            self.take_backup(opt)

    def take_backup(self, opt) -> None:
        if not self.backup_every:
            return
        wait_for_delayed_updates(opt)  # a whole state, not one that hivemind's background step is writing
        self._backup = {
            "epoch": opt.local_epoch,
            "params": [p.detach().to("cpu", copy=True) for p in main_params(opt)],  # not in accelerator memory
            "optimizer": copy.deepcopy(opt.opt.state_dict()),
        }

    def restore(self, opt) -> None:
        """Non-finite parameters after a step: go back to the last backup (or the swarm's state)."""
        self.restored_backups += 1
        if self._backup is None:
            print("[convmodel] non-finite parameters and no backup: loading the swarm's state", file=sys.stderr)
            opt.load_state_from_peers()
            return
        print(f"[convmodel] non-finite parameters at collaborative epoch {opt.local_epoch}: restoring the backup "
              f"from epoch {self._backup['epoch']}", file=sys.stderr, flush=True)
        wait_for_delayed_updates(opt)  # or a background step or round would land on top of the restored state
        with torch.no_grad():
            inner = [p for g in opt.opt.param_groups for p in g["params"]]
            for saved, main, offloaded in zip(self._backup["params"], main_params(opt), inner):
                main.copy_(saved)
                if offloaded is not main:
                    offloaded.copy_(saved)
        opt.opt.load_state_dict(copy.deepcopy(self._backup["optimizer"]))
        scheduler = opt.state_averager.scheduler
        if scheduler is not None:  # the backup's param_groups carry its epoch's learning rate, not this one's
            for group, lr in zip(opt.opt.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
