"""Train a sentencepiece tokenizer and save it as a Hugging Face tokenizer folder.

Why sentencepiece: it needs no pre-tokenizer, so the same code serves English and languages
written without spaces (Japanese, Chinese). Why a Hugging Face folder: the data preparation,
the models and every exported model load the tokenizer with `AutoTokenizer.from_pretrained`,
with or without convmodel installed.

The folder holds `tokenizer.json` (the whole pipeline, read by the `tokenizers` library),
`tokenizer_config.json` (the special tokens) and `spm.model` (the raw sentencepiece model, for
reference and for tools that want it). `tokenizer.json` is built from `spm.model` piece by
piece, so both split ordinary text into the same ids (the one exception: where two
segmentations tie on score, as in long runs of one character like "==========", the two
libraries may order the same pieces differently):

- model: sentencepiece's Unigram (pieces and scores) or BPE (pieces and merges derived from
  the pieces' ranks), with byte fallback so unseen characters become byte pieces, never [UNK];
- normalizer: sentencepiece's own precompiled character map (NFKC, plus case folding with
  `lowercase=True`), then its whitespace rule: strip the end, collapse runs of spaces;
- pre-tokenizer/decoder: Metaspace, so a piece that starts a word begins with "▁" (U+2581);
- post-processor: [CLS] A [SEP] and [CLS] A [SEP] B [SEP] with token type ids 0 and 1.

Special tokens have fixed ids that the rest of convmodel relies on (see SPECIAL_TOKENS). They
are sentencepiece "user defined symbols", so both sentencepiece and the HF tokenizer keep
"[MASK]" in a text as one token.
"""

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator

from convmodel.errors import UserError
from convmodel.file_patterns import expand_file_patterns

PAD, UNK, CLS, SEP, MASK, EOS = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>"
# The ids are the positions: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, <|endoftext|>=5.
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK, EOS]
MODEL_TYPES = ("unigram", "bpe")
SPM_MODEL_FILE = "spm.model"
# Longest input line sentencepiece keeps, in bytes (its default, 4192, silently drops
# paragraphs of a paragraph-per-line corpus such as Wikipedia).
MAX_LINE_BYTES = 1 << 16
PROGRESS_SECONDS = 10  # between "read N lines" reports while sentencepiece reads the input
BYTE_PIECE_SCORE = -1e9
# The tokenizer class named in the saved folder (see save_tokenizer).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# How a tokenizer was loaded, which transformers 5 writes back when saving it; not part of it.
LOADING_ONLY_KEYS = ("is_local", "local_files_only")


