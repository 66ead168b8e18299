"""Model modules on tiny configs: losses against transformers' own, logging, checks, resume."""

import math
import pydoc_data.topics

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from convmodel.errors import UserError
from convmodel.models import BertPretraining, Gpt2Pretraining
from convmodel.models.base import PREDICTION_ROWS
from convmodel.run_summary import read_scalars
from convmodel.tokenization import train_tokenizer

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_GPT2 = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


def write_prose(path, lines: int = 1500) -> str:
    """English text that ships with Python (the language reference behind `help()`)."""
    text = "\n".join(pydoc_data.topics.topics.values())
    kept = [line.strip() for line in text.splitlines() if len(line.strip()) > 40][:lines]
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[int, str]:
    """Two real tokenizers of different vocabulary sizes."""
    root = tmp_path_factory.mktemp("tokenizers")
    text = write_prose(root / "prose.txt")
    return {size: train_tokenizer(text, str(root / f"tok{size}"), vocab_size=size) for size in (400, 500)}


@pytest.fixture
def tokenizer(tokenizers) -> str:
    return tokenizers[400]


def mlm_batch(batch_size: int = 4, length: int = 16, masked_per_row: int = 3, seed: int = 0) -> dict:
    """A hand-built MLM batch: the last row padded, `masked_per_row` targets per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 400, (batch_size, length), generator=gen)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    ids[mask == 0] = 0
    ids[:, 0], labels = 2, torch.full_like(ids, -100)
    for row in range(batch_size):
        for col in range(1, 1 + masked_per_row):
            labels[row, col] = ids[row, col]
            ids[row, col] = 4  # [MASK]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sop_batch() -> dict:
    batch = mlm_batch()
    batch["token_type_ids"] = (torch.arange(16) >= 8).long().expand(4, 16).clone()
    batch["sentence_order_label"] = torch.tensor([0, 1, 1, 0])
    return batch


def clm_batch() -> dict:
    batch = mlm_batch(masked_per_row=0)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def assert_trains(module, batch):
    losses = module.compute_losses(batch)
    assert math.isfinite(losses.loss.item())
    # a fresh model predicts about uniformly over the vocabulary
    assert abs(losses.lm_loss.item() - math.log(module.vocab_size)) < 1.0
    losses.loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    return losses


def test_bert_mlm_loss_is_transformers_loss(tokenizer):
    module = BertPretraining(tokenizer, config=TINY_BERT, objective="mlm")
    batch = mlm_batch()
    module.eval()
    ours = module.compute_losses(batch)
    theirs = module.to_hf()(**batch).loss
    torch.testing.assert_close(ours.loss, theirs)
    assert ours.n_targets.item() == 12
    module.train()
    assert_trains(module, batch)
    assert type(module.to_hf()).__name__ == "BertForMaskedLM"
    assert module.to_hf().config.vocab_size == 400 and module.to_hf().config.pad_token_id == 0


@pytest.mark.parametrize("masked_per_row", [1, 3, 5])
def test_mlm_projection_runs_on_a_few_row_counts(tokenizer, masked_per_row):
    # a varying number of masked tokens must not give the (N, V) logits a new size every batch:
    # that is what made glibc's heap grow on CPU (see masked_lm_losses)
    module = BertPretraining(tokenizer, config=TINY_BERT, objective="mlm").eval()
    rows = []
    module.model.cls.predictions.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    batch = mlm_batch(masked_per_row=masked_per_row)
    ours = module.compute_losses(batch)
    assert rows == [PREDICTION_ROWS] and ours.n_targets.item() == 4 * masked_per_row
    torch.testing.assert_close(ours.loss, module.to_hf()(**batch).loss)  # the padding rows add nothing


def test_bert_sop_adds_the_sentence_order_loss(tokenizer):
    module = BertPretraining(tokenizer, config=TINY_BERT, objective="sop").eval()
    batch = sop_batch()
    ours = module.compute_losses(batch)
    hf_batch = {k: v for k, v in batch.items() if k != "sentence_order_label"}
    theirs = module.to_hf()(**hf_batch, next_sentence_label=batch["sentence_order_label"]).loss
    torch.testing.assert_close(ours.loss, theirs)
    assert ours.loss > ours.lm_loss  # the order loss is part of what is optimised
    module.train()
    assert_trains(module, batch)
    assert type(module.to_hf()).__name__ == "BertForPreTraining"


def test_gpt2_clm_loss_is_transformers_loss(tokenizer):
    module = Gpt2Pretraining(tokenizer, config=TINY_GPT2).eval()
    batch = clm_batch()
    ours = module.compute_losses(batch)
    torch.testing.assert_close(ours.loss, module.to_hf()(**batch).loss)
    assert ours.n_targets.item() == 4 * 15 - 8  # next tokens that are not padding
    config = module.to_hf().config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, 5, 0)
    module.train()
    assert_trains(module, batch)


def test_batch_without_masked_tokens_gives_zero_loss_not_nan(tokenizer):
    module = BertPretraining(tokenizer, config=TINY_BERT)
    losses = module.compute_losses(mlm_batch(masked_per_row=0))
    assert losses.loss.item() == 0.0 and losses.n_targets.item() == 0
    losses.loss.backward()


@pytest.mark.parametrize("cls, objective, message", [
    (BertPretraining, "clm", "Gpt2Pretraining"),
    (Gpt2Pretraining, "mlm", "BertPretraining"),
])
def test_wrong_objective_names_the_right_model(tokenizer, cls, objective, message):
    with pytest.raises(UserError, match=message):
        cls(tokenizer, objective=objective)


def test_config_typos_and_tokenizer_keys_are_refused_together(tokenizer):
    with pytest.raises(UserError) as info:
        BertPretraining(tokenizer, config={**TINY_BERT, "hidden_sizes": 64, "vocab_size": 100})
    message = str(info.value)
    assert "model.init_args.config" in message and "hidden_sizes" in message and "vocab_size" in message


def test_hyperparameters_rebuild_the_module(tokenizer):
    module = Gpt2Pretraining(tokenizer, config=TINY_GPT2, lr=3e-4, optimizer="lamb")
    assert module.hparams["config"] == TINY_GPT2 and module.hparams["lr"] == 3e-4
    assert module.hparams["optimizer"] == "lamb"


class HandBatches(pl.LightningDataModule):
    """Fixed hand-built batches, with the max_seq_len a JsonlDataModule would have."""

    def __init__(self, batches: list[dict], max_seq_len: int = 16):
        super().__init__()
        self.batches, self.max_seq_len = batches, max_seq_len

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)  # each item is already a batch

    val_dataloader = test_dataloader = train_dataloader


def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0)
    return pl.Trainer(default_root_dir=str(tmp_path), **{**defaults, **kwargs})


def test_eval_loss_is_weighted_by_predicted_tokens(tokenizer, tmp_path):
    module = BertPretraining(tokenizer, config=TINY_BERT)
    batches = [mlm_batch(masked_per_row=1, seed=1), mlm_batch(masked_per_row=5, seed=2)]
    [metrics] = tiny_trainer(tmp_path).validate(module, HandBatches(batches), verbose=False)
    module.eval()
    with torch.no_grad():
        parts = [module.compute_losses(b) for b in batches]
    expected = sum(p.loss.item() * p.n_targets.item() for p in parts) / sum(p.n_targets.item() for p in parts)
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    # a plain mean of the two batch losses is a different number
    assert abs(expected - (parts[0].loss.item() + parts[1].loss.item()) / 2) > 1e-4


def test_fit_logs_sanity_val_loss_at_step_zero_and_training_metrics(tokenizer, tmp_path):
    module = BertPretraining(tokenizer, config=TINY_BERT, warmup_steps=2, lr=1e-2)
    logger = TensorBoardLogger(str(tmp_path), name="", version=0)
    trainer = tiny_trainer(tmp_path, logger=logger, max_steps=6, val_check_interval=3, num_sanity_val_steps=-1,
                           log_every_n_steps=1)
    batches = [mlm_batch(seed=s, masked_per_row=4) for s in range(3)]
    trainer.fit(module, HandBatches(batches))
    logger.experiment.flush()
    val = read_scalars(logger.log_dir, "val/loss")
    assert [step for step, _ in val][0] == 0 and len(val) == 3  # sanity check, then two validations
    assert val[-1][1] < val[0][1]
    assert read_scalars(logger.log_dir, "val/ppl")[0][1] == pytest.approx(math.exp(val[0][1]), rel=1e-4)
    lrs = [value for _, value in read_scalars(logger.log_dir, "train/lr")]
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])  # warmup over 2 steps, then linear decay
    assert len(read_scalars(logger.log_dir, "train/loss")) == 6
    assert all(value > 0 for _, value in read_scalars(logger.log_dir, "train/tokens_per_s"))


def test_linear_schedule_without_max_steps_names_the_options(tokenizer, tmp_path):
    module = BertPretraining(tokenizer, config=TINY_BERT)
    with pytest.raises(UserError, match="trainer.max_steps"):
        tiny_trainer(tmp_path, max_epochs=1).fit(module, HandBatches([mlm_batch()]))


def test_seq_len_longer_than_positions_is_refused_before_training(tokenizer, tmp_path):
    module = Gpt2Pretraining(tokenizer, config=TINY_GPT2)
    with pytest.raises(UserError, match=r"data.max_seq_len \(128\).*n_positions"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, HandBatches([clm_batch()], max_seq_len=128))


def test_resume_with_another_vocabulary_names_both_tokenizers(tokenizers, tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(BertPretraining(tokenizers[400], config=TINY_BERT, warmup_steps=1), HandBatches([mlm_batch()]))
    ckpt = str(tmp_path / "small-vocab.ckpt")
    trainer.save_checkpoint(ckpt)
    other = BertPretraining(tokenizers[500], config=TINY_BERT, warmup_steps=1)
    with pytest.raises(UserError) as info:
        tiny_trainer(tmp_path, max_steps=2).fit(other, HandBatches([mlm_batch()]), ckpt_path=ckpt)
    message = str(info.value)
    assert tokenizers[400] in message and tokenizers[500] in message and "400" in message and "500" in message
    # the same checkpoint resumes with its own tokenizer
    same = BertPretraining(tokenizers[400], config=TINY_BERT, warmup_steps=1)
    resumed = tiny_trainer(tmp_path, max_steps=2)
    resumed.fit(same, HandBatches([mlm_batch()]), ckpt_path=ckpt)
    assert resumed.global_step == 2


def test_checkpoint_of_another_architecture_is_one_clear_error(tokenizer, tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(Gpt2Pretraining(tokenizer, config=TINY_GPT2, warmup_steps=1), HandBatches([clm_batch()]))
    ckpt = str(tmp_path / "gpt2.ckpt")
    trainer.save_checkpoint(ckpt)
    wider = Gpt2Pretraining(tokenizer, config={**TINY_GPT2, "n_embd": 48}, warmup_steps=1)
    with pytest.raises(UserError, match="does not fit the model.*model.init_args.config"):
        tiny_trainer(tmp_path).validate(wider, HandBatches([clm_batch()]), ckpt_path=ckpt, verbose=False)


def test_load_from_checkpoint_needs_no_yaml(tokenizer, tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1)
    module = Gpt2Pretraining(tokenizer, config=TINY_GPT2, warmup_steps=1)
    trainer.fit(module, HandBatches([clm_batch()]))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = Gpt2Pretraining.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams["config"] == TINY_GPT2
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
