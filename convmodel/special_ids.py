"""The tokenizer's vocabulary size and special token ids, read once, for the models and for prepare.

Two places need them: the LightningModules (pad/cls/sep/mask/eos/bos for the transformers
config, the vocabulary size for the embeddings) and prepare_train_data (cls/sep/eos to build
records, unk and the full special set to keep raw text from spelling a special token). One
type serves both, in a module without torch or Lightning so that prepare starts fast.
"""

from dataclasses import dataclass

from convmodel.errors import UserError


@dataclass(frozen=True)
class SpecialIds:
    """Vocabulary size and special token ids of a tokenizer (None where it has none)."""

    vocab_size: int
    pad: int | None
    unk: int | None
    cls: int | None
    sep: int | None
    mask: int | None
    eos: int | None
    bos: int | None
    all: frozenset[int]  # every special id, those above and any other the tokenizer declares

    def require(self, names: tuple[str, ...], tokenizer_path: str) -> None:
        """UserError naming the tokenizer when it lacks one of the `names` tokens."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise UserError(
                f"--tokenizer {tokenizer_path}: no {', '.join(m + '_token' for m in missing)}; "
                "make the tokenizer with trainer/train_tokenizer.py"
            )


def special_ids_of(tokenizer) -> SpecialIds:
    """The ids of a loaded Hugging Face tokenizer."""
    return SpecialIds(
        vocab_size=len(tokenizer),
        pad=tokenizer.pad_token_id,
        unk=tokenizer.unk_token_id,
        cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id,
        mask=tokenizer.mask_token_id,
        eos=tokenizer.eos_token_id,
        bos=tokenizer.bos_token_id,
        all=frozenset(tokenizer.all_special_ids),
    )


def read_special_ids(tokenizer_path: str) -> SpecialIds:
    """Load the tokenizer once and keep only its ids (the models need nothing else from it)."""
    from convmodel.tokenization import load_tokenizer

    return special_ids_of(load_tokenizer(tokenizer_path))
