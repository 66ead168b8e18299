"""Label sets: read from the training split only, and every dev/test label checked against it.

A label the model never saw in training has no output unit, so it cannot be predicted and an
evaluation that counted it would be silently wrong; it is an error naming its file:line.
"""

from convmodel.errors import UserError
from convmodel.finetune.readers import TaggedSentence, TextExample


def continuation_tag(tag: str) -> str:
    """The tag of a word's later sub-tokens with label_all_subtokens: B-X becomes I-X (as run_ner.py)."""
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def label_names(task: str, train: list, label_all_subtokens: bool = False) -> list[str] | None:
    """The training split's labels, sorted ("O" first for tags); None for regression (one number)."""
    if task == "regression":
        return None
    if task == "token_classification":
        found = {tag for sentence in train for tag in sentence.tags}
        if label_all_subtokens:  # an entity seen only as one-word B-X still needs I-X for its sub-tokens
            found |= {continuation_tag(tag) for tag in found}
    else:
        found = {example.label for example in train}
    return sorted(found, key=lambda name: (name != "O", name))


def check_known_labels(examples: list, labels: list[str] | None, option: str, train_file: str) -> None:
    """UserError at the first example whose label is not among the training split's `labels`."""
    if labels is None:
        return
    known = set(labels)
    for example in examples:
        if isinstance(example, TaggedSentence):
            for index, tag in enumerate(example.tags):
                if tag not in known:
                    _unknown(example.token_where(index), tag, labels, option, train_file)
        elif isinstance(example, TextExample) and example.label not in known:
            _unknown(example.where, example.label, labels, option, train_file)


def _unknown(where: str, label: str, labels: list[str], option: str, train_file: str) -> None:
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    raise UserError(f"{where}: label {label!r} ({option}) never occurs in the training file {train_file} "
                    f"(its labels: {shown}); fix the label, or add training examples with it")
