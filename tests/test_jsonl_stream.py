"""JsonlStream: every line read once per epoch across ranks x workers, seeded shuffle, clear errors."""

import json
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from convmodel.data.jsonl_stream import JsonlStream
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


def test_each_reader_keeps_its_own_lines(tmp_path):
    files = write_shards(tmp_path)
    stream = JsonlStream(files, rank=1, world_size=2)
    got = [index for index, _ in read_all(stream, num_workers=2)]
    # readers 2 and 3 of 4 (rank 1's two workers); batches alternate between workers
    assert sorted(got) == [i for i in range(sum(LINES_PER_FILE)) if i % 4 in (2, 3)]


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
    record = {"input_ids": [2, 10, 11, 12, 13, 3], "token_type_ids": [0, 0, 0, 1, 1, 1], "sentence_order_label": 1}
    path.write_text(json.dumps(record) + "\n" + json.dumps({"input_ids": [10, 11, 12, 13]}) + "\n")
    cut = list(JsonlStream([str(path)], max_seq_len=4, end_token_id=3))
    assert cut[0]["input_ids"] == [2, 10, 11, 3] and cut[0]["token_type_ids"] == [0, 0, 0, 1]
    assert cut[0]["sentence_order_label"] == 1
    assert cut[1]["input_ids"] == [10, 11, 12, 13]
    assert list(JsonlStream([str(path)], max_seq_len=3))[1]["input_ids"] == [10, 11, 12]


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
