"""data/make_sample_corpus.py: English prose from the Python install, in the corpus text format."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data" / "make_sample_corpus.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_sample_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DOCSTRING = '''Return the :func:`os.path.join` of *parts*, or ``None``.

This is the first sentence of a paragraph that
spans two lines. And this is its second sentence, e.g. a short one.

>>> join("a", "b")
'a/b'

Example::

    value = join(x, y)
    print(value)

Args:
    parts: the pieces to join together.

.. versionadded:: 3.2
   Something about versions.

- The first item of a list that has words.
- The second item of a list that has words.
'''


def test_cleaner_keeps_sentences_and_drops_code_and_markup():
    sentences = load_script().prose_sentences(DOCSTRING)
    assert sentences == [
        "Return the os.path.join of parts, or None.",
        "This is the first sentence of a paragraph that spans two lines.",
        "And this is its second sentence, e.g. a short one.",
        "The first item of a list that has words.",
        "The second item of a list that has words.",
    ]


def test_script_writes_three_splits_of_documents(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--target_mb", "0.5", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    total = 0
    for split in ("train", "valid", "test"):
        text = (tmp_path / f"{split}.txt").read_text(encoding="utf-8")
        assert f"{split}.txt" in result.stdout
        documents = text.strip("\n").split("\n\n")
        assert len(documents) >= 10, split
        for document in documents:
            lines = document.split("\n")
            assert all(line and line == line.strip() for line in lines), document
            assert not any(line.startswith((">>>", "...", "..")) for line in lines), document
        total += len(text.encode("utf-8"))
    assert 0.5e6 <= total < 0.6e6  # stops at the target (plus one document)
    train = (tmp_path / "train.txt").read_text(encoding="utf-8")
    assert len(train) > 10 * len((tmp_path / "valid.txt").read_text(encoding="utf-8"))
