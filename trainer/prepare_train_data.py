"""Tokenize text into JSONL shards and their manifest.json: `python trainer/prepare_train_data.py --input
'corpus/*.txt' --tokenizer tok --output_dir data/train --objective mlm --max_seq_len 128` (see convmodel/data/prepare.py)."""

from convmodel.data.prepare import main

if __name__ == "__main__":
    main()
