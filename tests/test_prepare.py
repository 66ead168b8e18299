"""prepare_train_data: text -> shards for mlm, clm and sop, checked against the text itself."""

import json
import os
import random

import pytest

from convmodel.data.manifest import read_manifest, tokenizer_fingerprint
from convmodel.data.prepare import main, prepare_train_data
from convmodel.data.records import DocumentPacker
from convmodel.errors import UserError
from convmodel.special_ids import special_ids_of
from convmodel.tokenization import load_tokenizer, train_tokenizer
from convmodel.tokenization import main as tokenizer_main

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


def shard_names(output_dir) -> list[str]:
    return sorted(name for name in os.listdir(output_dir) if name.startswith("part-"))


def read_records(output_dir) -> list[dict]:
    records = []
    for name in shard_names(output_dir):
        with open(os.path.join(output_dir, name), encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def doc_tokens(tokenizer, docs: list[list[str]]) -> list[list[list[int]]]:
    return [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]


def record_cuts_inside_sentences(records_content: list[list[int]], sentences: list[list[int]], budget: int) -> list[int]:
    """Lengths of the sentences a record boundary falls inside (the stream positions of both must agree)."""
    ends, position = set(), 0
    for content in records_content[:-1]:
        position += len(content)
        ends.add(position)
    cut, position = [], 0
    for sentence in sentences:
        if any(position < end < position + len(sentence) for end in ends):
            cut.append(len(sentence))
        position += len(sentence)
    return cut


def test_mlm_packs_whole_sentences_and_keeps_every_token_in_order(tmp_path, tokenizer_dir, tokenizer):
    docs = write_corpus(tmp_path / "a.txt", random.Random(1), 40, long_every=25)
    summary = prepare_train_data(
        str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", max_seq_len=48, shard_size=10, progress=False
    )
    records = read_records(tmp_path / "out")
    assert summary.manifest.records == len(records) and len(summary.manifest.shards) == len(shard_names(tmp_path / "out")) > 1
    assert shard_names(tmp_path / "out")[:2] == ["part-00000.jsonl", "part-00001.jsonl"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    content = []
    for r in records:
        ids = r["input_ids"]
        assert set(r) == {"input_ids"} and len(ids) <= 48
        assert ids[0] == cls and ids[-1] == sep and cls not in ids[1:]
        assert ids[1] != sep and ids[-2] != sep  # a document separator never opens or closes a record
        content.extend(t for t in ids[1:-1] if t != sep)
    sentences = [sentence for doc in doc_tokens(tokenizer, docs) for sentence in doc]
    assert content == [t for sentence in sentences for t in sentence]  # nothing dropped, nothing reordered
    # a record ends at a sentence end; only the sentences longer than a record (60 words) are cut
    per_record = [[t for t in r["input_ids"][1:-1] if t != sep] for r in records]
    cut = record_cuts_inside_sentences(per_record, sentences, 46)
    assert cut and all(length > 46 for length in cut)
    # and a record closes only when the sentence after it did not fit (a [SEP] may have been needed too)
    starts, position = {}, 0
    for sentence in sentences:
        starts[position] = sentence
        position += len(sentence)
    position = 0
    for record in per_record[:-1]:
        position += len(record)
        if position in starts:
            assert len(record) + 1 + len(starts[position]) > 46
    assert summary.manifest.tokens == sum(len(r["input_ids"]) for r in records)
    # packing runs across document ends, with [SEP] between the documents
    assert any(sep in r["input_ids"][1:-1] for r in records)


def test_clm_records_are_the_token_stream_cut_at_max_seq_len(tmp_path, tokenizer_dir, tokenizer):
    docs = write_corpus(tmp_path / "a.txt", random.Random(2), 30, long_every=20)
    docs += write_corpus(tmp_path / "b.txt", random.Random(12), 30)
    prepare_train_data(f"{tmp_path}/a.txt,{tmp_path}/b.txt", tokenizer_dir, str(tmp_path / "out"), "clm", 40,
                       chunk_bytes=500, num_workers=1, progress=False)  # many chunks: the stream crosses them
    records = read_records(tmp_path / "out")
    eos = tokenizer.eos_token_id
    assert [len(r["input_ids"]) for r in records[:-1]] == [40] * (len(records) - 1)
    assert 0 < len(records[-1]["input_ids"]) <= 40
    assert all(tokenizer.cls_token_id not in r["input_ids"] for r in records)
    stream = [t for r in records for t in r["input_ids"]]
    expected = [t for doc in doc_tokens(tokenizer, docs) for t in [*sum(doc, []), eos]]
    assert stream == expected  # no token lost or duplicated at a record, chunk or file boundary
    assert stream.count(eos) == len(docs)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_packer_properties_on_random_documents(objective, tokenizer):
    """Any documents, any length: records fit, clm's are full but the last, mlm's cut only over-long
    sentences, and the records give the documents back."""
    special = special_ids_of(tokenizer)
    rng = random.Random(objective)
    for _ in range(300):
        max_seq_len = rng.randint(3, 20)
        documents = [[[rng.randint(10, 99) for _ in range(rng.choice([0, 1, 2, 5, 30]))]
                      for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(0, 8))]
        packer = DocumentPacker(objective, special, max_seq_len)
        records = [r for doc in documents for r in packer.add(doc)] + list(packer.finish())
        real = [[s for s in doc if s] for doc in documents if any(doc)]
        if objective == "clm":
            assert [len(r) for r in records[:-1]] == [max_seq_len] * (len(records) - 1)
            assert [t for r in records for t in r] == [t for doc in real for t in [*sum(doc, []), special.eos]]
            continue
        assert all(3 <= len(r) <= max_seq_len and r[0] == special.cls and r[-1] == special.sep for r in records)
        assert all(r[1] != special.sep and r[-2] != special.sep for r in records)
        inner = [t for r in records for t in r[1:-1]]
        assert [t for t in inner if t != special.sep] == [t for doc in real for s in doc for t in s]
        # a separator for each document boundary that falls inside a record, never more
        assert inner.count(special.sep) <= max(len(real) - 1, 0)
        per_record = [[t for t in r[1:-1] if t != special.sep] for r in records]
        budget = max_seq_len - 2
        assert all(length > budget for length in record_cuts_inside_sentences(per_record, sum(real, []), budget))


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


@pytest.mark.parametrize("objective", ["mlm", "clm", "sop"])
def test_same_shards_and_manifest_for_any_num_workers(objective, tmp_path, tokenizer_dir):
    write_corpus(tmp_path / "a.txt", random.Random(4), 60)
    write_corpus(tmp_path / "b.txt", random.Random(5), 60)
    outputs = []
    runs = [(1, 2000), (2, 2000)] + ([(1, 1 << 20)] if objective != "sop" else [])  # mlm/clm: any chunk size too
    for workers, chunk_bytes in runs:
        out = tmp_path / f"out{workers}-{chunk_bytes}"
        prepare_train_data(
            str(tmp_path / "*.txt"), tokenizer_dir, str(out), objective, 32, shard_size=50,
            num_workers=workers, seed=7, chunk_bytes=chunk_bytes, progress=False,
        )  # fmt: skip
        outputs.append({name: (out / name).read_text() for name in sorted(os.listdir(out))})
    assert len(outputs[0]) > 3 and "manifest.json" in outputs[0]
    assert all(output == outputs[0] for output in outputs[1:])


def test_manifest_counts_what_the_shards_hold_and_is_replaced_with_overwrite(tmp_path, tokenizer_dir, tokenizer):
    write_corpus(tmp_path / "a.txt", random.Random(6), 80)
    out = tmp_path / "out"
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(out), "mlm", 24, shard_size=40, progress=False)
    first = read_manifest(str(out))
    assert (first.objective, first.max_seq_len, first.vocab_size) == ("mlm", 24, len(tokenizer))
    assert first.tokenizer_path == tokenizer_dir and first.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer_dir)
    assert [s.file for s in first.shards] == shard_names(out) and len(first.shards) > 2

    def check_counts(manifest):
        for shard in manifest.shards:
            lines = (out / shard.file).read_text(encoding="utf-8").splitlines()
            assert shard.records == len(lines) and shard.bytes == os.path.getsize(out / shard.file)
            assert shard.tokens == sum(len(json.loads(line)["input_ids"]) for line in lines)

    check_counts(first)
    assert first.padding_fraction == pytest.approx(1 - first.tokens / (first.records * 24))
    # fewer, longer clm records: the old shards beyond the new ones must go, the manifest must follow
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(out), "clm", 64, shard_size=40, overwrite=True,
                       progress=False)
    second = read_manifest(str(out))
    assert (second.objective, second.max_seq_len) == ("clm", 64) and len(second.shards) < len(first.shards)
    assert [s.file for s in second.shards] == shard_names(out)
    check_counts(second)


