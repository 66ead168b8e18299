"""The Lightning-free SwarmPeer in this process, with real DHTs and hivemind.Optimizers on 127.0.0.1.

Each test builds a tiny torch model and one or two peers, and checks one thing the production
options rely on: offloaded state stays beside its parameters when Lightning moves optimizers,
uneven batches are weighted by their samples, a joiner keeps its own hyperparameters, 8-bit LAMB
state travels exactly and is never averaged, and precisions hivemind cannot average are refused.
"""

import pytest
import torch

pytest.importorskip("hivemind")

from convmodel.collaborative.swarm_options import SwarmOptions  # noqa: E402
from convmodel.collaborative.swarm_peer import SwarmPeer  # noqa: E402
from convmodel.errors import UserError  # noqa: E402

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False, use_relay=False, use_auto_relay=False,
                nat_port_map=False, auto_nat=False, matchmaking_time=0.5, averaging_timeout=5.0,
                bootstrap_timeout=15.0, load_state_timeout=15.0, metadata_expiration=10.0)


def make_peer(run_id: str, optimizer_factory, seed: int = 0, **options) -> tuple[SwarmPeer, torch.nn.Module]:
    """A peer of a 64x64 linear layer (4096 weights: 8-bit moments under lamb8bit, fp32 for the bias)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 64)
    peer = SwarmPeer(SwarmOptions(run_id=run_id, **{**LOOPBACK, **options}))
    peer.join(optimizer_factory(model.parameters()))
    return peer, model


def adamw(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    return lambda params: torch.optim.AdamW(params, lr=1e-3, betas=betas, eps=eps, weight_decay=weight_decay)


def lamb8bit(betas=(0.9, 0.999)):
    from convmodel.lamb8bit import Lamb8bit

    return lambda params: Lamb8bit(params, lr=1e-3, betas=betas, weight_decay=0.01)


def inner_tensors(peer: SwarmPeer) -> list[torch.Tensor]:
    return [value for state in peer.optimizer.opt.state.values() for value in state.values()
            if torch.is_tensor(value)]


def download(joiner: SwarmPeer, server_model: torch.nn.Module, joiner_model: torch.nn.Module, tries: int = 100):
    """The joiner loads the swarm's state until it holds the server's weights (a try finds no one until the
    server's offer to share reaches the DHT); fails after `tries` tries."""
    for _ in range(tries):
        joiner.optimizer.load_state_from_peers()
        if torch.equal(joiner_model.weight, server_model.weight):
            return
    pytest.fail(f"the joiner never received the server's state in {tries} tries")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["adamw", "lamb8bit"])
