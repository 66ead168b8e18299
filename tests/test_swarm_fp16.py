"""precision 16-mixed in a synchronous swarm: a peer in this process trains a tiny BERT with fp16 autocast on the
CPU (Lightning's MixedPrecision plugin given explicitly: from `precision: 16-mixed` alone it takes bf16 on a CPU).

The loss scale starts far too high, so the first local steps overflow: each is skipped and halves the scale,
without counting as a NaN event or restoring a backup, and the peer goes on to its last collaborative epoch
with finite parameters that changed. The scale reached is the one in the checkpoint. Both kinds of scaler:
torch's (gradient buffers not reused) and hivemind's (reuse_grad_buffers: true).
"""

import pytest
import torch

pytest.importorskip("hivemind")

from test_collaborative import TINY_BERT, shards  # noqa: E402, F401
from test_collaborative_swarm_peer import LOOPBACK  # noqa: E402

from convmodel.errors import UserError  # noqa: E402


class InnerGradientNorms:
    """Records the norm of the gradient each step of the swarm's inner optimizer receives (torch's step pre-hook):
    the averaged gradient, which must arrive unscaled."""

    def __init__(self):
        self.norms: list[float] = []

    def attach(self, strategy) -> None:
        strategy.hivemind_optimizer.opt.register_step_pre_hook(self.record)

    def record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.reshape(-1).float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.cat(grads).norm()) if grads else 0.0
        if norm > 0:  # not hivemind's initial zero-gradient step
            self.norms.append(norm)


INITIAL_SCALE = 2.0**24  # the scaled gradients of this BERT overflow fp16's 65504 many times over
LAST_EPOCH = 4


def fp16_trainer(tmp_path, strategy, callbacks=(), scaler=None):
    from pytorch_lightning import Trainer
    from pytorch_lightning.plugins import MixedPrecision

    scaler = scaler or torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE)
    return Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=200, logger=False,
                   plugins=[MixedPrecision("16-mixed", "cpu", scaler)], enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                   callbacks=list(callbacks), enable_checkpointing=bool(callbacks))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reuse_grad_buffers", [False, True], ids=["torch-scaler", "hivemind-scaler"])
def test_fp16_overflows_skip_local_steps_and_lower_the_scale(reuse_grad_buffers, shards, tokenizer_dir,  # noqa: F811
                                                             tmp_path, capsys):
    from hivemind import GradScaler as HivemindGradScaler
    from pytorch_lightning import Callback
    from pytorch_lightning.callbacks import ModelCheckpoint

    from convmodel.collaborative import HivemindStrategy
    from convmodel.data import JsonlDataModule
    from convmodel.models import BertPretraining

    strategy = HivemindStrategy(run_id=f"fp16_{int(reuse_grad_buffers)}", target_batch_size=16,
                                max_collaborative_epochs=LAST_EPOCH, backup_every_epochs=1,
                                reuse_grad_buffers=reuse_grad_buffers, **LOOPBACK)
    torch.manual_seed(0)
    model = BertPretraining(tokenizer=tokenizer_dir, config=TINY_BERT, lr=2e-3, warmup_steps=2, total_steps=50)
    before = [p.detach().clone() for p in model.parameters()]
    data = JsonlDataModule(tokenizer=tokenizer_dir, train_files=str(shards / "train" / "part-*.jsonl"),
                           batch_size=8, max_seq_len=64, shuffle_buffer_size=100)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1,
                                  save_top_k=0)
    norms = InnerGradientNorms()

    class AttachNorms(Callback):
        def on_train_start(self, trainer, pl_module):
            norms.attach(strategy)

    trainer = fp16_trainer(tmp_path, strategy, [checkpoints, AttachNorms()])
    trainer.fit(model, datamodule=data)
    out, err = capsys.readouterr()

    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, HivemindGradScaler) == reuse_grad_buffers
    overflows = strategy.peer.loss_scaler.overflows if strategy.peer.loss_scaler else 0
    final_scale = float(scaler.get_scale())
    print(f"{overflows} overflows, scale {INITIAL_SCALE:g} -> {final_scale:g}, {trainer.global_step} local steps, "
          f"inner gradient norms {[round(n, 3) for n in norms.norms]}")
    # each collaborative step received the unscaled gradient (a scaled one is 2^18 times larger at the least)
    assert len(norms.norms) >= LAST_EPOCH - 1 and all(n < 100 for n in norms.norms), norms.norms
    # every overflow halved the scale (none grew it: torch's growth_interval is 2000 steps)
    assert overflows >= 1 and final_scale == INITIAL_SCALE / 2**overflows, (overflows, final_scale, err)
    assert "fp16 gradients overflowed: skipped a local step, loss scale now" in err
    assert strategy.peer.guard.skipped_steps == 0 and strategy.peer.guard.restored_backups == 0, err
    assert "non-finite" not in err and "restoring the backup" not in err, err
    assert f"collaborative epoch {LAST_EPOCH} (" in out, out  # it went on to the end
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the scale is saved with the run (Lightning restores the plugin's state from it on resume)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["MixedPrecision"]["scale"] == final_scale, saved.get("MixedPrecision")


@pytest.mark.timeout(60)
def test_fp16_with_reused_buffers_and_a_delayed_step_is_refused_before_joining(tokenizer_dir, tmp_path):
    from convmodel.collaborative import HivemindStrategy
    from convmodel.models import BertPretraining

    strategy = HivemindStrategy(run_id="fp16_refused", target_batch_size=16, reuse_grad_buffers=True,
                                offload_optimizer=True, delay_optimizer_step=True, **LOOPBACK)
    model = BertPretraining(tokenizer=tokenizer_dir, config=TINY_BERT)
    data = [{"input_ids": torch.ones(8, dtype=torch.long)}]
    with pytest.raises(UserError, match=r"16-mixed with reuse_grad_buffers: true cannot delay the optimizer step"):
        fp16_trainer(tmp_path, strategy).fit(model, train_dataloaders=torch.utils.data.DataLoader(data))
    assert strategy.dht is None  # refused before anything started
