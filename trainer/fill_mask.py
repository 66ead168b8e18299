"""Print a masked LM's top predictions for one sentence: a quick look at an exported model.

    python trainer/fill_mask.py --model_dir out/bert-tiny --text "The [MASK] statement defines a function." \
        [--top_k 5] [--trust_remote_code]

See convmodel/export.py (fill_mask).
"""

from convmodel.export import fill_mask_main

if __name__ == "__main__":
    fill_mask_main()
