"""Token ids of documents -> training records, for mlm, clm and sop; pure functions, no files.

mlm and clm (DocumentPacker): the documents form one stream that fills records up to the budget,
carried across chunks and files, so short documents share records and only a record's tail is
padding. Documents share records (RoBERTa's FULL-SENTENCES):

  mlm: [CLS] whole sentences [SEP]; [SEP] also between two documents sharing a record. A
       sentence that does not fit the room left starts the next record; only a sentence longer
       than a whole record is cut. Cutting every sentence where the room runs out fills records
       completely (padding 9.9% -> 0.04% at 128 tokens on the sample corpus) but cost the demo's
       bert-tiny most of what it learns beyond token frequencies: at 1200 steps it ended 0.56
       nats below val/unigram_baseline instead of 1.31, and 5.82 instead of 5.10 on the same
       whole-sentence validation records (docs/benchmarks.md).
  clm: EOS after each document, GPT-2 style; no [CLS]. The stream is cut exactly: every record
       but the last holds max_seq_len tokens, and the records joined give the stream back.

sop (sop_records): ALBERT sentence-order pairs [CLS] A [SEP] B [SEP], A and B consecutive spans
of one document, swapped with p=0.5; a pair never crosses a document end, so these are not
packed into one stream.
"""

import random
from collections.abc import Iterable, Iterator, Sequence

from convmodel.special_ids import SpecialIds


class DocumentPacker:
    """Cuts documents (lists of sentences of token ids, no specials) into mlm or clm records.

    The packer keeps the unfinished record between calls, so feeding the documents chunk by
    chunk in input order gives the same records as feeding them all at once, whatever the
    chunks were.
    """

    def __init__(self, objective: str, special: SpecialIds, max_seq_len: int):
        if objective == "mlm":
            self.budget, self.prefix, self.suffix = max_seq_len - 2, [special.cls], [special.sep]
        elif objective == "clm":
            self.budget, self.prefix, self.suffix = max_seq_len, [], []
        else:
            raise ValueError(f"DocumentPacker packs mlm or clm, not {objective!r}")
        self.objective = objective
        self.special = special
        self._current: list[int] = []

    def add(self, document: Sequence[Sequence[int]]) -> Iterator[list[int]]:
        """The records (input_ids) this document completes; an empty document adds nothing."""
        sentences = [list(sentence) for sentence in document if sentence]
        if not sentences:
            return
        if self.objective == "clm":
            yield from self._add_stream([t for sentence in sentences for t in sentence] + [self.special.eos])
        else:
            yield from self._add_sentences(sentences)

    def _add_stream(self, tokens: list[int]) -> Iterator[list[int]]:
        position = 0
        while position < len(tokens):
            take = min(self.budget - len(self._current), len(tokens) - position)
            self._current.extend(tokens[position : position + take])
            position += take
            if len(self._current) == self.budget:
                yield self._close()

    def _add_sentences(self, sentences: list[list[int]]) -> Iterator[list[int]]:
        for i, sentence in enumerate(sentences):
            glue = [self.special.sep] if i == 0 and self._current else []  # between two documents
            if len(self._current) + len(glue) + len(sentence) <= self.budget:
                self._current.extend(glue + sentence)
                continue
            if self._current:
                yield self._close()
            while len(sentence) > self.budget:  # longer than a record: the only cut inside a sentence
                self._current = sentence[: self.budget]
                yield self._close()
                sentence = sentence[self.budget :]
            self._current = list(sentence)

    def finish(self) -> Iterator[list[int]]:
        """The last, shorter record, if any text is left over."""
        if self._current:
            yield self._close()

    def _close(self) -> list[int]:
        record, self._current = [*self.prefix, *self._current, *self.suffix], []
        return record


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
