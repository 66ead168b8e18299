"""Train or evaluate a model from a YAML config: `python trainer/trainer.py --config configs/bert-tiny.yaml`.

`fit` is implied; `test --config ... --ckpt_path last` evaluates. See `--help`.
"""

from convmodel.cli import main

if __name__ == "__main__":
    main()