def test_offloaded_optimizer_state_stays_beside_its_parameters_when_lightning_moves_optimizers(optimizer):
    """Lightning's setup and load_optimizer_state_dict move optimizer state to the accelerator in place."""
    from lightning_fabric.utilities.optimizer import _optimizers_to_device

    peer, _ = make_peer("offload_test", adamw() if optimizer == "adamw" else lamb8bit(), offload_optimizer=True)
    try:
        before = inner_tensors(peer)
        assert before and all(t.device.type == "cpu" for t in before)
        _optimizers_to_device([peer.optimizer], torch.device("meta"))  # as Strategy.setup does with cuda:0
        after = inner_tensors(peer)
        assert [t.device.type for t in after] == ["cpu"] * len(before)
        # and the offloaded optimizer still steps on its CPU parameters
        for p in (p for g in peer.optimizer.opt.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        peer.optimizer.opt.step()
    finally:
        peer.leave()


@pytest.mark.timeout(120)
def test_uneven_batches_count_by_their_samples():
    """Batches of 5 and 32 samples: the gradient is their sample-weighted mean (hivemind gave 3.7x the second)."""
    peer, model = make_peer("uneven_test", adamw(), target_batch_size=10_000)
    try:
        grads = [torch.randn_like(model.weight) for _ in range(2)]
        for grad, samples in zip(grads, (5, 32)):
            model.weight.grad, model.bias.grad = grad.clone(), torch.zeros_like(model.bias)
            assert not peer.step(samples)
        assert peer.optimizer.local_epoch == 0  # no collaborative epoch yet: the gradients wait in the accumulators
        averager = peer.optimizer.grad_averager
        averager.load_accumulators_into_averager_()
        with averager.get_tensors() as averaged:
            weight = averaged[0].clone()
        torch.testing.assert_close(weight, (5 * grads[0] + 32 * grads[1]) / 37)
    finally:
        peer.leave()


@pytest.mark.timeout(180)
def test_joiner_keeps_its_hyperparameters_and_receives_the_8bit_state_exactly(capsys):
    """The serving peer's state_dict carries its betas/eps/weight decay; the joiner's config must stay."""
    server, server_model = make_peer("join_test", lamb8bit(betas=(0.9, 0.999)), seed=0)
    joiner = None
    try:
        with torch.no_grad():  # a real step, so that the 8-bit moments are not all zero
            server_model.weight.grad = torch.randn_like(server_model.weight)
            server_model.bias.grad = torch.randn_like(server_model.bias)
        server.optimizer.opt.step()
        joiner, joiner_model = make_peer("join_test", lamb8bit(betas=(0.5, 0.6)), seed=1,
                                         initial_peers=server.peer_addresses)
        download(joiner, server_model, joiner_model)
        assert [g["betas"] for g in joiner.optimizer.opt.param_groups] == [(0.5, 0.6)]
        assert "betas" in capsys.readouterr().out  # the difference is said, not silent
        served, received = server.optimizer.opt.state[server_model.weight], joiner.optimizer.opt.state[
            joiner_model.weight]
        assert received["exp_avg_q"].dtype == torch.uint8
        for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
            assert torch.equal(served[key], received[key]), key
        # state rounds average the parameters only: 8-bit codes averaged as numbers would be garbage
        for peer in (server, joiner):
            assert peer.optimizer.state_averager.opt_keys_for_averaging == ()
    finally:
        for peer in (joiner, server):
            if peer is not None:
                peer.leave()


@pytest.mark.timeout(60)
def test_bf16_true_precision_is_refused_before_joining(tokenizer_dir, tmp_path):
    from pytorch_lightning import Trainer

    from convmodel.collaborative import HivemindStrategy
    from convmodel.models import BertPretraining

    strategy = HivemindStrategy(run_id="bf16_test", target_batch_size=16, **LOOPBACK)
    model = BertPretraining(tokenizer=tokenizer_dir, config={"hidden_size": 32, "num_hidden_layers": 1,
                                                             "num_attention_heads": 2, "intermediate_size": 64})
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=1, precision="bf16-true", max_steps=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))
    data = [{"input_ids": torch.ones(8, dtype=torch.long)}]
    with pytest.raises(UserError, match=r"trainer\.precision: bf16-true .*bf16-mixed"):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data))
    assert strategy.dht is None  # refused before anything started


def test_a_non_finite_averaged_gradient_is_skipped_before_clipping_and_stepping(capsys):
    """One NaN in the swarm's averaged gradient: clipping would spread it to every weight, the step to the
    parameters (sent to the other peers by the next state round). The rebuilt optimizer skips that step."""
    from convmodel.collaborative.optimizer_rebuild import rebuild_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    factory, groups = rebuild_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), clip_val=1.0,
                                        clip_algorithm="norm")
    inner = factory(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda epoch: 1.0)  # hivemind's schedule wraps step too
    params = [p for g in inner.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("nan")
    inner.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert "non-finite averaged gradient" in capsys.readouterr().err
    for p in params:  # a finite gradient steps, clipped to norm 1
        p.grad = torch.full_like(p, 10.0)
    inner.step()
    scheduler.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
    assert abs(float(torch.cat([p.grad.reshape(-1) for p in params]).norm()) - 1.0) < 1e-4


@pytest.mark.timeout(120)
class HeldStep:
    """An AdamW class whose steps wait until the test lets them go (hivemind rebuilds the optimizer from its class).

    `hold(peer, module)` steps the swarm until a collaborative epoch starts hivemind's background step,
    which then waits in `entered`; `release` lets it finish.
    """

    def __init__(self):
        import threading

        self.entered, self.release = threading.Event(), threading.Event()
        held = self

        class HeldAdamW(torch.optim.AdamW):
            def step(self, closure=None):
                if self.state:  # not hivemind's initial zero-gradient step
                    held.entered.set()
                    held.release.wait()
                return super().step(closure)

        self.optimizer_class = HeldAdamW

    def hold(self, peer: SwarmPeer, module: torch.nn.Module) -> None:
        for _ in range(100):
            for p in module.parameters():
                p.grad = torch.ones_like(p)
            peer.step(4)
            if self.entered.is_set():
                return
        pytest.fail("no collaborative epoch started the background step in 100 local steps")


def delayed_step_peer(run_id: str, module: torch.nn.Module, held: HeldStep) -> SwarmPeer:
    """A peer with the held optimizer and a schedule that halves the lr each collaborative epoch."""
    peer = SwarmPeer(SwarmOptions(run_id=run_id, target_batch_size=4, offload_optimizer=True,
                                  delay_optimizer_step=True, **LOOPBACK))
    optimizer = held.optimizer_class(module.parameters(), lr=1e-2)
    peer.join(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch))
    peer.report.start(peer.optimizer, peer.dht, peer._signer, 10.0)
    return peer


