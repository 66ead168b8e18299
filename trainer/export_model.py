"""Export a training checkpoint as a Hugging Face model folder (and optionally push it to the Hub).

    python trainer/export_model.py --ckpt_path runs/bert-tiny/checkpoints/last.ckpt --output_dir out/bert-tiny \
        [--config configs/bert-tiny.yaml] [--tokenizer DIR] [--dtype float32|float16|bfloat16] [--overwrite] \
        [--push_to_hub ORG/NAME [--private] [--commit_message M]]

See convmodel/export.py.
"""

from convmodel.export import main

if __name__ == "__main__":
    main()
