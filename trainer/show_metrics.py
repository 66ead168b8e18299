"""Print a run's metric curve from its TensorBoard logs: `python trainer/show_metrics.py --logdir runs/x`.

Checks for scripts (exit 2 with one error line when they fail): `--min_drop 0.2` (val/loss fell
by at least 20%) and `--min_below_baseline 0.3` (the last val/loss is at least 0.3 nats below
val/unigram_baseline, the loss of a model that knows only token frequencies).
"""

from convmodel.run_summary import main

if __name__ == "__main__":
    main()
