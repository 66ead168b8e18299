"""Reading labelled files, and each bad input ending in one `error:` line naming file:line through the CLI.

The errors are raised while the data section is built, before any model loads, so these runs
need no model; `--model.source` is a folder that does not exist and is never reached.
"""

from pathlib import Path

import pytest
from finetune_helpers import write_conll, write_csv, write_jsonl

from convmodel.finetune.cli import main
from convmodel.finetune.readers import Columns, read_examples

REPO = Path(__file__).resolve().parents[1]


def test_conll_skips_docstart_and_reads_the_chosen_columns(tmp_path):
    path = write_conll(tmp_path / "a.conll", [(["Ada", "lived", "in", "London"], ["B-PER", "O", "O", "B-LOC"]),
                                               (["Bob"], ["B-PER"])])
    sentences = read_examples(str(path), "--data.train_file", "token_classification", "auto", Columns())
    assert [(s.tokens, s.tags) for s in sentences] == [(["Ada", "lived", "in", "London"], ["B-PER", "O", "O", "B-LOC"]),
                                                         (["Bob"], ["B-PER"])]
    assert sentences[0].token_where(3) == f"{path}:6"  # -DOCSTART-, blank, then a line per token
    pos = read_examples(str(path), "--data.train_file", "token_classification", "conll", Columns(tag=1))
    assert pos[1].tags == ["NN"]


def test_csv_tsv_and_jsonl_columns(tmp_path):
    rows = [("a b", "c d", "yes"), ("e f", "g h", "no")]
    csv = write_csv(tmp_path / "a.csv", rows, ["s1", "s2", "y"])
    tsv = write_csv(tmp_path / "a.tsv", rows, None, delimiter="\t")
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"s1": t, "s2": p, "y": y} for t, p, y in rows])
    named = Columns(text="s1", text_pair="s2", label="y")
    for path, columns in ((csv, named), (jsonl, named), (tsv, Columns(text="0", text_pair="1", label="2",
                                                                         header=False))):
        examples = read_examples(str(path), "--data.train_file", "sequence_classification", "auto", columns)
        assert [(e.text, e.text_pair, e.label) for e in examples] == rows, path


def run_cli(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs" / "finetune" / "ner.yaml"), "--model.source", "no/such/model",
              *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return err


def test_a_dev_label_training_never_saw_names_its_line(tmp_path, capsys):
    train = write_conll(tmp_path / "train.conll", [(["Ada", "codes"], ["B-PER", "O"])])
    dev = write_conll(tmp_path / "dev.conll", [(["Ada", "codes"], ["B-PER", "O"]), (["at", "IBM"], ["O", "B-ORG"])],
                      docstart=False)
    err = run_cli(["--data.train_file", str(train), "--data.val_file", str(dev), "--data.test_file", "null"], capsys)
    assert f"{dev}:5: label 'B-ORG'" in err and "never occurs in the training file" in err


def test_a_missing_csv_column_names_the_option(tmp_path, capsys):
    rows = [("good film", "pos"), ("bad film", "neg")]
    train = write_csv(tmp_path / "train.csv", rows, ["text", "label"])
    err = run_cli(["--config", str(REPO / "configs" / "finetune" / "classification.yaml"), "--data.train_file",
                   str(train), "--data.val_file", str(train), "--data.test_file", "null",
                   "--data.text_pair_column", "sentence2"], capsys)
    assert f"{train}:1: the header ['text', 'label'] has no column --data.text_pair_column 'sentence2'" in err


def test_jsonl_tokens_and_tags_of_different_lengths(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Ada", "codes"], "tags": ["B-PER", "O"]},
                                                    {"tokens": ["Bob", "writes", "code"], "tags": ["B-PER", "O"]}])
    err = run_cli(["--data.train_file", str(train), "--data.val_file", str(train), "--data.test_file", "null"],
                  capsys)
    assert f"{train}:2: 3 tokens but 2 tags" in err


def test_a_conll_line_without_a_tag_and_a_bad_regression_label(tmp_path, capsys):
    train = tmp_path / "train.conll"
    train.write_text("Ada B-PER\ncodes\n", encoding="utf-8")
    err = run_cli(["--data.train_file", str(train), "--data.val_file", str(train), "--data.test_file", "null",
                   "--data.tag_column", "1"], capsys)
    assert f"{train}:2: 1 column(s) 'codes'" in err and "--data.tag_column 1" in err
    scores = write_csv(tmp_path / "train.tsv", [("a", "b", "4.5"), ("c", "d", "high")], None, delimiter="\t")
    err = run_cli(["--config", str(REPO / "configs" / "finetune" / "regression.yaml"), "--data.train_file",
                   str(scores), "--data.val_file", str(scores), "--data.test_file", "null", "--data.header", "false",
                   "--data.text_column", "0", "--data.text_pair_column", "1", "--data.label_column", "2"], capsys)
    assert f"{scores}:2: label 'high' is not a number" in err


def test_a_model_source_that_is_missing_not_there_or_not_a_convmodel_checkpoint(tmp_path, capsys):
    train = write_conll(tmp_path / "train.conll", [(["Ada", "codes"], ["B-PER", "O"])])
    data = ["--data.train_file", str(train), "--data.val_file", str(train), "--data.test_file", "null"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs" / "finetune" / "ner.yaml"), *data])
    assert exit_info.value.code == 2
    assert "error: --model.source is required: the pretrained model" in capsys.readouterr().err
    err = run_cli(data, capsys)
    assert "error: --model.source no/such/model: no such file or folder" in err
    import torch

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    err = run_cli([*data, "--model.source", str(foreign)], capsys)
    assert f"--model.source {foreign} was not written by convmodel's trainer.py" in err
