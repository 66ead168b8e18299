"""Collators: masking rates, specials never masked, whole words, fixed eval masks, clm and sop batches."""

import json
import random

import pytest
import torch
from torch.utils.data import DataLoader

from convmodel.data.collators import CausalLmCollator, MaskedLmCollator, word_start_table
from convmodel.data.jsonl_stream import JsonlStream
from convmodel.tokenization import load_tokenizer, train_tokenizer

SYLLABLES = ["ka", "to", "mi", "ra", "ne", "su", "lo", "pe", "di", "ga", "vo", "xu", "ba", "che", "fi", "ju", "ze", "ho"]


def sentences(rng: random.Random, count: int) -> list[str]:
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(sentences(random.Random(0), 1500)) + "\n", encoding="utf-8")
    return load_tokenizer(train_tokenizer(str(root / "corpus.txt"), str(root / "tokenizer"), vocab_size=400))


@pytest.fixture(scope="module")
def samples(tokenizer) -> list[dict]:
    """Real [CLS] text [SEP] samples of varied length (so the batch has padding), with indices."""
    texts = sentences(random.Random(1), 600)
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [{"input_ids": x, "index": i} for i, x in enumerate(ids)]


def original_ids(batch: dict) -> torch.Tensor:
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def test_mlm_masks_15_percent_with_80_10_10(tokenizer, samples):
    collator = MaskedLmCollator(tokenizer, seed=0)
    batch = collator(samples)
    ids = pad_ids(samples, tokenizer.pad_token_id)
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    masked = batch["labels"] != -100
    assert batch["attention_mask"].sum() == sum(len(s["input_ids"]) for s in samples)
    rate = masked.sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    assert not (masked & special).any(), "a special token ([CLS], [SEP], [PAD]) was chosen"
    assert torch.equal(batch["input_ids"][special], ids[special]), "a special token was replaced"
    assert torch.equal(batch["labels"][masked], ids[masked])
    as_mask = (batch["input_ids"][masked] == tokenizer.mask_token_id).float().mean()
    kept = (batch["input_ids"][masked] == ids[masked]).float().mean()
    assert 0.75 < as_mask < 0.85 and 0.06 < kept < 0.14  # the rest (~10%) are random ids
    assert not (batch["input_ids"][~masked] == tokenizer.mask_token_id).any()


def pad_ids(samples, pad_id) -> torch.Tensor:
    longest = max(len(s["input_ids"]) for s in samples)
    return torch.tensor([s["input_ids"] + [pad_id] * (longest - len(s["input_ids"])) for s in samples])


def test_whole_word_mask_masks_all_pieces_of_a_word(tokenizer, samples):
    collator = MaskedLmCollator(tokenizer, whole_word_mask=True, seed=0)
    batch = collator(samples)
    table = word_start_table(tokenizer)
    words = masked_words = multi_piece_masked = 0
    for row, sample in enumerate(samples):
        ids = sample["input_ids"]
        chosen = (batch["labels"][row, : len(ids)] != -100).tolist()
        assert not chosen[0] and not chosen[-1]  # [CLS], [SEP]
        start = 1
        for end in range(2, len(ids)):  # split the text between [CLS] and [SEP] into words
            if end == len(ids) - 1 or table[ids[end]]:
                word = chosen[start:end]
                assert all(word) or not any(word), f"word {tokenizer.convert_ids_to_tokens(ids[start:end])} half masked"
                words += 1
                masked_words += word[0]
                multi_piece_masked += word[0] and len(word) > 1
                start = end
    assert 0.13 < masked_words / words < 0.17
    assert multi_piece_masked > 50
    masked = batch["labels"] != -100
    as_mask = (batch["input_ids"][masked] == tokenizer.mask_token_id).float().mean()
    assert 0.75 < as_mask < 0.85  # 80/10/10 per token, unlike transformers' whole-word mode


def test_eval_masks_are_fixed_per_sample(tokenizer, samples):
    collator = MaskedLmCollator(tokenizer, seed=0, deterministic=True)
    first = collator(samples[:8])
    again = MaskedLmCollator(tokenizer, seed=0, deterministic=True)(samples[:8])
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    # the same sample in another batch (other neighbours, other padding) gets the same mask
    other = collator([samples[20], samples[5]])
    n = len(samples[5]["input_ids"])
    assert torch.equal(other["labels"][1, :n], first["labels"][5, :n])
    assert torch.equal(other["input_ids"][1, :n], first["input_ids"][5, :n])
    assert (first["labels"] != -100).any()
    assert not torch.equal(MaskedLmCollator(tokenizer, seed=1, deterministic=True)(samples[:8])["labels"], first["labels"])


def test_training_masks_change_with_epoch_and_batch(tokenizer, samples):
    collator = MaskedLmCollator(tokenizer, seed=0)
    epoch0 = collator(samples[:16])
    assert torch.equal(collator(samples[:16])["labels"], epoch0["labels"])  # seeded: reproducible
    collator.set_epoch(1)
    assert not torch.equal(collator(samples[:16])["labels"], epoch0["labels"])
    collator.set_epoch(0)
    renumbered = [dict(s, index=s["index"] + 1000) for s in samples[:16]]
    assert not torch.equal(collator(renumbered)["labels"], epoch0["labels"])


def test_dataloader_workers_mask_differently(tmp_path, tokenizer):
    # 8 identical records read by 2 workers: any repeat of masks across workers shows up here
    path = tmp_path / "part-00000.jsonl"
    record = json.dumps({"input_ids": [2, *range(300, 364), 3]})
    path.write_text((record + "\n") * 8)
    loader = DataLoader(JsonlStream([str(path)]), batch_size=2, num_workers=2, collate_fn=MaskedLmCollator(tokenizer))
    masks = [batch["labels"] != -100 for batch in loader]
    assert len(masks) == 4
    rows = [tuple(row.tolist()) for m in masks for row in m]
    assert len(set(rows)) == len(rows)


def test_sop_batch_passes_segments_and_labels(tokenizer):
    samples = [
        {"input_ids": [2, 300, 301, 3, 302, 3], "token_type_ids": [0, 0, 0, 0, 1, 1], "sentence_order_label": 1, "index": 0},
        {"input_ids": [2, 303, 3, 304, 3], "token_type_ids": [0, 0, 0, 1, 1], "sentence_order_label": 0, "index": 1},
    ]
    batch = MaskedLmCollator(tokenizer, sentence_order=True)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids", "sentence_order_label"}
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert batch["sentence_order_label"].tolist() == [1, 0] and batch["sentence_order_label"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert torch.equal(original_ids(batch)[1, :5], torch.tensor(samples[1]["input_ids"]))


def test_clm_labels_are_inputs_with_padding_ignored(tokenizer):
    samples = [{"input_ids": [300, 301, 5, 302], "index": 0}, {"input_ids": [303, 304], "index": 1}]
    batch = CausalLmCollator(tokenizer)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[300, 301, 5, 302], [303, 304, 0, 0]]
    assert batch["labels"].tolist() == [[300, 301, 5, 302], [303, 304, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
