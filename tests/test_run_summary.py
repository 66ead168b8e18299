"""show_metrics (convmodel.run_summary) on TensorBoard logs written here by Lightning's own logger."""

import sys

import pytest
from pytorch_lightning.loggers import TensorBoardLogger

from convmodel.errors import UserError
from convmodel.run_summary import main, summarize

CURVE = {0: 8.0, 200: 6.9, 400: 5.71}


def write_run(save_dir, baseline: float | None = 6.6) -> str:
    """A run's event file: val/loss CURVE and, when given, val/unigram_baseline at every point."""
    logger = TensorBoardLogger(str(save_dir), name="", version=0)
    for step, loss in CURVE.items():
        metrics = {"val/loss": loss} | ({"val/unigram_baseline": baseline} if baseline is not None else {})
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    return str(save_dir)


def show_metrics(monkeypatch, *args: str) -> int:
    """trainer/show_metrics.py's main with these arguments; its exit status (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", ["show_metrics.py", *args])
    try:
        main()
    except SystemExit as exc:
        return exc.code
    return 0


def test_each_point_is_compared_with_the_baseline(tmp_path, capsys):
    logdir = write_run(tmp_path)
    drop = summarize(logdir)
    out = capsys.readouterr().out
    assert "val/loss in " in out and "against the frequency-only baseline val/unigram_baseline:" in out
    assert "  step      0: 8.0000  (1.4000 nats above the baseline 6.6000)\n" in out
    assert "  step    200: 6.9000  (0.3000 nats above the baseline 6.6000)\n" in out
    assert "  step    400: 5.7100  (0.8900 nats below the baseline 6.6000)\n" in out
    assert "val/loss: 8.0000 at step 0 -> 5.7100 at step 400 (29% lower)\n" in out
    assert "val/loss 5.71 at step 400: 0.89 nats below the frequency-only baseline 6.60\n" in out
    assert drop == pytest.approx((8.0 - 5.71) / 8.0, rel=1e-6)


def test_min_below_baseline_passes_and_fails_with_exit_2(tmp_path, monkeypatch, capsys):
    logdir = write_run(tmp_path)
    assert show_metrics(monkeypatch, "--logdir", logdir, "--min_below_baseline", "0.85") == 0
    capsys.readouterr()
    assert show_metrics(monkeypatch, "--logdir", logdir, "--min_below_baseline", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: val/loss 5.7100 at step 400 is 0.8900 nats below the frequency-only baseline "
                          "6.6000, less than --min_below_baseline 1 below it")
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_last_value_above_the_baseline_fails(tmp_path):
    logdir = write_run(tmp_path, baseline=5.5)
    with pytest.raises(UserError, match="is 0.2100 nats above the frequency-only baseline 5.5000"):
        summarize(logdir, min_below_baseline=0.0)
    summarize(logdir, min_below_baseline=-0.25)  # a negative threshold allows that much above


def test_logs_without_baseline_keep_the_old_output(tmp_path, monkeypatch, capsys):
    logdir = write_run(tmp_path, baseline=None)
    summarize(logdir, min_drop=0.2)
    out = capsys.readouterr().out
    assert "nats" not in out and "frequency-only" not in out
    assert "  step    400: 5.7100\n" in out and "val/loss: 8.0000 at step 0 -> 5.7100 at step 400 (29% lower)" in out
    assert show_metrics(monkeypatch, "--logdir", logdir, "--min_below_baseline", "0.1") == 2
    assert "has no val/unigram_baseline to compare with" in capsys.readouterr().err


def test_min_below_baseline_is_refused_for_another_tag_or_a_non_number(tmp_path):
    logdir = write_run(tmp_path)
    with pytest.raises(UserError, match="--min_below_baseline compares val/loss"):
        summarize(logdir, tag="val/unigram_baseline", min_below_baseline=0.1)
    with pytest.raises(UserError, match="--min_below_baseline must be a number"):
        summarize(logdir, min_below_baseline="much")


def test_both_checks_failing_are_reported_together(tmp_path):
    with pytest.raises(UserError) as info:
        summarize(write_run(tmp_path), min_drop=0.5, min_below_baseline=2.0)
    assert "fell by 29%, less than the expected 50%" in str(info.value)
    assert "less than --min_below_baseline 2 below it" in str(info.value)
