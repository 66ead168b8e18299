"""Collators: masking rates, specials never masked, whole words (also without spaces), fixed eval masks,
clm and sop batches."""

import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from convmodel.data.collators import MAX_WORD_PIECES, CausalLmCollator, MaskedLmCollator
from convmodel.data.jsonl_stream import JsonlStream
from convmodel.data.word_boundaries import bare_space_id, piece_starts_word, word_start_table
from convmodel.errors import UserError
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


# Japanese made of words joined WITHOUT spaces, as Japanese is written.
JA_NOUNS = ["東京", "大阪", "学校", "先生", "学生", "友達", "電車", "自転車", "図書館", "映画", "音楽", "料理",
            "天気", "週末", "会社", "仕事", "日本語", "英語", "新聞", "手紙", "公園", "犬", "猫", "花", "山", "海",
            "コーヒー", "パン", "ラーメン", "テレビ", "コンピューター", "スマートフォン", "ホテル", "レストラン",
            "駅", "病院", "買い物", "旅行", "写真", "時間", "お茶", "雨", "雪", "春", "夏", "秋", "冬", "家族"]
JA_ADJECTIVES = ["大きい", "小さい", "新しい", "古い", "おいしい", "楽しい", "静かな", "有名な", "きれいな", "高い"]
JA_VERBS = ["行きます", "来ました", "食べます", "飲みました", "見ます", "読みました", "書きます", "買いました",
            "話します", "聞きました", "使います", "待ちました", "作ります", "勉強します", "好きです", "あります"]
JA_PARTICLES = ["は", "が", "を", "に", "で", "と", "の", "へ", "から", "まで", "も"]


def japanese_line(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.3:
                parts.append(rng.choice(JA_ADJECTIVES))
            parts += [rng.choice(JA_NOUNS), rng.choice(JA_PARTICLES)]
        sentences.append("".join(parts) + rng.choice(JA_VERBS) + rng.choice(["。", "か。", "、そして"]))
    return "".join(sentences)


@pytest.fixture(scope="module")
def ja_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("ja")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(japanese_line(rng) for _ in range(2000)) + "\n", encoding="utf-8")
    return load_tokenizer(train_tokenizer(str(root / "corpus.txt"), str(root / "tokenizer"), vocab_size=600))


@pytest.fixture(scope="module")
def ja_samples(ja_tokenizer) -> list[dict]:
    rng = random.Random(1)
    ids = ja_tokenizer([japanese_line(rng) for _ in range(600)], add_special_tokens=True)["input_ids"]
    return [{"input_ids": x, "index": i} for i, x in enumerate(ids)]


