"""The tokenizer: sentencepiece training, the Hugging Face folder it becomes, and its errors.

The English text is the Python language reference that ships with every Python
(`pydoc_data.topics`); the Japanese text is generated here from a few phrases.
"""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from convmodel.errors import UserError
from convmodel.tokenization import load_tokenizer, main, save_tokenizer, train_tokenizer

SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "<|endoftext|>": 5}
REPO = Path(__file__).resolve().parent.parent

# Text that is not in the training data: other words, odd whitespace, unseen characters.
HELD_OUT = [
    "The capital of France is Paris.",
    "A quick brown fox jumps over the lazy dog, twice!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines   and  runs of spaces",
    "Unseen characters: ☃, 😀, Ωmega and façade.",
    "Full-width ｔｅｘｔ and digits １２３ are NFKC-normalised.",
    "x = f(y) + 3 * [1, 2, 3]",
]


def write_english(path: Path) -> list[str]:
    """The pydoc topics as paragraphs, one a line, a blank line between topics."""
    from pydoc_data.topics import topics

    documents, lines = [], []
    for name in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in topics[name].split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 4]
        if paragraphs:
            documents.append("\n".join(paragraphs))
            lines.extend(paragraphs)
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return lines


def write_japanese(path: Path) -> list[str]:
    """Sentences of random subject + object + verb, written without spaces."""
    subjects = ["私は", "彼女は", "東京の学生は", "先生が", "猫が", "子供たちは", "日本の会社は", "友達と"]
    objects = ["新しい本を", "美味しいご飯を", "日本語の勉強を", "長い手紙を", "大きな家を", "古い映画を"]
    verbs = ["読みました。", "食べます。", "書いています。", "見たいです。", "作りました。", "買いました。"]
    rng = random.Random(0)
    lines = [rng.choice(subjects) + rng.choice(objects) + rng.choice(verbs) for _ in range(1500)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    return path, write_english(path)


@pytest.fixture(scope="module")
def unigram_dir(english, tmp_path_factory) -> str:
    output_dir = tmp_path_factory.mktemp("unigram")
    return train_tokenizer(str(english[0]), str(output_dir), vocab_size=1000)


def assert_same_as_sentencepiece(tokenizer_dir: str, texts: list[str]) -> None:
    """Same pieces and ids, except where two segmentations tie on score.

    Ties happen in long runs of one character ("==========" as "===", "=======" or the
    reverse); sentencepiece and tokenizers break them differently, with the same pieces.
    """
    texts = [text for text in texts if not re.search(r"(.)\1{5,}", text)]
    assert texts
    processor = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "spm.model"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in texts:
        expected = processor.encode(text, out_type=str)
        assert tokenizer.tokenize(text) == expected, text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == processor.encode(text), text


def test_folder_loads_as_a_plain_transformers_fast_tokenizer(unigram_dir):
    files = {path.name for path in Path(unigram_dir).iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "spm.model"} <= files

    config = json.loads((Path(unigram_dir) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "auto_map" not in config  # nothing of convmodel is needed to load it

    tokenizer = AutoTokenizer.from_pretrained(unigram_dir)
    assert tokenizer.is_fast
    assert type(tokenizer).__module__.startswith("transformers.")
    assert len(tokenizer) == 1000


def test_resaved_tokenizer_keeps_class_and_pieces(unigram_dir, tmp_path):
    # what an export does: load the tokenizer, save it into the model folder
    original = load_tokenizer(unigram_dir)
    save_tokenizer(original, str(tmp_path / "exported"))
    config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "local_files_only" not in config
    copy = AutoTokenizer.from_pretrained(tmp_path / "exported")
    for text in ["The capital of France is [MASK].", *HELD_OUT]:
        assert copy(text, "A second segment.") == original(text, "A second segment.")


def test_special_tokens_have_the_fixed_ids(unigram_dir):
    tokenizer = load_tokenizer(unigram_dir)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_IDS)) == list(SPECIAL_IDS.values())
    ids = (
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.mask_token_id,
        tokenizer.eos_token_id,
    )
    assert ids == (0, 1, 2, 3, 4, 5)
    processor = spm.SentencePieceProcessor(model_file=str(Path(unigram_dir) / "spm.model"))
    assert [processor.id_to_piece(i) for i in range(6)] == list(SPECIAL_IDS)


def test_mask_in_text_is_one_token_in_place_of_a_word(unigram_dir):
    tokenizer = load_tokenizer(unigram_dir)
    ids = tokenizer("The capital of France is [MASK].")["input_ids"]
    assert ids.count(tokenizer.mask_token_id) == 1
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # the mask takes the place of a word piece: no lone "▁" before it
    assert tokens[tokens.index("[MASK]") - 1] == "▁is"
    assert tokens[tokens.index("[MASK]") + 1] == "."


def test_same_pieces_as_sentencepiece(unigram_dir, english):
    texts = english[1][::10] + HELD_OUT
    assert_same_as_sentencepiece(unigram_dir, texts)


def test_single_and_pair_get_cls_and_sep(unigram_dir):
    tokenizer = load_tokenizer(unigram_dir)
    first = tokenizer("The loop ends.", add_special_tokens=False)["input_ids"]
    second = tokenizer("Names are bound.", add_special_tokens=False)["input_ids"]

    single = tokenizer("The loop ends.")
    assert single["input_ids"] == [2, *first, 3]

    pair = tokenizer("The loop ends.", "Names are bound.")
    assert pair["input_ids"] == [2, *first, 3, *second, 3]
    assert pair["token_type_ids"] == [0] * (len(first) + 2) + [1] * (len(second) + 1)


def test_decode_gives_back_the_text(unigram_dir):
    tokenizer = load_tokenizer(unigram_dir)
    for text in ["The for statement is used to iterate.", "Unseen: ☃ and 😀 stay readable.", "多くの文字"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids  # byte fallback, never [UNK]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bpe_model_matches_sentencepiece(english, tmp_path):
    output_dir = train_tokenizer([str(english[0])], str(tmp_path / "bpe"), vocab_size=1000, model_type="bpe")
    tokenizer = load_tokenizer(output_dir)
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE"
    assert tokenizer.mask_token_id == 4 and tokenizer.eos_token_id == 5
    assert_same_as_sentencepiece(output_dir, english[1][::10] + HELD_OUT)


def test_lowercase_folds_case_in_training_and_use(english, tmp_path):
    output_dir = train_tokenizer(str(english[0]), str(tmp_path / "lower"), vocab_size=800, lowercase=True)
    tokenizer = load_tokenizer(output_dir)
    assert tokenizer.tokenize("The FOR Statement") == tokenizer.tokenize("the for statement")
    vocab = tokenizer.get_vocab()
    assert not any(piece.isupper() for piece in vocab if piece not in SPECIAL_IDS and not piece.startswith("<0x"))
    assert tokenizer.decode(tokenizer("Hello World")["input_ids"], skip_special_tokens=True) == "hello world"
    assert_same_as_sentencepiece(output_dir, ["The FOR Statement, IN Python."] + HELD_OUT)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_japanese_without_spaces(tmp_path, model_type):
    corpus = tmp_path / "ja.txt"
    lines = write_japanese(corpus)
    output_dir = train_tokenizer(str(corpus), str(tmp_path / "ja"), vocab_size=350, model_type=model_type)
    tokenizer = load_tokenizer(output_dir)

    text = "猫が新しい本を読みました。彼女は古い映画を買いました。"
    tokens = tokenizer.tokenize(text)
    assert tokens[0].startswith("▁") and not any("▁" in token for token in tokens[1:])
    assert 1 < len(tokens) < len(text)  # pieces longer than one character were learned
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer("私は[MASK]を読みました。")["input_ids"].count(4) == 1
    assert_same_as_sentencepiece(output_dir, lines[:50] + [text, "東京タワー と 富士山"])


def test_input_as_list_comma_separated_and_glob(tmp_path):
    for name in ("a", "b"):
        write_japanese(tmp_path / f"{name}.txt")
    as_glob = train_tokenizer(str(tmp_path / "*.txt"), str(tmp_path / "glob"), vocab_size=350)
    as_commas = train_tokenizer(f"{tmp_path}/a.txt,{tmp_path}/b.txt", str(tmp_path / "commas"), vocab_size=350)
    as_list = train_tokenizer([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "list"), vocab_size=350)
    vocabularies = [load_tokenizer(path).get_vocab() for path in (as_glob, as_commas, as_list)]
    assert vocabularies[0] == vocabularies[1] == vocabularies[2]


def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("make_input", "kwargs", "message"),
    [
        (lambda tmp: str(tmp / "missing-*.txt"), {}, "missing-*.txt: no such file"),
        (lambda tmp: write(tmp / "blank.txt", b"\n  \n\n"), {}, "has no text"),
        (lambda tmp: write(tmp / "latin1.txt", b"fine\ncaf\xe9\n"), {}, "latin1.txt, line 2: not UTF-8"),
        (lambda tmp: write(tmp / "tiny.txt", b"hello world\nfoo bar baz\n"), {}, "--vocab_size 1000 is too large"),
        (lambda tmp: write(tmp / "ok.txt", b"hello world\n"), {"model_type": "wordpiece"}, "--model_type"),
        (lambda tmp: write(tmp / "ok.txt", b"hello world\n"), {"vocab_size": 100}, "--vocab_size 100 is too small"),
    ],
)
def test_bad_input_is_a_clear_user_error(tmp_path, make_input, kwargs, message):
    with pytest.raises(UserError) as error:
        train_tokenizer(make_input(tmp_path), str(tmp_path / "out"), **{"vocab_size": 1000, **kwargs})
    assert message in str(error.value)


def test_vocab_size_error_says_which_size_fits(tmp_path):
    corpus = write(tmp_path / "tiny.txt", b"hello world\nfoo bar baz\n")
    with pytest.raises(UserError) as error:
        train_tokenizer(corpus, str(tmp_path / "out"), vocab_size=1000)
    size = int(str(error.value).split("Use --vocab_size ")[1].split()[0])
    train_tokenizer(corpus, str(tmp_path / "out"), vocab_size=size)  # the advice works
    assert len(load_tokenizer(str(tmp_path / "out"))) == size


def test_unwritable_output_dir_is_a_user_error(tmp_path):
    corpus = write(tmp_path / "ok.txt", b"hello world\n")
    blocker = write(tmp_path / "a-file", b"")  # a file where a folder should be
    with pytest.raises(UserError, match="--output_dir .* is not writable"):
        train_tokenizer(corpus, str(Path(blocker) / "tokenizer"), vocab_size=300)


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a tokenizer folder"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text('{"added_tokens": [], "model": {}}')
    with pytest.raises(UserError, match="Cannot load the tokenizer in .*damaged"):
        load_tokenizer(str(tmp_path / "damaged"))


def test_command_line_accepts_an_expanded_glob(tmp_path, capsys):
    for name in ("a", "b"):
        write_japanese(tmp_path / f"{name}.txt")
    # what the shell passes for an unquoted --input '*.txt'
    main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--output_dir", str(tmp_path / "tok"), "--vocab_size", "350"])
    assert "Saved the tokenizer to" in capsys.readouterr().out
    assert len(load_tokenizer(str(tmp_path / "tok"))) == 350


def test_script_prints_user_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "trainer/train_tokenizer.py", "--input", str(tmp_path / "none.txt"), "--output_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --input {tmp_path / 'none.txt'}: no such file. Check the path (quote glob patterns)."
