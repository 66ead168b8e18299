"""FinetuneDataModule: a labelled task's train/dev/test files, read, checked and tokenized.

Labelled fine-tuning sets are small (thousands to a few hundred thousand examples), so unlike
pretraining shards they are read whole: that is what lets every file be checked before the
first step (an unseen dev label, a missing column) and the label set come from the training
split. The label names reach the model through a link (FinetuneCLI), never typed twice.
"""

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from convmodel.errors import UserError
from convmodel.finetune.encoding import Collator, encode_tagged, encode_text
from convmodel.finetune.labels import check_known_labels, label_names
from convmodel.finetune.readers import Columns, FormatName, TaskName, read_examples


class FinetuneDataModule(pl.LightningDataModule):
    """Labelled data of one task from CoNLL, CSV/TSV or JSONL files.

    Args:
        task: token_classification (NER/POS tags per word), sequence_classification (a class per text or text pair) or regression (a number per text or pair).
        train_file: Training split; its labels are the model's label set.
        val_file: Dev split: early stopping, the best checkpoint and the dev scores.
        test_file: Test split, scored once with the best checkpoint at the end; null for none.
        format: auto (from the extension: .conll/.txt/.iob/.bio, .csv, .tsv, .jsonl/.json), conll, csv, tsv or jsonl.
        text_column: CSV/TSV column (a name, or a 0-based index with header false) or JSONL key of the text.
        text_pair_column: Column or key of the second text of a pair; null for single texts.
        label_column: Column or key of the label.
        header: Whether CSV/TSV files start with a header line naming the columns.
        token_column: CoNLL column of the token (0-based; -1 is the last).
        tag_column: CoNLL column of the tag (0-based; -1 is the last).
        tokens_key: JSONL key of a token-classification record's word list.
        tags_key: JSONL key of a token-classification record's tag list.
        label_all_subtokens: Label every sub-token of a word (B-X as I-X on the later ones), not only the first.
        max_seq_len: Longest input in tokens; longer ones are cut (a cut word counts as predicted O).
        batch_size: Examples per batch.
        num_workers: DataLoader worker processes.
        source: The pretrained model whose tokenizer encodes the text (linked from model.source).
    """

    def __init__(
        self,
        task: TaskName,
        train_file: str,
        val_file: str,
        test_file: str | None = None,
        format: FormatName = "auto",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        header: bool = True,
        token_column: int = 0,
        tag_column: int = -1,
        tokens_key: str = "tokens",
        tags_key: str = "tags",
        label_all_subtokens: bool = False,
        max_seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        source: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if max_seq_len < 4 or batch_size < 1:
            raise UserError(f"--data.max_seq_len {max_seq_len} / --data.batch_size {batch_size}: give at least 4 "
                            "tokens and 1 example")
        if label_all_subtokens and task != "token_classification":
            raise UserError("--data.label_all_subtokens applies to --data.task token_classification only")
        self.task, self.source = task, source
        columns = Columns(str(text_column), None if text_pair_column is None else str(text_pair_column),
                          str(label_column), header, token_column, tag_column, tokens_key, tags_key)
        self.examples = {"train": read_examples(train_file, "--data.train_file", task, format, columns),
                         "val": read_examples(val_file, "--data.val_file", task, format, columns)}
        if test_file is not None:
            self.examples["test"] = read_examples(test_file, "--data.test_file", task, format, columns)
        self.labels = label_names(task, self.examples["train"], label_all_subtokens)
        for split, option in (("val", "--data.val_file"), ("test", "--data.test_file")):
            if split in self.examples:
                check_known_labels(self.examples[split], self.labels, option, train_file)
        self.tokenizer = None
        self.encoded: dict[str, list[dict]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        if self.source is None:
            raise UserError("data.source is not set: give the pretrained model as --model.source")
        from convmodel.finetune.source import load_source_tokenizer

        self.tokenizer = load_source_tokenizer(self.source)
        if self.task == "token_classification" and not self.tokenizer.is_fast:
            raise UserError(f"--model.source {self.source}: its tokenizer is a slow (Python) one, which cannot say "
                            "which word each sub-token belongs to; save the model with a tokenizer.json (a fast "
                            "tokenizer), as export_model.py does")
        label_ids = None if self.labels is None else {name: i for i, name in enumerate(self.labels)}
        hp = self.hparams
        for split, examples in self.examples.items():
            if self.task == "token_classification":
                self.encoded[split] = [encode_tagged(e, self.tokenizer, label_ids, hp.max_seq_len,
                                                     hp.label_all_subtokens) for e in examples]
            else:
                self.encoded[split] = [encode_text(e, self.tokenizer, label_ids, hp.max_seq_len) for e in examples]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.encoded[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=Collator(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.encoded:
            raise UserError("no test split: give --data.test_file")
        return self._loader("test", shuffle=False)
