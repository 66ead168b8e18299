"""Summarise a finished run from its TensorBoard logs: the metric curve, where the files are.

`make demo` ends with it so a new user sees, in the terminal, that validation loss fell, whether
it fell below what token frequencies alone give (val/unigram_baseline), and where to point
TensorBoard and export; it also works on any run directory.
"""

from __future__ import annotations

import glob
import os

from convmodel.errors import UserError


def _version_number(path: str) -> int:
    suffix = os.path.basename(path).removeprefix("version_")
    return int(suffix) if suffix.isdigit() else -1


def run_version_dirs(logdir: str) -> list[str]:
    """A run's `version_N` folders, oldest first (or [logdir] when it holds the event files itself).

    One run writes a new version for each `fit`, resume, `test` or `validate` (the logger's own
    counter), so a resumed or interrupted run's curve is spread over several of them. When the
    save_dir holds more than one logger name, the versions beside the newest one are the run.
    """
    if glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")):
        return [logdir]
    candidates = [d for d in glob.glob(os.path.join(glob.escape(logdir), "**", "version_*"), recursive=True)
                  if os.path.isdir(d) and glob.glob(os.path.join(glob.escape(d), "events.out.tfevents.*"))]
    if not candidates:
        raise UserError(f"{logdir}: no TensorBoard event files found; is this the logger's save_dir of a run?")
    newest = max(candidates, key=os.path.getmtime)
    siblings = [d for d in candidates if os.path.dirname(d) == os.path.dirname(newest)]
    return sorted(siblings, key=_version_number)


def latest_version_dir(logdir: str) -> str:
    """The newest `version_N` folder under a TensorBoard save_dir (or logdir itself if it holds events)."""
    return run_version_dirs(logdir)[-1]


def read_scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    """All (step, value) points of one scalar tag in one folder, sorted by step; later writes win on equal steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                points[event.step] = event.value
    return sorted(points.items())


def read_run_scalars(version_dirs: list[str], tag: str) -> list[tuple[int, float]]:
    """One tag over all of a run's versions (a resume continues the curve; a later version wins a step)."""
    points: dict[int, float] = {}
    for run_dir in version_dirs:
        points.update(read_scalars(run_dir, tag))
    return sorted(points.items())


BASELINE_TAG = "val/unigram_baseline"


def _baseline_at(baseline: list[tuple[int, float]], step: int) -> float:
    """The baseline logged at `step`, else the last one before it (else the first): it is constant within a run."""
    before = [value for s, value in baseline if s <= step]
    return before[-1] if before else baseline[0][1]


def _versus(value: float, base: float) -> str:
    gap = base - value
    return f"{abs(gap):.4f} nats {'below' if gap >= 0 else 'above'}"


def summarize(
    logdir: str, tag: str = "val/loss", min_drop: float | None = None, min_below_baseline: float | None = None
) -> float:
    """Print the curve of `tag`, the change from first to last point and the run's files.

    When the run logged val/unigram_baseline (the val/loss of a model that knows only token
    frequencies, see convmodel.data.unigram_baseline) and `tag` is val/loss, every point also
    says how far below (or above) that baseline it is: a falling curve that ends above the
    baseline has learned frequencies, not context.

    Returns the relative drop (0.25 = the last value is 25% below the first). With `min_drop`,
    a smaller drop is an error; with `min_below_baseline`, a last value less than that many
    nats below the baseline (or no baseline logged) is one, so scripts can check a run learned
    context; a negative `min_below_baseline` allows the last value to be that far above it.
    """
    if min_below_baseline is not None and (isinstance(min_below_baseline, bool)
                                           or not isinstance(min_below_baseline, int | float)):
        raise UserError(f"--min_below_baseline must be a number of nats, got {min_below_baseline!r}")
    if min_below_baseline is not None and tag != "val/loss":
        raise UserError(f"--min_below_baseline compares val/loss with {BASELINE_TAG}, not {tag}; "
                        "use --tag val/loss or drop --min_below_baseline")
    versions = run_version_dirs(logdir)
    run_dir = versions[-1] if len(versions) == 1 else os.path.dirname(versions[-1])
    where = run_dir if len(versions) == 1 else (
        f"{run_dir} ({', '.join(os.path.basename(v) for v in versions)})")
    points = read_run_scalars(versions, tag)
    if len(points) < 2:
        raise UserError(f"{where}: fewer than two '{tag}' points were logged; validate more often "
                        "(trainer.val_check_interval) or train longer")
    baseline = read_run_scalars(versions, BASELINE_TAG) if tag == "val/loss" else []
    if baseline:
        print(f"{tag} in {where}, against the frequency-only baseline {BASELINE_TAG}:")
        for step, value in points:
            base = _baseline_at(baseline, step)
            print(f"  step {step:>6}: {value:.4f}  ({_versus(value, base)} the baseline {base:.4f})")
    else:
        print(f"{tag} in {where}:")
        for step, value in points:
            print(f"  step {step:>6}: {value:.4f}")
    (first_step, first), (last_step, last) = points[0], points[-1]
    drop = (first - last) / first
    print(f"{tag}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step} ({drop:.0%} lower)")
    base = _baseline_at(baseline, last_step) if baseline else None
    if base is not None:
        print(f"{tag} {last:.2f} at step {last_step}: {abs(base - last):.2f} nats "
              f"{'below' if last <= base else 'above'} the frequency-only baseline {base:.2f}")
    checkpoints = sorted(glob.glob(os.path.join(glob.escape(logdir), "**", "*.ckpt"), recursive=True))
    print(f"TensorBoard logs: {run_dir}   (view: tensorboard --logdir {logdir})")
    for path in checkpoints:
        print(f"checkpoint: {path}")
    problems = []
    if min_drop is not None and drop < min_drop:
        problems.append(f"{tag} fell by {drop:.0%}, less than the expected {min_drop:.0%}")
    if min_below_baseline is not None:
        if base is None:
            problems.append(
                f"--min_below_baseline: {run_dir} has no {BASELINE_TAG} to compare with; it is logged by "
                "JsonlDataModule runs with train and val files (data.baseline_train_tokens not 0), "
                "runs made before convmodel logged it have none")
        elif base - last < min_below_baseline:
            problems.append(
                f"{tag} {last:.4f} at step {last_step} is {_versus(last, base)} the frequency-only "
                f"baseline {base:.4f}, less than --min_below_baseline {min_below_baseline:g} below it: "
                "the model has learned little beyond token frequencies; train longer or check the data")
    if problems:
        raise UserError("; ".join(problems))
    return drop


def main(argv: list[str] | None = None) -> None:
    """Entry point of trainer/show_metrics.py: flags checked first, a failed check is one `error:` line, exit 2."""
    from convmodel.tool_cli import run_tool

    def show(
        logdir: str, tag: str = "val/loss", min_drop: float | None = None, min_below_baseline: float | None = None
    ) -> None:
        """Print a run's metric curve, its drop, its distance to the frequency-only baseline and its files.

        Args:
            logdir: the TensorBoard logger's save_dir (its newest version_N is read) or a folder of event files.
            tag: the scalar to show; val/loss is also compared with val/unigram_baseline when the run logged it.
            min_drop: exit 2 unless the last value is at least this share below the first (0.2 = 20%).
            min_below_baseline: exit 2 unless the last val/loss is at least this many nats below
                val/unigram_baseline (negative: at most that far above; no baseline logged also fails).
        """
        summarize(str(logdir), tag, min_drop, min_below_baseline)  # fire would print the returned number otherwise

    run_tool(show, argv, "show_metrics.py")
