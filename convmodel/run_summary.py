"""Summarise a finished run from its TensorBoard logs: the metric curve, where the files are.

`make demo` ends with it so a new user sees, in the terminal, that validation loss fell
and where to point TensorBoard and export; it also works on any run directory.
"""

from __future__ import annotations

import glob
import os

from convmodel.errors import UserError


def latest_version_dir(logdir: str) -> str:
    """The newest `version_N` folder under a TensorBoard save_dir (or logdir itself if it holds events)."""
    if glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        return logdir
    candidates = [d for d in glob.glob(os.path.join(logdir, "**", "version_*"), recursive=True) if os.path.isdir(d)]
    candidates = [d for d in candidates if glob.glob(os.path.join(d, "events.out.tfevents.*"))]
    if not candidates:
        raise UserError(f"{logdir}: no TensorBoard event files found; is this the logger's save_dir of a run?")
    return max(candidates, key=os.path.getmtime)


def read_scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    """All (step, value) points of one scalar tag, sorted by step; later writes win on equal steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                points[event.step] = event.value
    return sorted(points.items())


def summarize(logdir: str, tag: str = "val/loss", min_drop: float | None = None) -> float:
    """Print the curve of `tag`, the change from first to last point and the run's files.

    Returns the relative drop (0.25 = the last value is 25% below the first). With
    `min_drop`, a smaller drop is an error, so scripts can check a run learned.
    """
    run_dir = latest_version_dir(logdir)
    points = read_scalars(run_dir, tag)
    if len(points) < 2:
        raise UserError(f"{run_dir}: fewer than two '{tag}' points were logged; validate more often "
                        "(trainer.val_check_interval) or train longer")
    print(f"{tag} in {run_dir}:")
    for step, value in points:
        print(f"  step {step:>6}: {value:.4f}")
    first, last = points[0][1], points[-1][1]
    drop = (first - last) / first
    print(f"{tag}: {first:.4f} at step {points[0][0]} -> {last:.4f} at step {points[-1][0]} "
          f"({drop:.0%} lower)")
    checkpoints = sorted(glob.glob(os.path.join(run_dir, "**", "*.ckpt"), recursive=True))
    print(f"TensorBoard logs: {run_dir}   (view: tensorboard --logdir {logdir})")
    for path in checkpoints:
        print(f"checkpoint: {path}")
    if min_drop is not None and drop < min_drop:
        raise UserError(f"{tag} fell by {drop:.0%}, less than the expected {min_drop:.0%}")
    return drop


def main() -> None:
    import sys

    import fire

    from convmodel.errors import user_message

    def show(logdir: str, tag: str = "val/loss", min_drop: float | None = None) -> None:
        summarize(logdir, tag, min_drop)  # fire would print the returned number otherwise

    try:
        fire.Fire(show)
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
