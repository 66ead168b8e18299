"""prepare_train_data: text -> shards for mlm, clm and sop, checked against the text itself."""

import json
import os
import random

import pytest

from convmodel.data.prepare import main, prepare_train_data
from convmodel.errors import UserError
from convmodel.tokenization import load_tokenizer, train_tokenizer

SYLLABLES = ["ka", "to", "mi", "ra", "ne", "su", "lo", "pe", "di", "ga", "vo", "xu", "ba", "che", "fi", "ju", "ze", "ho"]


def write_corpus(path, rng: random.Random, documents: int, max_sentences: int = 8, long_every: int = 0) -> list[list[str]]:
    """Documents of unique pseudo-word sentences, a blank line between documents; returns them."""
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    docs = []
    serial = 0
    for _ in range(documents):
        sentences = []
        for _ in range(rng.randint(1, max_sentences)):
            serial += 1
            n = 60 if long_every and serial % long_every == 0 else rng.randint(3, 14)
            sentences.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + f" n{serial}.")
        docs.append(sentences)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(doc) for doc in docs) + "\n")
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "corpus.txt", random.Random(0), 200)
    return train_tokenizer(str(root / "corpus.txt"), str(root / "tokenizer"), vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def read_records(output_dir) -> list[dict]:
    records = []
    for name in sorted(os.listdir(output_dir)):
        with open(os.path.join(output_dir, name), encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def doc_tokens(tokenizer, docs: list[list[str]]) -> list[list[list[int]]]:
    return [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]


def test_mlm_packs_every_sentence_in_order(tmp_path, tokenizer_dir, tokenizer):
    docs = write_corpus(tmp_path / "a.txt", random.Random(1), 40, long_every=25)
    summary = prepare_train_data(
        str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", max_seq_len=48, shard_size=10, progress=False
    )
    records = read_records(tmp_path / "out")
    assert summary.records == len(records) and summary.shards == len(os.listdir(tmp_path / "out")) > 1
    assert sorted(os.listdir(tmp_path / "out"))[:2] == ["part-00000.jsonl", "part-00001.jsonl"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    content = []
    for r in records:
        ids = r["input_ids"]
        assert set(r) == {"input_ids"} and len(ids) <= 48
        assert ids[0] == cls and ids[-1] == sep and cls not in ids[1:]
        assert ids[1] != sep and ids[-2] != sep  # a document separator never opens or closes a record
        content.extend(t for t in ids[1:-1] if t != sep)
    expected = [t for doc in doc_tokens(tokenizer, docs) for sentence in doc for t in sentence]
    assert content == expected  # nothing dropped (long sentences are cut, not lost), nothing reordered
    assert summary.tokens == sum(len(r["input_ids"]) for r in records)
    # packing runs across document ends, with [SEP] between the documents
    assert any(sep in r["input_ids"][1:-1] for r in records)


def test_clm_ends_each_document_with_eos(tmp_path, tokenizer_dir, tokenizer):
    docs = write_corpus(tmp_path / "a.txt", random.Random(2), 30, long_every=20)
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "clm", 40, progress=False)
    records = read_records(tmp_path / "out")
    eos = tokenizer.eos_token_id
    assert all(len(r["input_ids"]) <= 40 and tokenizer.cls_token_id not in r["input_ids"] for r in records)
    stream = [t for r in records for t in r["input_ids"]]
    expected = [t for doc in doc_tokens(tokenizer, docs) for t in [*sum(doc, []), eos]]
    assert stream == expected
    assert stream.count(eos) == len(docs)


def test_text_spelling_a_special_token_stays_text(tmp_path, tokenizer_dir, tokenizer):
    (tmp_path / "a.txt").write_text("Kato [SEP] mira <|endoftext|> su [CLS].\n", encoding="utf-8")
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 64, progress=False)
    (record,) = read_records(tmp_path / "out")
    inner = record["input_ids"][1:-1]
    assert not set(inner) & set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}


