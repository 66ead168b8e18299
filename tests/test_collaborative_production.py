"""The production options with real peers: configs/collaborative/lean-albert-tiny.yaml, two and three trainers.

Offloaded 8-bit LAMB, delayed optimizer step, delayed gradient and state averaging, state
averaged every 5 epochs, size-adaptive compression (one matrix of 65536 weights goes in 8 bits,
the rest in fp16), gradient clipping and bf16-mixed, as users start them from the CLI. A probe
callback (written by the test, loaded by class_path) records a fingerprint of the parameters at
the first batch of each collaborative epoch, so the test sees whether every epoch changed them.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind")

from test_collaborative import (  # noqa: E402, F401
    REPO,
    STARTUP_S,
    Peer,
    collaborative_run_args,
    shards,
    validation_loss,
    wait_for_file,
)

CONFIG = REPO / "configs" / "collaborative" / "lean-albert-tiny.yaml"
# 2 blocks of width 64; the GEGLU matrix (2 x 512 x 64 = 65536 weights) is the one size-adaptive sends in 8 bits
TINY_ALBERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512,
               "embedding_size": 32, "max_position_embeddings": 64}
LAST_EPOCH = 20  # four state rounds (average_state_every: 5)
LAST = Path("runs") / "checkpoints" / "last.ckpt"  # the shipped RunCheckpoint's, under our logger's save_dir

PROBE = '''
import hashlib, json, os, time
from pytorch_lightning import Callback

class EpochProbe(Callback):
    """At the first batch of each collaborative epoch: the epoch and a hash of every parameter.

    With `hold_until`: at collaborative epoch `hold_at`, say so in `path + ".holding"` and wait
    until that file exists (the test writes it once both peers hold), so that the peers start
    training together instead of one running epochs alone and the other catching up.
    """

    def __init__(self, path: str, hold_until: str | None = None, hold_at: int = 2):
        self.path, self.epoch, self.hold_until, self.hold_at = path, None, hold_until, hold_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.strategy.hivemind_optimizer
        if opt is None or opt.local_epoch == self.epoch:
            return
        self.epoch = opt.local_epoch
        if self.hold_until and self.epoch >= self.hold_at:
            open(self.path + ".holding", "w").write(str(self.epoch))
            while not os.path.exists(self.hold_until):
                time.sleep(0.1)
            self.hold_until = None
        trainer.strategy.peer.finish_delayed_updates()  # the parameters after the last step, not before it lands
        digest, sample = hashlib.sha1(), []
        for p in pl_module.parameters():
            values = p.detach().float().cpu().reshape(-1)
            digest.update(values.numpy().tobytes())
            sample += values[::max(1, values.numel() // 64)].tolist()  # about 64 values of each tensor
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "params": digest.hexdigest(), "sample": sample}) + "\\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches = getattr(self, "batches", 0) + 1
        self.samples = getattr(self, "samples", 0) + len(batch["input_ids"])

    def on_train_end(self, trainer, pl_module):
        # what this peer trained on, and what it counted toward the swarm's target batch size
        counted = trainer.strategy.peer.report.samples_contributed
        with open(self.path + ".counts", "w") as f:
            json.dump({"batches": self.batches, "samples": self.samples, "counted": counted,
                       "optimizer_steps": trainer.global_step}, f)
'''


def production_args(shards: Path, tokenizer_dir: str, hold_until: str | None = None,  # noqa: F811
                    **strategy) -> list[str]:
    """The shipped tiny production config with a smaller model, our shards, a checkpoint every step, the probe."""
    probe = {"class_path": "epoch_probe.EpochProbe", "init_args": {"path": "probe.jsonl", "hold_until": hold_until}}
    return collaborative_run_args(CONFIG, TINY_ALBERT, shards, tokenizer_dir, callbacks=[probe], every_step_checkpoint=False,
                                  **{"max_collaborative_epochs": LAST_EPOCH, "peers_file": "peers.txt", **strategy})


def probe_records(peer: Peer) -> list[dict]:
    path = peer.workdir / "probe.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_swarm(tmp_path: Path, shards: Path, tokenizer_dir: str, names: list[str],  # noqa: F811
                extra: tuple[str, ...] = ()) -> list[Peer]:
    """Start the peers (the first writes peers.txt, the others join it), hold all at epoch 2 until all are
    there (alone the first takes about 0.5 s an epoch; a joiner that runs epochs alone makes the others skip
    them to catch up), let them go, and wait for each to exit 0."""
    (tmp_path / "epoch_probe.py").write_text(PROBE)
    go, peers = str(tmp_path / "go"), []
    try:
        peers.append(Peer(tmp_path / names[0], [*production_args(shards, tokenizer_dir, hold_until=go), *extra]))
        address = wait_for_file(tmp_path / names[0] / "peers.txt", peers[0], STARTUP_S).split()[0]
        for name in names[1:]:
            peers.append(Peer(tmp_path / name, [*production_args(shards, tokenizer_dir, hold_until=go,
                                                                 initial_peers=[address]), *extra]))
        for peer in peers[1:]:
            peer.wait_for(r"joined run 'lean_albert_tiny' at collaborative epoch", STARTUP_S)
        for peer in peers:
            wait_for_file(peer.workdir / "probe.jsonl.holding", peer, 60)
        Path(go).write_text("")
        for peer in reversed(peers):
            assert peer.wait_exit(300) == 0, peer.output()[-4000:]
    finally:
        for peer in peers:
            peer.kill()
    return peers


@pytest.fixture
def probe_on_path(tmp_path, monkeypatch):
    """The peers import the probe callback from tmp_path."""
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.mark.timeout(480)
def test_two_peers_train_with_the_production_options(shards, tokenizer_dir, tmp_path, probe_on_path):  # noqa: F811
    check_swarm_trained(train_swarm(tmp_path, shards, tokenizer_dir, ["first", "second"]), shards, tokenizer_dir)


@pytest.mark.timeout(600)
def test_accumulated_batches_all_count_toward_the_swarms_target(shards, tokenizer_dir, tmp_path,  # noqa: F811
                                                                 probe_on_path):
    """Two peers, each accumulating 2 local batches per optimizer step (clipping and bf16-mixed come with the
    config): every batch's samples count toward the swarm's target, not only the last one's, and each
    collaborative epoch changes the parameters.

    Not "they train together": peers accumulating batches were seen not to count each other (2 peers: "1 peer"
    in every epoch of two runs; 3 peers: together in one run on CI, apart in three), while the same peers
    without accumulation do (the test above). Left open; the shipped collaborative configs accumulate 1.
    """
    peers = train_swarm(tmp_path, shards, tokenizer_dir, ["first", "second"], ("--trainer.accumulate_grad_batches", "2"))
    for peer in peers:
        counts = json.loads((peer.workdir / "probe.jsonl.counts").read_text())
        assert counts["batches"] == 2 * counts["optimizer_steps"] and counts["counted"] == counts["samples"], counts
        assert not re.search(r'File "[^"]*/(convmodel|pytorch_lightning)/', peer.output()), peer.output()[-4000:]
    records = probe_records(peers[0])[1:]
    unchanged = [(a["epoch"], b["epoch"]) for a, b in zip(records, records[1:]) if a["params"] == b["params"]]
    assert len(records) >= 5 and len(unchanged) <= 1, (unchanged, peers[0].output()[-3000:])


def check_swarm_trained(peers: list[Peer], shards: Path, tokenizer_dir: str) -> None:  # noqa: F811
    """Every epoch changed the parameters, the peers agree after the last state round, the swarm learned."""
    for peer in peers:
        output = peer.output()
        training = output.split(f"collaborative epoch {LAST_EPOCH} (")[0]
        # nothing failed in our code or Lightning's. hivemind logs a traceback for a round that formed no
        # group; on this 2-core machine, shared with other test runs (load average 3-6), up to 2 of the 20
        # rounds formed no group (around the first state round) or lost parts in a run, none in others
        assert not re.search(r'File "[^"]*/(convmodel|pytorch_lightning)/', training), training[-4000:]
        for problem in (r"Reducer: received", r"\[ERROR\].*Averaging step failed"):
            assert len(re.findall(problem, training)) <= 3, training[-4000:]
        # the collaborative epochs change the parameters. Not the first one: the first peer's step from epoch
        # 0 has lr 0 (the warmup starts there) and the joiner's first epoch follows the swarm's. And a peer
        # that found itself an epoch behind around the join catches up without a step of its own (hivemind
        # moves its epoch on; the lr line repeats): once at most. Offloaded state on the wrong device or a
        # failing background step would leave every epoch unchanged. A peer that fell behind under load (CI's
        # loaded 2-core machine, 3 peers) downloads the swarm's state and skips the epochs it missed: one kept
        # 8 records of 20 there, so at least 5 of its own, and the swarm's peers together saw most epochs
        records = probe_records(peer)[1:]
        unchanged = [(a["epoch"], b["epoch"]) for a, b in zip(records, records[1:]) if a["params"] == b["params"]]
        assert len(records) >= 5 and len(unchanged) <= 1, (unchanged, output[-3000:])
    seen = {record["epoch"] for peer in peers for record in probe_records(peer)}
    assert len(seen) >= LAST_EPOCH // 2, sorted(seen)
    lost = [len(re.findall(r"received [\d.]+% of input tensors", peer.output())) for peer in peers]
    print(f"averaging rounds that lost parts, per peer: {lost}")
    together = len(peers)
    seconds = [float(s) for s in re.findall(rf"collaborative epoch \d+ \({together} peers, lr [^,]+, ([\d.]+) s",
                                            peers[-1].output())]
    print(f"seconds per collaborative epoch of the last peer with {together} peers: {seconds}")
    # they trained together: some peer counted all of them for 3 epochs or more (under load a peer's own
    # count can drop for a while; test_peer_dir saw that with 3 peers)
    assert max(len(re.findall(rf"\({together} peers", peer.output())) for peer in peers) >= 3, lost
    # every run ends with its final state saved by the shipped RunCheckpoint (every_n_train_steps 200: only the
    # end of the run writes it here) and says where it went
    for peer in peers:
        summary = peer.output().split("[convmodel] fit finished at step")[-1]
        assert "[convmodel] fit finished at step" in peer.output() and f"checkpoint:  {LAST}" in summary, \
            peer.output()[-3000:]
    ckpts = [torch.load(peer.workdir / LAST, map_location="cpu", weights_only=False) for peer in peers]
    assert [c["optimizer_states"][0]["state"]["local_epoch"] for c in ckpts] == [LAST_EPOCH] * len(peers)
    # the 8-bit moments survived the swarm as uint8 codes
    inner = ckpts[1]["optimizer_states"][0]["state"]
    codes = [s["exp_avg_q"] for s in inner.values() if isinstance(s, dict) and "exp_avg_q" in s]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    # the peers agree after the last state round (epoch 20; its delayed results were applied before the
    # checkpoint): within a small part of each tensor's spread and size (the one matrix sent in 8 bits: 256 bins
    # over mean +- 6 sigma, a bin is 0.047 sigma; the rest in fp16). Peers that trained apart differ by far more.
    # Not within fp16's error element by element: on CI's loaded machine one of 3 peers missed part of the
    # last round and one bias differed by more than 2e-3 in a few elements
    from convmodel.collaborative.compression import SIZE_ADAPTIVE_THRESHOLD
    from convmodel.models.lean_albert_pretraining import LeanAlbertPretraining

    first_params = ckpts[0]["state_dict"]
    assert any(value.numel() >= SIZE_ADAPTIVE_THRESHOLD for value in first_params.values()), \
        "no tensor large enough for size-adaptive's 8-bit branch"
    for other in ckpts[1:]:
        for name, value in first_params.items():
            difference = (value.float() - other["state_dict"][name].float()).abs()
            # a part of the spread, or of the size for tensors whose values sit together (a LayerNorm's weights
            # near 1: std 0.013; a 3-peer run differed there by 0.13% of the value, mean 0.0013)
            spread = float(value.float().std()) if value.numel() > 1 else 0.0
            bound = 0.05 * spread + 0.01 * float(value.float().abs().mean()) + 1e-6
            assert float(difference.mean()) <= bound, (name, float(difference.mean()), bound)
    # the swarm learned
    torch.manual_seed(0)
    hparams = {k: v for k, v in ckpts[0]["hyper_parameters"].items() if not k.startswith("_")}
    untrained = LeanAlbertPretraining(**{**hparams, "tokenizer": tokenizer_dir})
    trained = LeanAlbertPretraining.load_from_checkpoint(peers[0].workdir / LAST,
                                                         map_location="cpu", tokenizer=tokenizer_dir)
    before, after = validation_loss(untrained, shards, tokenizer_dir), validation_loss(trained, shards, tokenizer_dir)
    print(f"validation loss untrained {before:.3f}, after {LAST_EPOCH} collaborative epochs {after:.3f}")
    # an untrained model stays at ~ln(vocab) = 6.9; 15 epochs reached 6.70 in one run, so 0.2 nats below is
    # learning, with room for a slower run
    assert after < before - 0.2, (before, after)
