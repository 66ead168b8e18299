"""JsonlStream: every line read once per epoch across ranks x workers, seeded shuffle, clear errors."""

import json
import random
from collections import Counter
from itertools import islice

import pytest
from torch.utils.data import DataLoader

from convmodel.data.jsonl_stream import JsonlStream
from convmodel.data.record_decoding import RecordDecoder
from convmodel.data.shard_counts import count_records
from convmodel.data.shard_plan import file_order, reader_range, reader_segments
from convmodel.errors import UserError, user_message

LINES_PER_FILE = (7, 0, 10, 5)  # an empty shard included


def write_shards(root, lines_per_file=LINES_PER_FILE) -> list[str]:
    """Shards whose record k (global line k) has input_ids [2, 100 + k, 3]."""
    paths, k = [], 0
    for n, count in enumerate(lines_per_file):
        path = root / f"part-{n:05d}.jsonl"
        with open(path, "w") as f:
            for _ in range(count):
                f.write(json.dumps({"input_ids": [2, 100 + k, 3]}) + "\n")
                k += 1
        paths.append(str(path))
    return paths


def sample_ids(samples: list[dict]) -> list[tuple[int, int]]:
    """Collate to (index, the id the record was written with): proves index == global line."""
    return [(s["index"], s["input_ids"][1] - 100) for s in samples]


def read_all(dataset, num_workers: int) -> list[tuple[int, int]]:
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=sample_ids)
    return [pair for batch in loader for pair in batch]


@pytest.mark.parametrize("shuffle_buffer_size", [0, 4])
def test_two_ranks_with_two_workers_read_every_line_once(tmp_path, shuffle_buffer_size):
    files = write_shards(tmp_path)
    seen = []
    for rank in (0, 1):
        stream = JsonlStream(files, shuffle_buffer_size=shuffle_buffer_size, seed=3, rank=rank, world_size=2)
        got = read_all(stream, num_workers=2)
        assert got, f"rank {rank} read nothing"
        seen.extend(got)
    assert all(index == k for index, k in seen)
    assert Counter(index for index, _ in seen) == Counter(range(sum(LINES_PER_FILE)))


def test_each_reader_reads_one_contiguous_range(tmp_path):
    files = write_shards(tmp_path)  # 22 records, 4 readers: 6, 6, 5, 5
    ranges = []
    for reader in range(4):
        got = sorted(s["index"] for s in JsonlStream(files, rank=reader, world_size=4))
        assert got == list(range(got[0], got[-1] + 1)), f"reader {reader} read {got}"
        ranges.append(got)
    assert [len(r) for r in ranges] == [6, 6, 5, 5]
    assert [i for r in ranges for i in r] == list(range(sum(LINES_PER_FILE)))


def test_shard_order_is_drawn_per_epoch_and_each_record_read_once(tmp_path):
    files = write_shards(tmp_path, (5, 3, 0, 6, 4, 2, 7, 1))

    def epoch(e: int) -> list[list[int]]:
        readers = []
        for rank in (0, 1, 2):
            stream = JsonlStream(files, rank=rank, world_size=3, seed=5, shuffle_shards=True)
            stream.set_epoch(e)
            readers.append([s["index"] for s in stream])
        return readers

    first, second = epoch(0), epoch(1)
    for readers in (first, second):
        assert sorted(i for r in readers for i in r) == list(range(28))
        assert sorted(len(r) for r in readers) == [9, 9, 10]
    assert first == epoch(0) and first != second
    assert [i for r in first for i in r] != list(range(28)), "epoch 0 kept the sorted shard order"


def test_drop_remainder_gives_every_reader_the_same_count(tmp_path):
    files = write_shards(tmp_path)  # 22 lines, 4 readers: 5 each, 2 left out
    counts = []
    for rank in (0, 1):
        for worker in (0, 1):
            stream = JsonlStream(files, rank=rank * 2 + worker, world_size=4, drop_remainder=True)
            counts.append(len(list(stream)))
    assert counts == [5, 5, 5, 5]


def test_shuffle_is_seeded_and_changes_with_the_epoch(tmp_path):
    files = write_shards(tmp_path)

    def order(seed: int, epoch: int) -> list[int]:
        stream = JsonlStream(files, shuffle_buffer_size=8, seed=seed)
        stream.set_epoch(epoch)
        return [s["index"] for s in stream]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == list(range(sum(LINES_PER_FILE)))
    assert order(1, 0) != list(range(sum(LINES_PER_FILE)))
    unshuffled = JsonlStream(files, shuffle_buffer_size=1, seed=1)
    assert [s["index"] for s in unshuffled] == list(range(sum(LINES_PER_FILE)))


def test_long_records_are_cut_keeping_the_closing_token(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"input_ids": [2, 10, 11, 12, 13, 3]}) + "\n" + json.dumps({"input_ids": [10, 11, 12, 13]}))
    cut = list(JsonlStream([str(path)], max_seq_len=4, end_token_id=3))
    assert [s["input_ids"] for s in cut] == [[2, 10, 11, 3], [10, 11, 12, 13]]
    assert list(JsonlStream([str(path)], max_seq_len=3))[1]["input_ids"] == [10, 11, 12]


