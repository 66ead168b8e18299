"""Gradient rounds with delay_grad_averaging: a round meets only rounds of its own collaborative epoch.

hivemind 1.1.12 paired one peer's round of epoch e with the other's round of e + 1 once a round
was missed, and the offset lasted (convmodel/collaborative/epoch_groups.py): in the production
config's two-peer runs one peer's rounds lost half their parts every epoch after the first state
round. The first tests run two real gradient averagers (their own processes, DHTs on 127.0.0.1)
and check which rounds average together; the last trains two peers with the shipped config.
"""

import os
import re
from pathlib import Path

import pytest
import torch

hivemind = pytest.importorskip("hivemind")

from test_collaborative import STARTUP_S, Peer, shards, wait_for_file  # noqa: E402, F401
from test_collaborative_compression import two_dhts  # noqa: E402
from test_collaborative_production import LAST_EPOCH, PROBE, REPO, production_args  # noqa: E402

from convmodel.collaborative.swarm_optimizer import sample_weighted_averager_class  # noqa: E402

ROUND_TIMEOUT = 6.0  # seconds a round looks for its group (matchmaking takes 1 s on loopback)


def round_between(epochs: tuple[int, int], prefix: str) -> tuple[list, list[torch.Tensor]]:
    """One gradient round on each of two averagers, scheduled for `epochs`; their outcomes and gradients after.

    Each peer's gradient is a constant (0 on the first, 2 on the second): averaged together both hold 1.
    An outcome is the round's gathered epochs, or the exception it failed with.
    """
    outcomes, grads = [], []
    with two_dhts() as dhts:
        averagers = []
        try:
            for value, (dht, epoch) in enumerate(zip(dhts, epochs)):
                param = torch.nn.Parameter(torch.zeros(1000))
                param.grad = torch.full((1000,), 2.0 * value)
                averager = sample_weighted_averager_class()(
                    [param], dht=dht, prefix=prefix, target_group_size=2, min_group_size=2,
                    min_matchmaking_time=1.0, request_timeout=0.5, start=True)
                averager.round_epoch = epoch
                averager.accumulate_grads_(batch_size=8)
                averagers.append(averager)
            # both look for a group at once, as a peer's round of epoch e still pending meets the other's next one
            controls = [a.schedule_step(timeout=ROUND_TIMEOUT) for a in averagers]
            for averager, control in zip(averagers, controls):
                averager.step(control=control, wait=False)
            for control in controls:
                try:
                    outcomes.append(sorted(control.result(timeout=ROUND_TIMEOUT + 30).values(), key=repr))
                except Exception as exc:  # the round formed no group
                    outcomes.append(exc)
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    grads.append(tensors[0].clone())
        finally:
            for averager in averagers:
                averager.shutdown()
    return outcomes, grads


@pytest.mark.timeout(120)
def test_rounds_of_the_same_epoch_average_together():
    outcomes, grads = round_between((7, 7), prefix="epoch_rounds_same")
    assert outcomes == [[7, 7], [7, 7]], outcomes
    for grad in grads:
        assert torch.allclose(grad, torch.ones_like(grad)), grad[:4]


@pytest.mark.timeout(120)
def test_a_round_never_averages_with_a_round_of_the_next_epoch():
    """The pairing that kept the peers an epoch apart: round 5 of one with round 6 of the other."""
    outcomes, grads = round_between((5, 6), prefix="epoch_rounds_apart")
    assert all(isinstance(outcome, Exception) for outcome in outcomes), outcomes  # no group: local gradients
    assert torch.allclose(grads[0], torch.zeros_like(grads[0])), grads[0][:4]  # each kept its own gradient
    assert torch.allclose(grads[1], torch.full_like(grads[1], 2.0)), grads[1][:4]


@pytest.mark.skip(reason="issue 13 not closed: with epoch-keyed rounds 1 of 3 runs still had a chain of "
                         "'could not find a group' rounds (10 s each) and 3 rounds that lost parts")
@pytest.mark.timeout(480)
def test_two_peers_with_delayed_gradient_averaging_lose_no_parts(shards, tokenizer_dir, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    """The shipped options as they are (delay_grad_averaging on): no round loses parts after the join."""
    (tmp_path / "epoch_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", ":".join(filter(None, [str(tmp_path), str(REPO),
                                                            os.environ.get("PYTHONPATH")])))
    first = second = None
    try:
        go = str(tmp_path / "go")
        first = Peer(tmp_path / "first", production_args(shards, tokenizer_dir, hold_until=go))
        address = wait_for_file(tmp_path / "first" / "peers.txt", first, STARTUP_S).split()[0]
        second = Peer(tmp_path / "second", production_args(shards, tokenizer_dir, hold_until=go,
                                                           initial_peers=[address]))
        second.wait_for(r"joined run 'lean_albert_tiny' at collaborative epoch", STARTUP_S)
        for peer in (first, second):
            wait_for_file(peer.workdir / "probe.jsonl.holding", peer, 60)
        Path(go).write_text("")
        assert second.wait_exit(300) == 0, second.output()[-4000:]
        assert first.wait_exit(120) == 0, first.output()[-4000:]
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.kill()
    for peer in (first, second):
        output = peer.output()
        lost = re.findall(r"received [\d.]+% of input tensors|Reducer: received [\d.]+%", output)
        assert not lost, (lost, output[-4000:])
        epochs = [int(e) for e in re.findall(r"collaborative epoch (\d+) \(2 peers", output)]
        assert epochs and max(epochs) == LAST_EPOCH, output[-3000:]
