"""Session fixtures: real English text and a tokenizer trained on it, built once per test run; and each test
leaves this process's signal handlers as it found them."""

import signal

import pytest


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict[str, str]:
    """Real English in the corpus text format: {"train"|"valid"|"test": path to a .txt file}.

    The text is the Python language reference that ships with Python (pydoc_data.topics):
    one paragraph a line, a blank line between topics (documents); ~0.45 MB, ~80 documents.
    """
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = [" ".join(p.split()) for p in topics[name].split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p.split()) >= 4]
        if paragraphs:
            documents.append("\n".join(paragraphs))
    splits = {"valid": documents[0::20], "test": documents[1::20]}
    splits["train"] = [doc for i, doc in enumerate(documents) if i % 20 > 1]
    folder = tmp_path_factory.mktemp("corpus")
    paths = {}
    for split, docs in splits.items():
        path = folder / f"{split}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        paths[split] = str(path)
    return paths


@pytest.fixture(scope="session")
def tokenizer_dir(text_corpus, tmp_path_factory) -> str:
    """A unigram tokenizer folder (vocab 1000, the fixed special ids) trained on text_corpus."""
    from convmodel.tokenization import train_tokenizer

    return train_tokenizer(text_corpus["train"], str(tmp_path_factory.mktemp("tokenizer")), vocab_size=1000)


# Python's own, also when pytest started as a background job of a non-interactive shell (`cmd &` in a
# script), which starts with SIGINT ignored: the Ctrl-C tests' trainers would inherit that and never stop
DEFAULT_SIGNAL_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def put_back_signal_handlers() -> None:
    for number, handler in DEFAULT_SIGNAL_HANDLERS.items():
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


@pytest.fixture(autouse=True)
def signal_handlers_put_back():
    """Each test starts and ends with Python's default handlers for SIGINT and SIGTERM.

    Starting a hivemind averager in this process leaves SIGINT ignored (hivemind sets SIG_IGN before it
    forks and never restores it); every trainer a later test starts then inherited "ignore" and did not
    stop on its Ctrl-C (test_a_signal_saves_last_ckpt_and_prints_the_resume_command hung). Before each test
    too: a module-scoped fixture runs before its tests' own, and pytest may have started with "ignore"."""
    put_back_signal_handlers()
    yield
    put_back_signal_handlers()