SOP = ("input_ids", "token_type_ids", "sentence_order_label")


def sop_record(a: list[int], b: list[int], label: int) -> dict:
    return {"input_ids": [2, *a, 3, *b, 3], "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
            "sentence_order_label": label}


def test_long_sop_records_keep_both_sides_of_the_junction(tmp_path):
    rng = random.Random(0)
    records = []
    for _ in range(200):
        a = [rng.randrange(10, 100) for _ in range(rng.randint(1, 20))]
        b = [rng.randrange(100, 200) for _ in range(rng.randint(1, 20))]
        records.append((a, b, rng.randint(0, 1), rng.randint(5, 30)))
    for k, (a, b, label, n) in enumerate(records):
        path = tmp_path / f"{k}.jsonl"
        path.write_text(json.dumps(sop_record(a, b, label)) + "\n")
        (sample,) = JsonlStream([str(path)], max_seq_len=n, required_fields=SOP, end_token_id=3)
        ids, types = sample["input_ids"], sample["token_type_ids"]
        assert len(ids) == len(types) == min(n, len(a) + len(b) + 3)
        keep_a, keep_b = types.count(0) - 2, types.count(1) - 1
        assert keep_a >= 1 and keep_b >= 1 and types == [0] * (keep_a + 2) + [1] * (keep_b + 1)
        # A's tail and B's head: the tokens on both sides of the junction
        assert ids == [2, *a[len(a) - keep_a:], 3, *b[:keep_b], 3]
        assert sample["sentence_order_label"] == label


def test_sop_record_that_cannot_be_cut_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    lone = {"input_ids": [2, 10, 11, 12, 13, 3], "token_type_ids": [0] * 6, "sentence_order_label": 0}
    path.write_text(json.dumps(sop_record([10], [11], 0)) + "\n" + json.dumps(lone) + "\n")
    with pytest.raises(UserError, match=r"a.jsonl:2: a sentence-order record longer than data.max_seq_len=5 cannot "
                                        r"be cut: it is not \[CLS\] A \[SEP\] B \[SEP\].*--max_seq_len 5"):
        list(JsonlStream([str(path)], max_seq_len=5, required_fields=SOP))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input_ids": [2, 5, 3]', "not a valid JSON record"),
        ("[2, 5, 3]", "not a JSON object"),
        ('{"ids": [2, 5, 3]}', "record has no 'input_ids'"),
        ('{"input_ids": [2, "x", 3]}', "input_ids must be a non-empty list of integers"),
        ('{"input_ids": [2, 999, 3]}', "token id 999 is outside the tokenizer's vocabulary of 500"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    files = write_shards(tmp_path, (3, 4))
    with open(files[1], "a") as f:
        f.write(line + "\n")
    stream = JsonlStream(files, vocab_size=500)
    with pytest.raises(UserError, match=f"part-00001.jsonl:5: {message}.*prepare_train_data"):
        list(stream)


def test_bad_line_error_survives_dataloader_workers(tmp_path):
    files = write_shards(tmp_path, (3, 4))
    with open(files[1], "a") as f:
        f.write("not json\n")
    with pytest.raises(UserError) as info:
        read_all(JsonlStream(files), num_workers=2)
    message = user_message(info.value)
    assert message.startswith(f"{files[1]}:5: not a valid JSON record") and "Traceback" not in message


def test_sop_stream_requires_sop_fields(tmp_path):
    files = write_shards(tmp_path, (2,))
    stream = JsonlStream(files, required_fields=("input_ids", "token_type_ids", "sentence_order_label"))
    with pytest.raises(UserError, match=r"part-00000.jsonl:1: record has no 'token_type_ids'.*--objective"):
        next(iter(stream))


@pytest.mark.parametrize("text", ['{"input_ids": [2, 5, 3]}\n\n{"input_ids": [2, 6, 3]}\n',
                                  '{"input_ids": [2, 5, 3]}\n  \r\n{"input_ids": [2, 6, 3]}\n',
                                  '{"input_ids": [2, 5, 3]}\n \t'])
def test_a_blank_line_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "part-00000.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=r"part-00000.jsonl:2: blank line; .*delete the line"):
        count_records(str(path))  # while counting, before training
    with pytest.raises(UserError, match=r"part-00000.jsonl:2: blank line"):
        list(JsonlStream([str(path)]))  # and while reading shards that were not counted


def test_counting_finds_every_line_across_blocks(tmp_path, monkeypatch):
    import convmodel.data.shard_counts as shard_counts

    monkeypatch.setattr(shard_counts, "BLOCK", 7)  # lines cross block ends
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"input_ids": [2, *range(k), 3]}) for k in range(12)]
    path.write_text("\n".join(lines))  # no newline after the last line
    assert count_records(str(path)) == 12
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]))
    with pytest.raises(UserError, match=r"a.jsonl:6: blank line"):
        count_records(str(path))


