"""LeanAlbertPretraining: losses against the transformers model's own, config errors, and the
shipped tiny config trained through the real command line, exported and used by fill-mask."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convmodel.errors import UserError
from convmodel.models.lean_albert_pretraining import LeanAlbertPretraining
from convmodel.run_summary import latest_version_dir, read_scalars

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
        "embedding_size": 16, "hidden_act_gated": True, "share_large_matrices": 1}


def mlm_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four rows of 16 tokens, the last one half padding, three masked targets per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (4, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, 8:] = 0
    ids[mask == 0] = 0
    ids[:, 0], labels = 2, torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    ids[:, 1:4] = 4  # [MASK]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_mlm_loss_is_the_transformers_model_loss(tokenizer_dir):
    module = LeanAlbertPretraining(tokenizer_dir, config=TINY, objective="mlm").eval()
    batch = mlm_batch(module.vocab_size)
    ours = module.compute_losses(batch)
    torch.testing.assert_close(ours.loss, module.to_hf()(**batch).loss)
    assert ours.n_targets.item() == 12
    assert abs(ours.lm_loss.item() - math.log(module.vocab_size)) < 1.0  # a fresh model is near uniform
    hf = module.to_hf()
    assert type(hf).__name__ == "LeanAlbertForMaskedLM"
    assert (hf.config.vocab_size, hf.config.pad_token_id, hf.config.bos_token_id) == (module.vocab_size, 0, 2)
    module.train()
    ours.loss.backward()
    assert hf.albert.encoder.matrices[0].qkv.grad is not None


def test_sop_adds_the_sentence_order_loss(tokenizer_dir):
    module = LeanAlbertPretraining(tokenizer_dir, config=TINY, objective="sop").eval()
    batch = mlm_batch(module.vocab_size)
    batch["token_type_ids"] = (torch.arange(16) >= 8).long().expand(4, 16).clone()
    batch["sentence_order_label"] = torch.tensor([0, 1, 1, 0])
    ours = module.compute_losses(batch)
    torch.testing.assert_close(ours.loss, module.to_hf()(**batch).loss)
    assert ours.loss > ours.lm_loss
    assert type(module.to_hf()).__name__ == "LeanAlbertForPreTraining"
    del batch["sentence_order_label"]
    with pytest.raises(UserError, match="sentence_order_label"):
        module.compute_losses(batch)


def test_gradient_checkpointing_is_a_config_key(tokenizer_dir):
    module = LeanAlbertPretraining(tokenizer_dir, config={**TINY, "gradient_checkpointing": True})
    assert module.to_hf().albert.encoder.gradient_checkpointing
    losses = module.compute_losses(mlm_batch(module.vocab_size))
    losses.loss.backward()
    assert module.to_hf().albert.encoder.matrices[0].ffn_out.grad is not None


@pytest.mark.parametrize("kwargs, message", [
    (dict(config={**TINY, "adapter_dim": 4, "share_large_matrices": 0}), "model.init_args.config.*adapter_dim"),
    (dict(config={**TINY, "hidden_sizes": 64, "vocab_size": 9}), "hidden_sizes.*vocab_size"),
    (dict(objective="clm"), "Gpt2Pretraining"),
])
def test_mistakes_are_one_user_error(tokenizer_dir, kwargs, message):
    with pytest.raises(UserError, match=message):
        LeanAlbertPretraining(tokenizer_dir, **{"config": TINY, **kwargs})


@pytest.fixture(scope="module")
def mlm_shards(text_corpus, tokenizer_dir, tmp_path_factory) -> Path:
    from convmodel.data import prepare_train_data

    root = tmp_path_factory.mktemp("lean-albert-shards")
    for split, path in text_corpus.items():
        prepare_train_data(path, tokenizer_dir, str(root / split), objective="mlm", max_seq_len=64,
                           num_workers=1, progress=False)
    return root


FILL_MASK = """
import json, sys
from transformers import pipeline

fill = pipeline("fill-mask", model=sys.argv[1], trust_remote_code=True)
predictions = fill("The [MASK] statement defines a function.")
print(json.dumps({
    "model": type(fill.model).__name__,
    "tokens": [p["token_str"] for p in predictions],
    "convmodel_imported": any(name == "convmodel" or name.startswith("convmodel.") for name in sys.modules),
}))
"""


def test_tiny_config_trains_through_the_cli_and_exports_for_fill_mask(mlm_shards, tokenizer_dir, tmp_path):
    steps = 12
    args = [
        "--config", str(REPO / "configs" / "lean-albert-tiny.yaml"),
        "--data.tokenizer", tokenizer_dir,
        "--data.train_files", f"{mlm_shards}/train/part-*.jsonl",
        "--data.val_files", f"{mlm_shards}/valid/part-*.jsonl",
        "--data.test_files", f"{mlm_shards}/test/part-*.jsonl",
        "--data.max_seq_len", "64", "--data.batch_size", "16",
        "--model.init_args.config", json.dumps(TINY),
        "--model.init_args.lr", "1e-2", "--model.init_args.warmup_steps", "2",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "trainer.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = latest_version_dir(str(tmp_path / "runs" / "lean-albert-tiny"))
    val = read_scalars(run_dir, "val/loss")
    assert val[0][0] == 0 and len(val) == 3  # before training, then every 6 steps
    assert val[-1][1] < val[0][1] - 0.5, val  # from ~ln(1000) = 6.9 toward the unigram entropy
    last = tmp_path / "runs" / "lean-albert-tiny" / "checkpoints" / "last.ckpt"
    module = LeanAlbertPretraining.load_from_checkpoint(last)
    assert module.hparams["config"] == TINY

    folder = tmp_path / "exported"
    module.to_hf().save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    script = tmp_path / "fill_mask.py"
    script.write_text(FILL_MASK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    # -I: neither the repository nor the working directory is importable
    result = subprocess.run([sys.executable, "-I", str(script), str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "LeanAlbertForMaskedLM" and len(report["tokens"]) == 5
    assert not report["convmodel_imported"]