def test_sop_pairs_are_consecutive_spans_of_one_document(tmp_path, tokenizer_dir, tokenizer):
    docs = write_corpus(tmp_path / "a.txt", random.Random(3), 300, max_sentences=6, long_every=30)
    docs.append(["Kato mira su."])  # a one-sentence document: split inside the sentence
    with open(tmp_path / "a.txt", "a", encoding="utf-8") as f:
        f.write("\nKato mira su.\n")
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "sop", 40, seed=5, progress=False)
    records = read_records(tmp_path / "out")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    doc_strings = [",{},".format(",".join(map(str, sum(doc, [])))) for doc in doc_tokens(tokenizer, docs)]
    labels = []
    for r in records:
        ids, types, label = r["input_ids"], r["token_type_ids"], r["sentence_order_label"]
        assert len(ids) == len(types) <= 40 and label in (0, 1)
        assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 2 and ids.count(cls) == 1
        first_sep = ids.index(sep)
        a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
        assert a and b and a != b
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        in_order = a + b if label == 0 else b + a
        span = ",{},".format(",".join(map(str, in_order)))
        assert sum(span in d for d in doc_strings) >= 1, "A and B must be one consecutive span of a document"
        labels.append(label)
    assert len(labels) > 300
    assert 0.4 < sum(labels) / len(labels) < 0.6
    # the one-sentence document, last in the file, gave the last pair: its sentence cut in two
    last = records[-1]
    first_sep = last["input_ids"].index(sep)
    a, b = last["input_ids"][1:first_sep], last["input_ids"][first_sep + 1 : -1]
    assert (b + a if last["sentence_order_label"] else a + b) == tokenizer("Kato mira su.", add_special_tokens=False)["input_ids"]


def test_same_shards_with_two_workers_as_with_one(tmp_path, tokenizer_dir):
    write_corpus(tmp_path / "a.txt", random.Random(4), 60)
    write_corpus(tmp_path / "b.txt", random.Random(5), 60)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare_train_data(
            str(tmp_path / "*.txt"), tokenizer_dir, str(out), "sop", 32, shard_size=50,
            num_workers=workers, seed=7, chunk_bytes=2000, progress=False,
        )  # fmt: skip
        outputs.append({name: (out / name).read_text() for name in sorted(os.listdir(out))})
    assert len(outputs[0]) > 2 and outputs[0] == outputs[1]


def test_undecodable_line_is_reported_with_file_and_line(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("Kato mira.\n\nSu lo pe.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"Kato mira.\nSu lo.\n\nPe di ga.\nvo \xff\xfe xu.\nba.\n")
    with pytest.raises(UserError, match=r"b\.txt:5: not valid UTF-8.*convert"):  # raised in a pool worker
        prepare_train_data(
            str(tmp_path / "*.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32, num_workers=2, progress=False
        )
    assert not os.listdir(tmp_path / "out")  # no half-written shards left behind


def test_user_mistakes_name_the_option(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("Kato mira.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--input 'nothing/\*\.txt' matches no file"):
        prepare_train_data("nothing/*.txt", tokenizer_dir, str(tmp_path / "out"), "mlm", 32)
    with pytest.raises(UserError, match="--objective must be one of mlm, sop, clm") as info:
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "nsp", 32, shard_size=0)
    assert "--shard_size" in str(info.value)  # every problem at once
    with pytest.raises(UserError, match="--max_seq_len must be an integer >= 5 for sop"):
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "sop", 4)
    with pytest.raises(UserError, match="does not exist"):
        prepare_train_data(str(tmp_path / "a.txt"), str(tmp_path / "no-tokenizer"), str(tmp_path / "out"), "mlm", 32)

    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32, progress=False)
    with pytest.raises(UserError, match="already holds 1 shard.*--overwrite"):
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "clm", 32, progress=False)
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "clm", 32, overwrite=True, progress=False)
    assert read_records(tmp_path / "out")[0]["input_ids"][0] != 2  # replaced by clm records: no [CLS]


def test_command_line_prints_summary_or_error(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_text("Kato mira su.\nLo pe di.\n\nGa vo xu.\n", encoding="utf-8")
    argv = ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer_dir, "--output_dir", str(tmp_path / "out")]
    main([*argv, "--objective", "sop", "--max_seq_len", "16"])
    assert "sop records" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output_dir") and "Traceback" not in err


def test_command_line_takes_a_glob_the_shell_expanded(tmp_path, tokenizer_dir, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"Kato {name} mira su.\nLo pe di.\n", encoding="utf-8")
    main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--tokenizer", tokenizer_dir,
          "--output_dir", str(tmp_path / "out"), "--num_workers", "1"])
    assert "mlm records" in capsys.readouterr().out
    text = "".join(path.read_text() for path in (tmp_path / "out").glob("part-*.jsonl"))
    assert text.count("input_ids") == 2  # one record per file: both files were read