def original_ids(batch: dict) -> torch.Tensor:
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def masked_rows(batch: dict, samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Per sample: (input_ids, labels) without the batch's padding."""
    return [
        (batch["input_ids"][row, : len(s["input_ids"])].tolist(), batch["labels"][row, : len(s["input_ids"])].tolist())
        for row, s in enumerate(samples)
    ]


@pytest.mark.parametrize("deterministic", [False, True])
def test_mlm_masks_15_percent_with_80_10_10(tokenizer, samples, deterministic):
    collator = MaskedLmCollator(tokenizer, seed=0, deterministic=deterministic)
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
    replaced = batch["input_ids"][masked & (batch["input_ids"] != tokenizer.mask_token_id) & (batch["input_ids"] != ids)]
    assert replaced.unique().numel() > 0.5 * replaced.numel(), "random replacements should spread over the vocabulary"
    assert replaced.max() < len(tokenizer)


def pad_ids(samples, pad_id) -> torch.Tensor:
    longest = max(len(s["input_ids"]) for s in samples)
    return torch.tensor([s["input_ids"] + [pad_id] * (longest - len(s["input_ids"])) for s in samples])


def reference_words(ids: list[int], table: torch.Tensor, space_id: int | None, cap: int) -> list[tuple[int, int]]:
    """[start, end) of each word of a [CLS] text [SEP] sample, found one piece at a time."""
    words, start = [], 1
    for end in range(2, len(ids)):
        starts_word = bool(table[ids[end]]) and ids[end - 1] != space_id
        if end == len(ids) - 1 or starts_word or end - start == cap:
            words.append((start, end))
            start = end
    return words


@pytest.mark.parametrize("deterministic", [False, True])
def test_whole_word_mask_masks_all_pieces_of_a_word(tokenizer, samples, deterministic):
    collator = MaskedLmCollator(tokenizer, whole_word_mask=True, seed=0, deterministic=deterministic)
    batch = collator(samples)
    table, space_id = word_start_table(tokenizer), bare_space_id(tokenizer)
    words = masked_words = multi_piece_masked = 0
    for row, sample in enumerate(samples):
        ids = sample["input_ids"]
        chosen = (batch["labels"][row, : len(ids)] != -100).tolist()
        assert not chosen[0] and not chosen[-1]  # [CLS], [SEP]
        for start, end in reference_words(ids, table, space_id, MAX_WORD_PIECES):
            word = chosen[start:end]
            assert all(word) or not any(word), f"word {tokenizer.convert_ids_to_tokens(ids[start:end])} half masked"
            words += 1
            masked_words += word[0]
            multi_piece_masked += word[0] and len(word) > 1
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


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_eval_masks_do_not_depend_on_batching(tokenizer, samples, whole_word_mask):
    collator = MaskedLmCollator(tokenizer, seed=3, deterministic=True, whole_word_mask=whole_word_mask)
    reference = masked_rows(collator(samples[:300]), samples[:300])
    for trial in range(5):  # random orders cut into random batch sizes
        rng = random.Random(trial)
        order = rng.sample(range(300), 300)
        while order:
            size = rng.randint(1, 40)
            part, order = order[:size], order[size:]
            rows = masked_rows(collator([samples[i] for i in part]), [samples[i] for i in part])
            assert rows == [reference[i] for i in part]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_special_tokens_and_padding_are_never_masked(tokenizer, samples, deterministic, whole_word_mask):
    collator = MaskedLmCollator(tokenizer, seed=0, deterministic=deterministic, whole_word_mask=whole_word_mask)
    special = torch.tensor(sorted({*tokenizer.all_special_ids, tokenizer.pad_token_id}))
    rng = random.Random(0)
    for epoch in range(20):
        collator.set_epoch(epoch)
        chosen = rng.sample(samples, rng.randint(1, 64))
        # a few samples carry special tokens inside the text, as sop and packed records do
        chosen = [dict(s, input_ids=s["input_ids"][:5] + [3, 5] + s["input_ids"][5:]) if i % 3 == 0 else s
                  for i, s in enumerate(chosen)]
        batch = collator(chosen)
        ids = pad_ids(chosen, tokenizer.pad_token_id)
        fixed = torch.isin(ids, special)
        assert (batch["labels"][fixed] == -100).all()
        assert torch.equal(batch["input_ids"][fixed], ids[fixed])
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_training_masks_change_with_epoch_and_batch(tokenizer, samples):
    collator = MaskedLmCollator(tokenizer, seed=0)
    epoch0 = collator(samples[:16])
    assert torch.equal(collator(samples[:16])["labels"], epoch0["labels"])  # seeded: reproducible
    collator.set_epoch(1)
    epoch1 = collator(samples[:16])
    assert not torch.equal(epoch1["labels"], epoch0["labels"])
    # unrelated draws: two epochs choose the same token about 15% x 15% of the time
    both = ((epoch0["labels"] != -100) & (epoch1["labels"] != -100)).sum() / epoch0["attention_mask"].sum()
    assert both < 0.05
    collator.set_epoch(0)
    renumbered = [dict(s, index=s["index"] + 1000) for s in samples[:16]]
    assert not torch.equal(collator(renumbered)["labels"], epoch0["labels"])


@pytest.mark.parametrize("deterministic", [False, True])
def test_input_ids_may_be_lists_numpy_arrays_or_tensors(tokenizer, samples, deterministic):
    collator = MaskedLmCollator(tokenizer, seed=0, deterministic=deterministic, whole_word_mask=True)
    as_lists = collator(samples[:32])
    for convert in (lambda x: np.array(x, dtype=np.int32), lambda x: torch.tensor(x)):
        batch = collator([dict(s, input_ids=convert(s["input_ids"])) for s in samples[:32]])
        assert all(torch.equal(batch[k], as_lists[k]) for k in as_lists)


def test_eval_masks_need_sample_indices(tokenizer):
    with pytest.raises(UserError, match="index"):
        MaskedLmCollator(tokenizer, deterministic=True)([{"input_ids": [2, 300, 3]}])


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


def test_piece_rules_for_word_starts():
    assert piece_starts_word("\u2581the") and piece_starts_word("\u2581")
    assert not piece_starts_word("ing") and not piece_starts_word(".")
    assert piece_starts_word("語") and piece_starts_word("タワー") and piece_starts_word("の") and piece_starts_word("。")
    assert piece_starts_word("ภาษา")  # Thai
    assert piece_starts_word("<0xE3>") and not piece_starts_word("<0x81>") and not piece_starts_word("<0xC3>")


def masked_runs(batch: dict) -> list[int]:
    """Lengths of the runs of consecutive masked positions in every row."""
    runs = []
    for row in (batch["labels"] != -100).tolist():
        length = 0
        for chosen in [*row, False]:
            if chosen:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


@pytest.mark.parametrize("deterministic", [False, True])
def test_japanese_whole_word_masking_masks_words_not_lines(ja_tokenizer, ja_samples, deterministic):
    # Japanese has no spaces: only a line's first piece has "▁", so "▁" alone made the line one word
    collator = MaskedLmCollator(ja_tokenizer, whole_word_mask=True, seed=0, deterministic=deterministic)
    batch = collator(ja_samples)
    text_tokens = sum(len(s["input_ids"]) - 2 for s in ja_samples)
    rate = (batch["labels"] != -100).sum().item() / text_tokens
    assert 0.10 < rate < 0.20
    runs = masked_runs(batch)
    assert sum(runs) / len(runs) <= 3  # neighbouring words chosen together make runs a little longer
    shortest_line = min(len(s["input_ids"]) - 2 for s in ja_samples)
    assert max(runs) < min(shortest_line, 3 * MAX_WORD_PIECES)


def test_long_words_are_split_at_max_word_pieces(tokenizer):
    continuation = next(i for p, i in tokenizer.get_vocab().items() if p.isalpha() and not p.startswith("\u2581"))
    samples = [{"input_ids": [2, *[continuation] * 60, 3], "index": i} for i in range(400)]
    batch = MaskedLmCollator(tokenizer, whole_word_mask=True, seed=0, max_word_pieces=4)(samples)
    chosen = (batch["labels"][:, 1:-1] != -100).view(400, 15, 4)  # 15 words of 4 pieces a row
    assert (chosen.all(dim=2) | ~chosen.any(dim=2)).all(), "a 4-piece word was half masked"
    assert 0.12 < chosen[:, :, 0].float().mean() < 0.18


def test_word_ids_field_sets_the_words(tokenizer, samples):
    # a segmenter's words: pieces 1-3, 4-6, ... of each text are one word, whatever the pieces say
    def with_word_ids(s):
        n = len(s["input_ids"])
        return dict(s, word_ids=[None] + [(t - 1) // 3 for t in range(1, n - 1)] + [None])

    given = [with_word_ids(s) for s in samples[:300]]
    batch = MaskedLmCollator(tokenizer, whole_word_mask=True, seed=0)(given + samples[300:320])
    rate = 0
    for row, s in enumerate(given):
        chosen = (batch["labels"][row, 1 : len(s["input_ids"]) - 1] != -100).tolist()
        for start in range(0, len(chosen), 3):
            word = chosen[start : start + 3]
            assert all(word) or not any(word)
            rate += word[0]
    assert 0.12 < rate / sum(-(-(len(s["input_ids"]) - 2) // 3) for s in given) < 0.18
    assert (batch["labels"][300:] != -100).any()  # samples without the field still get masks
    with pytest.raises(UserError, match="word_ids has 2 entries but input_ids has 3"):
        MaskedLmCollator(tokenizer, whole_word_mask=True)([{"input_ids": [2, 300, 3], "word_ids": [0, 0], "index": 7}])
