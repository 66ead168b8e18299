"""From examples to model inputs: tokenization, sub-token labels, and padding into batches.

Token classification labels the first sub-token of each word and gives the others -100 (no
loss), or with label_all_subtokens labels them too, B-X as I-X (transformers' run_ner.py). The
metrics are entity-level over words, so each encoded sentence also carries, for every position,
the index of the word it starts (-1 elsewhere) and all of the sentence's word tags: a word cut
off by max_seq_len still counts in the gold entities (predicted "O").
"""

import torch

from convmodel.finetune.labels import continuation_tag
from convmodel.finetune.readers import TaggedSentence, TextExample

IGNORE = -100
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode_tagged(sentence: TaggedSentence, tokenizer, label_ids: dict[str, int], max_seq_len: int,
                  label_all_subtokens: bool) -> dict[str, list[int]]:
    """One sentence: its inputs, a label per sub-token, the word each position starts, the word tags."""
    encoded = tokenizer(sentence.tokens, is_split_into_words=True, truncation=True, max_length=max_seq_len)
    labels, word_index, previous = [], [], None
    for word in encoded.word_ids():
        if word is None:
            labels.append(IGNORE)
            word_index.append(-1)
        elif word != previous:
            labels.append(label_ids[sentence.tags[word]])
            word_index.append(word)
        else:
            labels.append(label_ids[continuation_tag(sentence.tags[word])] if label_all_subtokens else IGNORE)
            word_index.append(-1)
        previous = word
    record = {key: list(encoded[key]) for key in INPUT_KEYS if key in encoded}
    return record | {"labels": labels, "word_index": word_index,
                     "word_labels": [label_ids[tag] for tag in sentence.tags]}


def encode_text(example: TextExample, tokenizer, label_ids: dict[str, int] | None, max_seq_len: int) -> dict:
    """One text (or pair) and its label: a class id, or the number for regression (label_ids None)."""
    encoded = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_seq_len)
    record = {key: list(encoded[key]) for key in INPUT_KEYS if key in encoded}
    return record | {"labels": float(example.label) if label_ids is None else label_ids[example.label]}


class Collator:
    """Pads a list of encoded records into a batch (right padding; GPT-2 finds its last token by pad id)."""

    def __init__(self, pad_id: int):
        self.pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE,
                           "word_index": -1, "word_labels": IGNORE}

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in records[0]:
            values = [record[key] for record in records]
            if not isinstance(values[0], list):
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)
                continue
            width = max(len(v) for v in values)
            pad = self.pad_values[key]
            batch[key] = torch.tensor([v + [pad] * (width - len(v)) for v in values], dtype=torch.long)
        return batch