def test_a_checkpoint_waits_for_the_delayed_optimizer_step():
    """delay_optimizer_step: a checkpoint taken while hivemind's background step runs must hold its result."""
    import threading

    import pytorch_lightning as pl

    from convmodel.collaborative import HivemindStrategy

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 64)

    held = HeldStep()
    strategy = HivemindStrategy(run_id="ckpt_test", target_batch_size=4, offload_optimizer=True,
                                delay_optimizer_step=True, **LOOPBACK)
    module = Module()
    strategy.connect(module)
    peer = strategy.peer
    peer.join(held.optimizer_class(module.parameters(), lr=1e-2))
    try:
        peer.report.start(peer.optimizer, peer.dht, peer._signer, 10.0)
        before = module.layer.weight.detach().clone()
        held.hold(peer, module)
        saved = {}
        saver = threading.Thread(target=lambda: saved.update(strategy.lightning_module_state_dict()))
        saver.start()
        held.release.set()
        saver.join(60)
        assert not torch.equal(saved["layer.weight"], before)  # the step's result, not the parameters before it
    finally:
        held.release.set()
        peer.leave()


@pytest.mark.timeout(120)
def test_nan_guard_backup_and_restore_wait_for_the_delayed_optimizer_step(capsys):
    """Bug 3: a backup taken while hivemind's background step runs must hold that step's result, not a state
    torn between before and after; a restore must not be overwritten by it; and the restored learning rate is
    this epoch's, not the backup's."""
    import threading

    torch.manual_seed(0)
    module, held = torch.nn.Linear(64, 64), HeldStep()
    peer = delayed_step_peer("backup_test", module, held)
    try:
        held.hold(peer, module)
        before = module.weight.detach().clone()
        backup = threading.Thread(target=peer.guard.take_backup, args=(peer.optimizer,))
        backup.start()
        backup.join(2)
        assert backup.is_alive()  # it waits for the background step...
        held.release.set()
        backup.join(60)
        stepped = module.weight.detach().clone()
        assert not torch.equal(stepped, before)
        assert torch.equal(peer.guard._backup["params"][0], stepped)  # ...and holds its result
        # a restore waits for a step in flight too, and then holds the backup: nothing lands on top of it
        held.entered.clear()
        held.release.clear()
        held.hold(peer, module)
        restore = threading.Thread(target=peer.guard.restore, args=(peer.optimizer,))
        restore.start()
        restore.join(2)
        assert restore.is_alive()
        held.release.set()
        restore.join(60)
        assert torch.equal(module.weight.detach(), stepped)
        # this epoch's learning rate, not the backup's
        backup_lr = peer.guard._backup["optimizer"]["param_groups"][0]["lr"]
        lr = peer.optimizer.opt.param_groups[0]["lr"]
        assert lr == pytest.approx(1e-2 * 0.5 ** peer.optimizer.local_epoch) and lr != backup_lr, (lr, backup_lr)
    finally:
        held.release.set()
        peer.leave()


@pytest.mark.timeout(120)
def test_a_goodbye_record_is_stored_before_the_tracker_shutdown_returns():
    """The leaver's DHT stops right after its tracker's shutdown: the other peer must still read it as gone.

    hivemind sent the goodbye (value None) without waiting and the leave shut the DHT down next; in CI a
    3-peer survivor counted the leaver for 4 more epochs, until its last report expired.
    """
    stayer, _ = make_peer("goodbye_test", adamw())
    leaver = None
    try:
        leaver, _ = make_peer("goodbye_test", adamw(), seed=1, initial_peers=stayer.peer_addresses)
        key = leaver.optimizer.tracker.training_progress_key
        subkey = leaver.optimizer.tracker._local_public_key

        def leavers_record():
            found = stayer.dht.get(key, latest=True)
            entry = found.value.get(subkey) if found is not None and isinstance(found.value, dict) else None
            return entry.value if entry is not None else "absent"

        tracker = leaver.optimizer.tracker
        tracker.report_local_progress(tracker.local_progress.epoch, samples_accumulated=8)  # as after a batch
        for _ in range(100):  # the leaver's report reaches the stayer's DHT
            if isinstance(leavers_record(), dict):
                break
        else:
            pytest.fail("the leaver's progress report never reached the other peer")
        tracker.shutdown()
        leaver.dht.shutdown()
        assert leavers_record() is None
    finally:
        for peer in (leaver, stayer):
            if peer is not None:
                peer.leave()