def train_tokenizer(
    input: list[str] | str,
    output_dir: str,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    input_sentence_size: int = 1_000_000,
    lowercase: bool = False,
) -> str:
    """Train a sentencepiece model on text files and save a Hugging Face tokenizer folder.

    Args:
        input: text files, one sentence or paragraph a line: a list, a comma-separated string,
            or glob patterns ("data/*.txt"). Blank lines are skipped.
        output_dir: folder to write (created if missing); load it with `load_tokenizer` or
            `transformers.AutoTokenizer.from_pretrained`.
        vocab_size: number of pieces, the 6 special tokens and 256 byte pieces included.
        model_type: "unigram" (sentencepiece's default) or "bpe".
        input_sentence_size: at most this many lines, sampled at random from the input,
            train the model (sentencepiece keeps them all in memory).
        lowercase: case-fold the text, in training and whenever the tokenizer is used.

    Returns:
        output_dir.
    """
    for name, value in (("vocab_size", vocab_size), ("input_sentence_size", input_sentence_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"--{name} {value!r} is not a whole number.")
    if model_type not in MODEL_TYPES:
        raise UserError(f"--model_type {model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}.")
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise UserError(
            f"--vocab_size {vocab_size} is too small: the 6 special tokens and 256 byte pieces "
            f"take {len(SPECIAL_TOKENS) + 256} ids; use at least a few hundred more."
        )
    if input_sentence_size < 1:
        raise UserError(f"--input_sentence_size {input_sentence_size} must be at least 1.")
    files = resolve_input_files(input)
    require_text(files)
    prepare_output_dir(output_dir)

    spm_model = os.path.join(output_dir, SPM_MODEL_FILE)
    train_sentencepiece(files, spm_model, vocab_size, model_type, input_sentence_size, lowercase)
    save_tokenizer(wrap_sentencepiece(spm_model), output_dir)
    return output_dir


def load_tokenizer(path: str):
    """The Hugging Face tokenizer saved in folder `path` (by `train_tokenizer` or any HF tool)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(
            f"Tokenizer folder {path} does not exist. Create it with "
            f"`python trainer/train_tokenizer.py --input TEXT_FILES --output_dir {path}`."
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{path} is not a tokenizer folder: it has neither tokenizer.json nor tokenizer_config.json. "
            f"Point to the --output_dir of train_tokenizer.py."
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # the tokenizers library raises plain Exceptions for bad files
        raise UserError(
            f"Cannot load the tokenizer in {path} ({type(exc).__name__}: {exc}). Its files are damaged "
            f"or not a tokenizer's; train it again with train_tokenizer.py --output_dir {path}."
        ) from exc


def resolve_input_files(input: list[str] | str) -> list[str]:
    """Files named by a list / comma-separated string of paths and glob patterns, in order."""
    return expand_file_patterns("--input", input)


def require_text(files: list[str]) -> None:
    """Fail early, with the file names, when the input has no text at all."""
    for _ in input_lines(files):
        return
    raise UserError(f"--input has no text, only blank lines: {', '.join(files)}.")


def input_lines(files: list[str]) -> Iterator[str]:
    """Non-blank lines of the files, stripped; a line that is not UTF-8 is a UserError."""
    for path in files:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{path}, line {line_number}: not UTF-8 text ({exc.reason}). Convert the file to UTF-8."
                    ) from exc
                if line:
                    yield line


def prepare_output_dir(output_dir: str) -> None:
    """Create output_dir and make sure we can write there before training for minutes."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise UserError(f"--output_dir {output_dir} is not writable: {exc.strerror}. Choose another folder.") from exc


def train_sentencepiece(
    files: list[str], model_file: str, vocab_size: int, model_type: str, input_sentence_size: int, lowercase: bool
) -> None:
    """Run sentencepiece's trainer and write model_file (the special ids fixed as above)."""
    import sentencepiece as spm

    model_prefix = model_file.removesuffix(".model")
    reader_errors: list[UserError] = []

    total_mb = sum(os.path.getsize(path) for path in files) / 1e6
    print(f"[convmodel] reading {len(files)} file(s), {total_mb:.1f} MB", flush=True)

    def sentences() -> Iterator[str]:
        # sentencepiece turns an exception raised here into its own RuntimeError; keep ours.
        # It reads every line before it trains, silently; a line every PROGRESS_SECONDS says it is alive.
        lines, last_report = 0, time.perf_counter()
        try:
            for line in input_lines(files):
                lines += 1
                if time.perf_counter() - last_report > PROGRESS_SECONDS:
                    print(f"[convmodel] read {lines:,} lines", flush=True)
                    last_report = time.perf_counter()
                yield line
        except UserError as exc:
            reader_errors.append(exc)
            raise
        kept = f", training on a random {input_sentence_size:,} of them" if lines > input_sentence_size else ""
        print(f"[convmodel] read {lines:,} lines{kept}; sentencepiece is choosing {vocab_size:,} {model_type} "
              "pieces (minutes for a large corpus)", flush=True)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_LINE_BYTES,
            character_coverage=0.9995,
            byte_fallback=True,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            pad_id=0,
            pad_piece=PAD,
            unk_id=1,
            unk_piece=UNK,
            bos_id=-1,
            eos_id=-1,
            user_defined_symbols=SPECIAL_TOKENS[2:],
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if reader_errors:
            raise reader_errors[0] from None
        raise UserError(sentencepiece_error_message(str(exc), vocab_size)) from exc
    os.remove(model_prefix + ".vocab")  # tokenizer.json holds the same pieces and scores


def sentencepiece_error_message(message: str, vocab_size: int) -> str:
    """sentencepiece's trainer error translated into what to change."""
    # "Vocabulary size too high (8000). Please set it to a value <= 1234."
    if match := re.search(r"Vocabulary size too high.*<= *(\d+)", message):
        return (
            f"--vocab_size {vocab_size} is too large for this input: it has too few distinct pieces. "
            f"Use --vocab_size {match.group(1)} or less, or give more text."
        )
    # "Vocabulary size is smaller than required_chars. 1000 vs 3259. ..." (3259 counts the
    # characters to cover plus the special and byte pieces)
    if match := re.search(r"smaller than required_chars\. *\d+ vs (\d+)", message):
        return (
            f"--vocab_size {vocab_size} is too small for this input: its characters, the special tokens "
            f"and the byte pieces alone take {match.group(1)} ids. Use a --vocab_size well above that."
        )
    return f"sentencepiece could not train on --input: {message}"


def wrap_sentencepiece(model_file: str):
    """A transformers fast tokenizer that segments like the sentencepiece model in model_file."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = backend_tokenizer(model_file)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        # Swallowing the space before it makes "is [MASK]." look like "is Paris." did in
        # training: "▁is" then one piece in the mask's place, not "▁is", "▁", [MASK].
        mask_token=AddedToken(MASK, lstrip=True, rstrip=False, normalized=False, special=True),
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
        # BERT and ALBERT take the segment ids of a sentence pair.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def backend_tokenizer(model_file: str):
    """The `tokenizers.Tokenizer` equivalent of a sentencepiece model (see the module docstring)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    byte = sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE
    # sentencepiece uses byte pieces only for characters it cannot segment otherwise; the
    # lowest score keeps a literal "<0x41>" in a text from matching one, as there.
    pieces = [(piece.piece, BYTE_PIECE_SCORE if piece.type == byte else piece.score) for piece in proto.pieces]
    if [piece for piece, _ in pieces[: len(SPECIAL_TOKENS)]] != SPECIAL_TOKENS:
        raise ValueError(f"{model_file} does not start with the special tokens {SPECIAL_TOKENS}")

    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
        model = models.BPE(vocab, bpe_merges(proto), unk_token=UNK, fuse_unk=True, byte_fallback=True)
    else:
        model = models.Unigram(pieces, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # "first": only the text's start gets the "▁" prefix, not the text after a special token,
    # as in sentencepiece ("[MASK]." -> "[MASK]", ".").
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # Byte pieces back to characters, then "▁" back to spaces (dropping the text's first one).
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, SPECIAL_TOKENS.index(CLS)), (SEP, SPECIAL_TOKENS.index(SEP))],
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True, lstrip=token == MASK) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def save_tokenizer(tokenizer, output_dir: str) -> None:
    """`tokenizer.save_pretrained(output_dir)`, loadable by transformers 4 as well as 5.

    transformers 5 names its fast tokenizer class "TokenizersBackend", which transformers 4
    does not know; both know "PreTrainedTokenizerFast". Use this, not save_pretrained, to
    copy a tokenizer into an exported model folder.
    """
    tokenizer.save_pretrained(output_dir)
    config_file = os.path.join(output_dir, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = TOKENIZER_CLASS
    for key in LOADING_ONLY_KEYS:
        config.pop(key, None)
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def bpe_merges(proto) -> list[tuple[str, str]]:
    """BPE merges equivalent to a sentencepiece BPE model, which stores pieces but no merges.

    sentencepiece merges the adjacent pair whose concatenation is the best-scored piece; so
    each normal piece, best first, contributes every split of itself into two known pieces.
    """
    from sentencepiece import sentencepiece_model_pb2

    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    known = {piece.piece for piece in proto.pieces if piece.type == normal}
    ranked = sorted((piece for piece in proto.pieces if piece.type == normal), key=lambda piece: -piece.score)
    merges = []
    for piece in ranked:
        text = piece.piece
        merges.extend((text[:i], text[i:]) for i in range(1, len(text)) if text[:i] in known and text[i:] in known)
    return merges


def main(argv: list[str] | None = None) -> None:
    """`train_tokenizer.py --input FILES --output_dir DIR [--vocab_size N] ...` (see train_tokenizer)."""
    from convmodel.tool_cli import run_tool

    argv = join_input_arguments(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    output_dir = run_tool(train_tokenizer, argv, "train_tokenizer.py")
    print(f"Saved the tokenizer to {output_dir} in {time.perf_counter() - start:.1f} s.")


def join_input_arguments(argv: list[str]) -> list[str]:
    """`--input a.txt b.txt` (an unquoted glob the shell expanded) as `--input a.txt,b.txt`."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        joined.append(argv[index])
        index += 1
        if joined[-1] == "--input":
            values = []
            while index < len(argv) and not argv[index].startswith("-"):
                values.append(argv[index])
                index += 1
            joined.append(",".join(values))
    return joined