@pytest.mark.parametrize("block", [1 << 20, 7])
def test_given_counts_read_the_same_as_counted(tmp_path, monkeypatch, block):
    import convmodel.data.jsonl_stream as jsonl_stream

    monkeypatch.setattr(jsonl_stream, "BLOCK", block)  # 7: a reader's first line is found across blocks
    files = write_shards(tmp_path, (9, 0, 4, 13, 2))
    for readers in (1, 3, 7):
        for reader in range(readers):
            counted = JsonlStream(files, rank=reader, world_size=readers, shuffle_shards=True, seed=1)
            given = JsonlStream(files, rank=reader, world_size=readers, shuffle_shards=True, seed=1,
                                counts=[9, 0, 4, 13, 2])
            assert sample_ids(list(counted)) == sample_ids(list(given))
            assert all(i == k for i, k in sample_ids(list(given)))  # index == the line it came from


def test_a_shard_shorter_than_its_count_is_reported(tmp_path):
    files = write_shards(tmp_path, (3, 4))
    stream = JsonlStream(files, rank=1, world_size=2, counts=[3, 6])  # a stale manifest: 6, the file has 4
    with pytest.raises(UserError, match=r"part-00001.jsonl: expected 6 records but the file ends after 4"):
        list(stream)


def test_reader_ranges_cover_every_record_once_in_few_pieces():
    rng = random.Random(1)
    for _ in range(300):
        counts = [rng.choice([0, rng.randint(1, 50)]) for _ in range(rng.randint(1, 12))]
        readers, drop = rng.randint(1, 8), rng.random() < 0.5
        order = file_order(len(counts), rng.randint(0, 9), rng.randint(0, 9), shuffle=True)
        assert sorted(order) == list(range(len(counts)))
        seen, sizes = Counter(), []
        for reader in range(readers):
            start, stop = reader_range(sum(counts), reader, readers, drop)
            segments = reader_segments(counts, order, start, stop)
            sizes.append(sum(s.stop - s.first for s in segments))
            seen.update((s.file_no, line) for s in segments for line in range(s.first, s.stop))
            partial = [s for s in segments if (s.first, s.stop) != (0, counts[s.file_no])]
            assert len(partial) <= 2  # whole shards, but for the ends of the range
        assert max(seen.values(), default=1) == 1
        assert max(sizes) - min(sizes) <= (0 if drop else 1)
        assert sum(counts) - len(seen) == (sum(counts) % readers if drop else 0)


def test_fast_decoding_agrees_with_the_reference_check(tmp_path):
    rng = random.Random(2)
    records = [sop_record([rng.randrange(5, 50) for _ in range(rng.randint(1, 9))],
                         [rng.randrange(5, 50) for _ in range(rng.randint(1, 9))], rng.randint(0, 1)) for _ in range(50)]
    decoder = RecordDecoder(SOP, vocab_size=50, max_seq_len=None, end_token_id=3)
    for k, record in enumerate(records):
        line = json.dumps(record).encode()
        assert decoder(line, "a.jsonl", k + 1, k) == {**decoder.reference_check(line, "a.jsonl", k + 1), "index": k}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"input_ids": [2, 5, 3], "token_type_ids": [0, 0], "sentence_order_label": 0}, "token_type_ids must hold"),
        ({"input_ids": [2, 5, 3], "token_type_ids": [0, 2, 1], "sentence_order_label": 0}, "token_type_ids must hold"),
        ({"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 1], "sentence_order_label": 2}, "sentence_order_label must"),
        ({"input_ids": [2, -5, 3], "token_type_ids": [0, 0, 1], "sentence_order_label": 0}, "token id -5 is outside"),
    ],
)
def test_bad_sop_fields_name_file_and_line(tmp_path, record, message):
    path = tmp_path / "part-00000.jsonl"
    path.write_text(json.dumps(sop_record([5], [6], 1)) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"part-00000.jsonl:2: {message}"):
        list(JsonlStream([str(path)], required_fields=SOP, vocab_size=50))


def test_word_ids_pass_through_and_are_cut_with_the_ids(tmp_path):
    path = tmp_path / "part-00000.jsonl"
    records = [{"input_ids": [2, 10, 11, 12, 13, 3], "word_ids": [None, 0, 0, 1, 2, None]},
               {"input_ids": [2, 10, 3]},
               {"input_ids": [2, 10, 3], "word_ids": [None, 0]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    first, second = islice(JsonlStream([str(path)], max_seq_len=4, end_token_id=3), 2)
    assert first["input_ids"] == [2, 10, 11, 3] and first["word_ids"] == [None, 0, 0, None]
    assert "word_ids" not in second
    with pytest.raises(UserError, match=r"part-00000.jsonl:3: word_ids must hold one word number \(or null\) per"):
        list(JsonlStream([str(path)]))
