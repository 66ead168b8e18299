"""Where words begin in a batch of token ids: the units that whole-word masking chooses.

Why not only "▁": sentencepiece marks a piece that follows a space with "▁", so in English a word
is a "▁" piece and the pieces after it. Japanese and Chinese are written without spaces: only a
line's first piece has "▁", and a "word" would be the whole line (15% of lines masked end to end).

The rule, one table over the vocabulary plus a few context rules, all batched:

1. A piece starts a word when it begins with "▁".
2. A piece also starts a word when its first character is from a script written without spaces
   between words (Han, kana, Thai, Lao, Khmer, Myanmar, Tibetan, CJK punctuation and full-width
   forms). There the tokenizer's pieces are the only word-like units it knows: a unigram model's
   pieces on such text are frequent substrings (morphemes and words with a large vocabulary,
   single characters with a small one, which is how Google's Chinese BERT masked).
3. A byte-fallback piece that leads a 3- or 4-byte UTF-8 character (<0xE0> to <0xF4>) starts a
   word: a character outside the vocabulary, nearly always from those scripts (or an emoji). Its
   continuation bytes stay with it; 2-byte characters (accented Latin, Greek, Cyrillic) do not
   start a word, as their scripts have spaces.
4. In context: the first piece after a special token starts a word (a cut record can begin with a
   word's tail), and a piece right after a bare "▁" piece does not ("▁" "大" is one word:
   sentencepiece writes "▁" alone before a piece that has no "▁" form).
5. A word longer than `max_word_pieces` pieces is split into words of that many pieces, so no
   span is unbounded whatever the text (long numbers, URLs, scripts not listed in rule 2).

A record may carry its own boundaries in a `word_ids` field: a list with one entry per input id,
the word's number (any int; equal neighbours are one word) or null (or a negative number) for a
special token, as `BatchEncoding.word_ids()` gives them. A segmenter (MeCab, jieba) can write
it at preparation time. Where present it replaces rules 1 to 3 and the bare "▁" rule for that
sample; a word still starts after a special token, and rule 5 still holds.
"""

import re

import numpy as np
import torch
import torch.nn.functional as F

from convmodel.errors import UserError

WORD_START = "\u2581"  # sentencepiece's "▁": the piece begins a new word
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Unicode blocks of scripts written without spaces between words (rule 2).
SPACELESS_BLOCKS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3000, 0x30FF),  # CJK symbols and punctuation, Hiragana, Katakana
    (0x3100, 0x31FF),  # Bopomofo, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # full-width forms, half-width katakana
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def in_spaceless_script(character: str) -> bool:
    code = ord(character)
    return any(low <= code <= high for low, high in SPACELESS_BLOCKS)


def piece_starts_word(piece: str) -> bool:
    """Rules 1 to 3 for one vocabulary piece, without context."""
    if piece.startswith(WORD_START):
        return True
    byte = BYTE_PIECE.fullmatch(piece)
    if byte:
        return 0xE0 <= int(byte.group(1), 16) <= 0xF4
    return bool(piece) and in_spaceless_script(piece[0])


def word_start_table(tokenizer) -> torch.Tensor:
    """BoolTensor [vocab]: True where a piece starts a word by itself (rules 1 to 3) or is special."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id < len(table) and piece_starts_word(piece):
            table[token_id] = True
    table[list(tokenizer.all_special_ids)] = True
    return table


def bare_space_id(tokenizer) -> int | None:
    """The id of the piece that is "▁" alone, or None when the vocabulary has none."""
    return tokenizer.get_vocab().get(WORD_START)


def padded_word_ids(samples: list[dict], length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(LongTensor [B, T] of word numbers, -1 for none; BoolTensor [B]: the sample has word_ids).

    None when no sample has the field. A word_ids list whose length is not its input_ids' is a
    UserError naming the sample's line index.
    """
    if not any("word_ids" in s for s in samples):
        return None
    out = np.full((len(samples), length), -1, dtype=np.int64)
    given = np.zeros(len(samples), dtype=bool)
    for row, sample in enumerate(samples):
        words = sample.get("word_ids")
        if words is None:
            continue
        if len(words) != len(sample["input_ids"]):
            raise UserError(
                f"sample at line index {sample.get('index')}: word_ids has {len(words)} entries but input_ids "
                f"has {len(sample['input_ids'])}; write one word number (null for special tokens) per input id"
            )
        out[row, : len(words)] = [-1 if w is None else w for w in words]
        given[row] = True
    return torch.from_numpy(out), torch.from_numpy(given)


def word_starts(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    table: torch.Tensor,
    space_id: int | None,
    word_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """BoolTensor [B, T]: the maskable positions where a word begins (rules 1 to 4, or word_ids)."""
    previous_maskable = F.pad(maskable[:, :-1], (1, 0), value=False)
    starts = table.take(input_ids)
    if space_id is not None:
        starts &= F.pad(input_ids[:, :-1], (1, 0), value=-1) != space_id
    if word_ids is not None:
        numbers, given = word_ids
        changed = numbers != F.pad(numbers[:, :-1], (1, 0), value=-1)
        starts = torch.where(given[:, None], changed, starts)
    return maskable & (starts | ~previous_maskable)


def first_piece_of_word(starts: torch.Tensor, max_word_pieces: int) -> torch.Tensor:
    """LongTensor [B, T]: the position of the first piece of each position's word (rule 5 applied).

    Positions before a row's first start point at themselves or earlier; they are not maskable.
    """
    positions = torch.arange(starts.shape[1])
    last_start = (starts * positions).cummax(dim=1).values
    return last_start + (positions - last_start) // max_word_pieces * max_word_pieces
