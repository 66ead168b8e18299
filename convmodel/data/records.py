"""Token ids of documents -> training records, for mlm, clm and sop; pure functions, no files.

mlm and clm (DocumentPacker): the documents form one token stream that is cut into records of
exactly the budget, so a record is padded only at the very end of the input. Sentences are
split across records where the room runs out: records full of text train on more tokens per
step, and on the sample corpus packing whole sentences left 9.9% of a 128-token batch as
padding (2.6% at 512). Documents share records, as in RoBERTa's FULL-SENTENCES (within noise
of stopping at document ends, DOC-SENTENCES, and it wastes no positions on short documents):

  mlm: [CLS] ... [SEP] per record; [SEP] also between two documents sharing a record. A
       separator never opens or closes a record: where it would take a record's last free
       position, that record ends one token short instead.
  clm: EOS after each document, GPT-2 style; no [CLS]. Every record but the last holds exactly
       max_seq_len tokens, and the records joined give the token stream back.

sop (sop_records): ALBERT sentence-order pairs [CLS] A [SEP] B [SEP], A and B consecutive spans
of one document, swapped with p=0.5; a pair never crosses a document end, so these are not
packed into one stream.
"""

import random
from collections.abc import Iterable, Iterator, Sequence

from convmodel.special_ids import SpecialIds


class DocumentPacker:
    """Cuts documents (token ids without specials) into mlm or clm records, carrying the remainder.

    The packer keeps the unfinished record between calls, so feeding the documents chunk by
    chunk in input order gives the same records as feeding them all at once, whatever the
    chunks were.
    """

    def __init__(self, objective: str, special: SpecialIds, max_seq_len: int):
        if objective == "mlm":
            self.budget, self.separator, self.doc_end = max_seq_len - 2, special.sep, None
            self.prefix, self.suffix = [special.cls], [special.sep]
        elif objective == "clm":
            self.budget, self.separator, self.doc_end = max_seq_len, None, special.eos
            self.prefix, self.suffix = [], []
        else:
            raise ValueError(f"DocumentPacker packs mlm or clm, not {objective!r}")
        self._current: list[int] = []

    def add(self, document: Sequence[int]) -> Iterator[list[int]]:
        """The records (input_ids) this document completes; an empty document adds nothing."""
        if not document:
            return
        current = self._current
        if current and self.separator is not None:
            if len(current) + 1 < self.budget:
                current.append(self.separator)
            else:  # the separator would close the record: end it one short
                yield self._record(current)
                current = self._current = []
        tokens = list(document) if self.doc_end is None else [*document, self.doc_end]
        position = 0
        while position < len(tokens):
            take = min(self.budget - len(current), len(tokens) - position)
            current.extend(tokens[position : position + take])
            position += take
            if len(current) == self.budget:
                yield self._record(current)
                current = self._current = []

    def finish(self) -> Iterator[list[int]]:
        """The last, shorter record, if any text is left over."""
        if self._current:
            yield self._record(self._current)
            self._current = []

    def _record(self, content: list[int]) -> list[int]:
        return [*self.prefix, *content, *self.suffix]


def _split_pair(chunk: list[list[int]], rng: random.Random) -> tuple[list[int], list[int]] | None:
    """Segments A and B of a chunk in document order: cut at a random sentence boundary, or inside
    the only sentence; None when a lone sentence has fewer than two tokens."""
    if len(chunk) >= 2:
        a_end = rng.randint(1, len(chunk) - 1)
        return [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s]
    tokens = chunk[0]
    if len(tokens) < 2:
        return None
    cut = rng.randint(1, len(tokens) - 1)
    return tokens[:cut], tokens[cut:]


def _truncate_pair(a: list[int], b: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Trim the longer segment from its outer end (A's front, B's back) until both fit `limit`.

    Keeping the A|B junction intact keeps the sentence-order signal: the in-order concatenation
    is always a contiguous span of the document.
    """
    cut_a = cut_b = 0
    while len(a) - cut_a + len(b) - cut_b > limit:
        if len(a) - cut_a > len(b) - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return a[cut_a:], b[: len(b) - cut_b]


def sop_records(
    documents: Iterable[list[list[int]]], special: SpecialIds, max_seq_len: int, rng: random.Random,
    short_seq_prob: float,
) -> Iterator[dict]:
    """ALBERT sentence-order pairs: A and B are consecutive spans of one document, swapped with p=0.5.

    Sentences are accumulated into a chunk up to a target length (max_seq_len - 3, or with
    probability `short_seq_prob` a random shorter one), the chunk is cut into A and B, and the pair
    is trimmed to fit. B is always the text that follows A, never a copy of it.
    """
    limit = max_seq_len - 3
    for doc in documents:
        sentences = [s[i : i + limit] for s in doc for i in range(0, len(s), limit)]
        target = limit if rng.random() >= short_seq_prob else rng.randint(2, limit)
        chunk: list[list[int]] = []
        length = 0
        for i, sentence in enumerate(sentences):
            chunk.append(sentence)
            length += len(sentence)
            if i < len(sentences) - 1 and length < target:
                continue
            pair = _split_pair(chunk, rng)
            chunk, length = [], 0
            target = limit if rng.random() >= short_seq_prob else rng.randint(2, limit)
            if pair is None:
                continue
            a, b = _truncate_pair(*pair, limit)
            swapped = rng.random() < 0.5
            if swapped:
                a, b = b, a
            yield {
                "input_ids": [special.cls, *a, special.sep, *b, special.sep],
                "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                "sentence_order_label": int(swapped),
            }