def test_a_failed_run_leaves_no_manifest_and_no_shards(tmp_path, tokenizer_dir):
    write_corpus(tmp_path / "a.txt", random.Random(7), 20)
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32, progress=False)
    assert read_manifest(str(tmp_path / "out")) is not None
    (tmp_path / "b.txt").write_bytes(b"Kato mira.\n\nvo \xff xu.\n")
    with pytest.raises(UserError, match=r"b\.txt:3: not valid UTF-8"):
        prepare_train_data(f"{tmp_path}/a.txt,{tmp_path}/b.txt", tokenizer_dir, str(tmp_path / "out"), "mlm", 32,
                           overwrite=True, progress=False)
    assert os.listdir(tmp_path / "out") == []  # the old manifest went first: it must not describe missing shards


def test_undecodable_line_is_reported_with_file_and_line(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("Kato mira.\n\nSu lo pe.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"Kato mira.\nSu lo.\n\nPe di ga.\nvo \xff\xfe xu.\nba.\n")
    with pytest.raises(UserError, match=r"b\.txt:5: not valid UTF-8.*convert"):  # raised in a pool worker
        prepare_train_data(
            str(tmp_path / "*.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32, num_workers=2, progress=False
        )
    assert not os.listdir(tmp_path / "out")  # no half-written shards left behind, no manifest


def test_user_mistakes_name_the_option(tmp_path, tokenizer_dir):
    (tmp_path / "a.txt").write_text("Kato mira.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--input nothing/\*\.txt: no such file"):
        prepare_train_data("nothing/*.txt", tokenizer_dir, str(tmp_path / "out"), "mlm", 32)
    with pytest.raises(UserError, match="--objective must be one of mlm, sop, clm") as info:
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "nsp", 32, shard_size=0,
                           chunk_bytes=-1)
    assert "--shard_size" in str(info.value) and "--chunk_bytes" in str(info.value)  # every problem at once
    with pytest.raises(UserError, match="--max_seq_len must be an integer >= 5 for sop"):
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "sop", 4)
    with pytest.raises(UserError, match="does not exist"):
        prepare_train_data(str(tmp_path / "a.txt"), str(tmp_path / "no-tokenizer"), str(tmp_path / "out"), "mlm", 32)

    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32, progress=False)
    with pytest.raises(UserError, match=r"already holds shards \(part-00000.jsonl, manifest.json\).*--overwrite"):
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "clm", 32, progress=False)
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "clm", 32, overwrite=True, progress=False)
    assert read_records(tmp_path / "out")[0]["input_ids"][0] != 2  # replaced by clm records: no [CLS]


