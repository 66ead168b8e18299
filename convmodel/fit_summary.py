"""The lines `fit` prints when it ends: where the run stands, where its files are, what to run next.

A new user otherwise finishes a run with a progress bar and no idea which checkpoint, config
or log folder belongs to it. Everything here is read from the trainer that just ran (its
callback metrics, checkpoint callback and logger), not from files.
"""

from __future__ import annotations

import os
import shlex

from convmodel.run_summary import BASELINE_TAG


def _shown(path: str) -> str:
    """`path` relative to the working directory when it is inside it (shorter to copy)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _metric(trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None or value.numel() != 1 else float(value)


def fit_summary(trainer, checkpoint: str | None, test_command: list[str], resume_command: list[str]) -> str:
    """The end-of-fit report: step reached, losses (and the frequency-only baseline), files, next commands."""
    lines = []
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    step = trainer.global_step
    # a strategy that ends the run itself says where (HivemindStrategy: the swarm's last collaborative epoch)
    end_reached = getattr(trainer.strategy, "end_reached", None)
    done = max_steps is None or step >= max_steps or bool(end_reached)
    if end_reached:
        lines.append(f"[convmodel] fit finished at step {step}: {end_reached}")
    else:
        lines.append(f"[convmodel] fit {'finished' if done else 'stopped'} at step {step}"
                     + (f" of {max_steps}" if max_steps else ""))
    losses = []
    for name in ("train/loss", "val/loss"):
        value = _metric(trainer, name)
        if value is not None:
            losses.append(f"{name} {value:.4f}")
    baseline, val_loss = _metric(trainer, BASELINE_TAG), _metric(trainer, "val/loss")
    if baseline is not None and val_loss is not None:
        gap = baseline - val_loss
        losses.append(f"{BASELINE_TAG} {baseline:.4f} ({abs(gap):.4f} nats {'below' if gap >= 0 else 'above'} it)")
    if losses:
        lines.append("  " + "   ".join(losses))
    if checkpoint:
        lines.append(f"  checkpoint:  {_shown(checkpoint)}")
    log_dir = trainer.log_dir
    config = os.path.join(log_dir, "config.yaml") if log_dir else None
    if config and os.path.isfile(config):
        lines.append(f"  config:      {_shown(config)}")
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(_shown(logger.save_dir))}")
    if checkpoint:
        if not done:
            lines.append(f"  resume:      {shlex.join(resume_command)}")
        lines.append(f"  test:        {shlex.join(test_command)}")
        output = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "model")
        export = ["python", "trainer/export_model.py", "--ckpt_path", _shown(checkpoint), "--output_dir",
                  _shown(output)]
        if config and os.path.isfile(config):
            export += ["--config", _shown(config)]
        lines.append(f"  export:      {shlex.join(export)}")
    return "\n".join(lines)
