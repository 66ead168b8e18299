"""The task metrics against values worked out by hand, and sub-token labelling on a real tokenizer."""

import pytest
import torch

from convmodel.finetune.encoding import IGNORE, encode_tagged
from convmodel.finetune.labels import label_names
from convmodel.finetune.metrics import classification_scores, entity_scores, regression_scores
from convmodel.finetune.readers import TaggedSentence


def test_entity_scores_count_whole_entities_micro_and_per_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-PER"]]
    # gold entities: PER(0-1), LOC(3), LOC(0); predicted: PER(0) (wrong end), LOC(3), LOC(0), PER(1)
    # correct: the two LOCs -> precision 2/4, recall 2/3, F1 4/7; PER 0 right of 1 gold / 2 predicted
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["accuracy"] == pytest.approx(4 / 6)  # words: 3 of 4 and 1 of 2
    assert (scores["precision_LOC"], scores["recall_LOC"], scores["f1_LOC"]) == (1.0, 1.0, 1.0)
    assert (scores["precision_PER"], scores["recall_PER"], scores["f1_PER"]) == (0.0, 0.0, 0.0)
    # seqeval's default (conlleval) semantics: an I- without a B- starts an entity
    assert entity_scores([["I-PER", "O"]], [["I-PER", "O"]])["f1"] == 1.0


def test_classification_scores():
    predicted, target = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    scores = classification_scores(predicted, target, num_classes=4)  # class 3 never occurs: not in macro-F1
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # MCC = (correct * n - sum(pred_k * true_k)) / sqrt((n^2 - sum pred_k^2) (n^2 - sum true_k^2))
    assert scores["mcc"] == pytest.approx((3 * 4 - (1 * 1 + 2 * 1 + 1 * 2)) / (16 - 6))


def test_regression_scores():
    scores = regression_scores(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert scores["pearson"] == pytest.approx(13 / 250 ** 0.5, abs=1e-6)  # cov 13, variances 50 and 5
    assert scores["spearman"] == pytest.approx(0.8, abs=1e-6)  # ranks 1 2 3 4 against 1 3 2 4
    assert regression_scores(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])) == {"pearson": 0.0, "spearman": 0.0}


def test_first_sub_token_labelled_or_all_with_b_as_i(tokenizer_dir):
    from convmodel.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    sentence = TaggedSentence(["Lovelace", "wrote", "notes"], ["B-PER", "O", "O"], "x:1")
    pieces = len(tokenizer.tokenize("Lovelace"))
    assert pieces > 1
    names = label_names("token_classification", [sentence], label_all_subtokens=True)
    assert names == ["O", "B-PER", "I-PER"]
    ids = {name: i for i, name in enumerate(names)}
    first = encode_tagged(sentence, tokenizer, ids, 64, label_all_subtokens=False)
    every = encode_tagged(sentence, tokenizer, ids, 64, label_all_subtokens=True)
    # [CLS] Lovelace's pieces, wrote..., notes..., [SEP]
    assert first["labels"][:1 + pieces] == [IGNORE, ids["B-PER"]] + [IGNORE] * (pieces - 1)
    assert every["labels"][:1 + pieces] == [IGNORE, ids["B-PER"]] + [ids["I-PER"]] * (pieces - 1)
    assert first["word_index"][:2 + pieces] == [-1, 0] + [-1] * (pieces - 1) + [1]
    assert first["word_labels"] == every["word_labels"] == [ids["B-PER"], ids["O"], ids["O"]]
    # cut by max_seq_len: the words that do not fit still have their gold tags
    cut = encode_tagged(sentence, tokenizer, ids, 4, label_all_subtokens=False)
    assert len(cut["input_ids"]) == 4 and len(cut["word_labels"]) == 3