def test_command_line_prints_summary_with_padding_or_error(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_text("Kato mira su.\nLo pe di.\n\nGa vo xu.\n", encoding="utf-8")
    argv = ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer_dir, "--output_dir", str(tmp_path / "out")]
    main([*argv, "--objective", "clm", "--max_seq_len", "8", "--noprogress"])
    manifest = read_manifest(str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert f"wrote {manifest.records} clm records ({manifest.tokens} tokens)" in out
    assert 0 < manifest.padding_fraction < 1 and f"padding {manifest.padding_fraction:.2%} of 8-token records" in out
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output_dir") and "Traceback" not in err


def test_input_without_text_is_one_error_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n\n", encoding="utf-8")
    argv = ["--input", f"{tmp_path}/empty.txt,{tmp_path}/blank.txt", "--tokenizer", tokenizer_dir]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --input has no text")
    assert str(tmp_path / "empty.txt") in err[0] and str(tmp_path / "blank.txt") in err[0]
    assert not (tmp_path / "out").exists()
    # over an old folder with --overwrite: the old shards and manifest are kept, not replaced by nothing
    (tmp_path / "a.txt").write_text("Kato mira su.\n", encoding="utf-8")
    prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "old"), "mlm", 16, progress=False)
    before = sorted(os.listdir(tmp_path / "old"))
    with pytest.raises(SystemExit):
        main([*argv, "--output_dir", str(tmp_path / "old"), "--overwrite"])
    assert sorted(os.listdir(tmp_path / "old")) == before == ["manifest.json", "part-00000.jsonl"]


