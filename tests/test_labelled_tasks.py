"""data/make_labelled_tasks.py: small classification and tagging tasks from the standard library's docstrings."""

import importlib.util
import json
from pathlib import Path

import pytest

from convmodel.finetune.readers import Columns, read_examples

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "dev", "test")


def load_script():
    spec = importlib.util.spec_from_file_location("make_labelled_tasks", REPO / "data" / "make_labelled_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def build(script, folder: Path, seed: int = 0) -> dict[str, Path]:
    # two packages' files only: seconds, not the whole standard library
    folders = script.build_tasks(str(folder), ["email", "logging"], per_class=60, ner_sentences=90, seed=seed,
                                 only={"email", "logging", "json"})
    return {name: Path(path) for name, path in folders.items()}


def test_tags_follow_from_the_words_and_their_context(script):
    names = {"os", "os.path", "time", "email", "email.message"}
    tokens, tags, plain = script.tag_sentence("Use os.path.join or the time module, not email.message.", names)
    assert list(zip(tokens, tags)) == [
        ("Use", "O"), ("os", "B-ATTR"), (".", "I-ATTR"), ("path", "I-ATTR"), (".", "I-ATTR"), ("join", "I-ATTR"),
        ("or", "O"), ("the", "O"), ("time", "B-MOD"), ("module", "O"), (",", "O"), ("not", "O"),
        ("email", "B-MOD"), (".", "I-MOD"), ("message", "I-MOD"), (".", "O")]
    assert not plain
    tokens, tags, plain = script.tag_sentence("It takes time to import os here.", names)
    assert tags[tokens.index("time")] == "O" and tags[tokens.index("os")] == "B-MOD"
    assert plain  # "time" as an English word: the sentence needs context to be tagged right


def test_both_tasks_have_the_format_the_finetuning_readers_take(script, tmp_path):
    folders = build(script, tmp_path)
    counts = {}
    for split in SPLITS:
        path = folders["package"] / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert records and all(set(r) == {"text", "label"} for r in records)
        labels = [r["label"] for r in records]
        assert labels.count("email") == labels.count("logging")  # balanced
        counts[split] = len(records)
        assert len(read_examples(str(path), "--data.train_file", "sequence_classification", "auto", Columns())) \
            == len(records)
        sentences = read_examples(str(folders["modules"] / f"{split}.conll"), "--data.train_file",
                                  "token_classification", "auto", Columns())
        assert sentences and all(len(s.tokens) == len(s.tags) for s in sentences)
        assert all(" " not in token for s in sentences for token in s.tokens)
    assert counts["train"] > counts["dev"] > 0 and counts["test"] > 0
    texts = {split: {json.loads(line)["text"] for line in (folders["package"] / f"{split}.jsonl").open()}
             for split in SPLITS}
    assert not (texts["train"] & texts["dev"]) and not (texts["train"] & texts["test"])


def test_every_inside_tag_continues_an_entity_of_its_type(script, tmp_path):
    folders = build(script, tmp_path)
    entities = 0
    for split in SPLITS:
        sentences = read_examples(str(folders["modules"] / f"{split}.conll"), "--data.val_file",
                                  "token_classification", "auto", Columns())
        for sentence in sentences:
            previous = "O"
            for tag in sentence.tags:
                assert tag == "O" or tag[:2] in ("B-", "I-") and tag[2:] in ("MOD", "ATTR"), tag
                if tag.startswith("I-"):
                    assert previous != "O" and previous[2:] == tag[2:], (sentence.where, sentence.tags)
                entities += tag.startswith("B-")
                previous = tag
    assert entities > 0


def test_the_same_seed_writes_the_same_files_and_another_seed_others(script, tmp_path):
    first, again, other = build(script, tmp_path / "a"), build(script, tmp_path / "b"), build(script, tmp_path / "c", 1)
    for task, name in (("package", "train.jsonl"), ("modules", "train.conll")):
        assert (first[task] / name).read_bytes() == (again[task] / name).read_bytes()
        assert (first[task] / name).read_bytes() != (other[task] / name).read_bytes()
