"""Fine-tune a pretrained model on a labelled task: `python trainer/finetune.py --config configs/finetune/ner.yaml
--model.source runs/bert-tiny/model`.

Fits with early stopping, scores the best checkpoint on dev and test, exports it. See `--help`.
"""

from convmodel.finetune.cli import main

if __name__ == "__main__":
    main()
