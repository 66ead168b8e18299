"""Train a sentencepiece tokenizer and save it as a Hugging Face tokenizer folder.

    python trainer/train_tokenizer.py --input 'data/sample/train.txt' --output_dir runs/tokenizer \
        --vocab_size 8000 [--model_type unigram|bpe] [--input_sentence_size N] [--lowercase]

--input takes files, comma-separated lists and glob patterns. See convmodel/tokenization.py.
"""

from convmodel.tokenization import main

if __name__ == "__main__":
    main()