def test_sop_text_too_short_for_a_pair_is_an_error(tmp_path, tokenizer_dir, tokenizer):
    words = [w for w in SYLLABLES if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    assert words, "the test needs a one-token word"
    (tmp_path / "a.txt").write_text(f"{words[0]}\n\n{words[-1]}\n", encoding="utf-8")
    with pytest.raises(UserError, match="gave no sop record.*at least 2 tokens"):
        prepare_train_data(str(tmp_path / "a.txt"), tokenizer_dir, str(tmp_path / "out"), "sop", 16, progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_home_directory_in_input_for_prepare_and_train_tokenizer(tmp_path, tokenizer_dir, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    write_corpus(home / "x.txt", random.Random(8), 60)
    monkeypatch.setenv("HOME", str(home))
    main(["--input", "~/x.txt", "--tokenizer", tokenizer_dir, "--output_dir", str(tmp_path / "out"), "--noprogress"])
    assert "mlm records" in capsys.readouterr().out and read_records(tmp_path / "out")
    tokenizer_main(["--input", "~/x.txt", "--output_dir", str(tmp_path / "tok"), "--vocab_size", "400"])
    assert "Saved the tokenizer to" in capsys.readouterr().out
    assert len(load_tokenizer(str(tmp_path / "tok"))) == 400


def test_command_line_takes_a_glob_the_shell_expanded(tmp_path, tokenizer_dir, tokenizer, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"Kato {name} mira su.\nLo pe di.\n", encoding="utf-8")
    main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--tokenizer", tokenizer_dir,
          "--output_dir", str(tmp_path / "out"), "--num_workers", "1"])
    assert "mlm records" in capsys.readouterr().out
    (record,) = read_records(tmp_path / "out")  # both files were read; their documents share one record
    files = [doc_tokens(tokenizer, [[f"Kato {name} mira su.", "Lo pe di."]])[0] for name in ("a", "b")]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert record["input_ids"] == [cls, *sum(files[0], []), sep, *sum(files[1], []), sep]


def test_file_patterns_one_rule_for_every_tool(tmp_path, monkeypatch):
    from convmodel.file_patterns import expand_file_patterns

    for name in ("b.txt", "a.txt", "notes[1].txt"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("x\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    a, b, notes, c = (str(tmp_path / n) for n in ("a.txt", "b.txt", "notes[1].txt", "sub/c.txt"))
    assert expand_file_patterns("--input", "~/?.txt") == [a, b]  # ~ expanded, matches sorted
    assert expand_file_patterns("--input", f"'{b}', ~/a.txt,{b}") == [b, a]  # in order, quotes stripped, once each
    # a name with glob characters that is a file is that file; ** reaches any depth
    assert expand_file_patterns("--input", [notes, f"{tmp_path}/**/*.txt"]) == [notes, a, b, c]
    assert expand_file_patterns("--input", f"[{a},{b}]") == [a, b]  # a list fire left as a string
    with pytest.raises(UserError, match=r"^data.train_files ~/nothing\*.jsonl: no such file. Make shards"):
        expand_file_patterns("data.train_files", "~/nothing*.jsonl", "Make shards first.")
    with pytest.raises(UserError, match=r"--input .*sub: no such file"):  # a directory is not a file
        expand_file_patterns("--input", str(tmp_path / "sub"))
    with pytest.raises(UserError, match="--input is empty"):
        expand_file_patterns("--input", " , ")


@pytest.mark.timeout(60)
def test_a_failing_pool_stops_when_the_host_process_handles_sigterm(tmp_path, tokenizer_dir):
    """In a process whose SIGTERM handler only sets a flag (a trainer's), the workers still stop."""
    import signal

    (tmp_path / "a.txt").write_text("Kato mira.\n\nSu lo pe.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"Kato mira.\n\nvo \xff\xfe xu.\n")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with pytest.raises(UserError, match=r"b\.txt:3: not valid UTF-8"):
            prepare_train_data(str(tmp_path / "*.txt"), tokenizer_dir, str(tmp_path / "out"), "mlm", 32,
                               num_workers=2, chunk_bytes=1, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
