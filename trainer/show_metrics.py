"""Print a run's metric curve from its TensorBoard logs: `python trainer/show_metrics.py --logdir runs/x`."""

from convmodel.run_summary import main

if __name__ == "__main__":
    main()
