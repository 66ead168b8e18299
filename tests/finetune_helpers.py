"""Shared by the fine-tuning tests: tiny pretrained model folders and small labelled files.

The models are real transformers models (hidden 32, one layer) saved as export_model.py saves
them, with the session's sentencepiece tokenizer; the data are made-up sentences whose labels
follow from the words, written in the formats users have.
"""

import json
import random
from pathlib import Path

from test_export import TINY_BERT, TINY_GPT2, TINY_LEAN_ALBERT  # noqa: F401  (the export tests' tiny sizes)

PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Erin"]
PLACES = ["Paris", "London", "Berlin", "Madrid", "Rome"]
FILLER = ["the", "function", "returns", "a", "list", "of", "values", "and", "then", "calls"]


def model_folder(tokenizer_dir: str, folder: Path) -> str:
    """A randomly initialised tiny BERT masked LM saved as a model folder, as save_pretrained writes one."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from convmodel.tokenization import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT))
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, str(folder))
    return str(folder)


def tagged_sentences(count: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences with PER (one or two words: B-PER I-PER) and LOC entities among filler words."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 7)):
            roll = rng.random()
            if roll < 0.2:
                tokens += [rng.choice(PEOPLE), rng.choice(PEOPLE)]
                tags += ["B-PER", "I-PER"]
            elif roll < 0.35:
                tokens.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        sentences.append((tokens, tags))
    return sentences


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for tokens, tags in sentences:
        lines += [f"{token} NN O {tag}" for token, tag in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def text_examples(count: int, seed: int) -> list[tuple[str, str, str, float]]:
    """(text, text_pair, class label, similarity): the class says whether the text names a place."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.sample(FILLER, 4)
        label = rng.choice(["place", "person", "none"])
        if label == "place":
            words.insert(rng.randint(0, 4), rng.choice(PLACES))
        elif label == "person":
            words.insert(rng.randint(0, 4), rng.choice(PEOPLE))
        pair = words[:] if rng.random() < 0.5 else rng.sample(FILLER, 5)
        similarity = len(set(words) & set(pair)) / len(set(words) | set(pair)) * 5
        examples.append((" ".join(words), " ".join(pair), label, round(similarity, 3)))
    return examples


def write_csv(path: Path, rows: list[tuple], header: list[str] | None, delimiter: str = ",") -> Path:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path
