"""`algorithm: diloco` with real trainer processes on 127.0.0.1, started from the CLI with the shipped config.

configs/collaborative/bert-tiny-diloco.yaml at test size (the tests' tiny BERT, 5 inner steps a round).
Each round prints "DiLoCo round R (P peers, S samples, T s, outer FINGERPRINT, lr X)": the tests compare
the two peers' lines round by round, and read their checkpoints.
"""

import os
import re
import signal

import pytest
import torch

pytest.importorskip("hivemind")

from test_collaborative import (  # noqa: E402, F401
    REPO,
    STARTUP_S,
    TINY_BERT,
    Peer,
    checkpoint,
    collaborative_run_args,
    scalars,
    shards,
    wait_for_file,
)

CONFIG = REPO / "configs" / "collaborative" / "bert-tiny-diloco.yaml"
ROUND_LINE = re.compile(r"DiLoCo round (\d+) \((\d+) peers?, ([\d.]+) samples, ([\d.]+) s, outer (\w+)(?:, lr ([^,)]+))?")
H, BATCH, PAIRED = 5, 8, 4  # rounds of 5 inner steps of 8 samples; the second is killed after 4 rounds together
SLACK_S = 15.0  # a loaded 2-core machine; a round itself takes 1-4 s here
# a group of 2 starts as soon as both are in it; the long window only bounds a round without a partner
DILOCO = dict(inner_steps=H, max_collaborative_epochs=1_000_000, matchmaking_time=6.0, averaging_timeout=20.0,
              target_group_size=2, load_state_timeout=30.0)


def rounds(peer: Peer) -> dict[int, tuple[int, float, str, float | None, float]]:
    """round -> (peers, samples, outer fingerprint after it, lr, seconds since the previous round line) from the
    peer's round lines (no lr: a joiner that joined the round's all-reduce before any inner step)."""
    return {int(r): (int(p), float(s), f, float(lr) if lr else None, float(seconds))
            for r, p, s, seconds, f, lr in ROUND_LINE.findall(peer.output())}


def diloco_args(shard_dir, tokenizer_dir, **strategy) -> list[str]:
    return [*collaborative_run_args(CONFIG, TINY_BERT, shard_dir, tokenizer_dir, **{**DILOCO, **strategy}),
            "--model.init_args.total_steps", "100000", "--trainer.max_steps", "1000000"]


@pytest.mark.timeout(400)
def test_a_joiner_takes_the_outer_state_mid_round_and_both_hold_the_same_outer_weights_until_one_is_killed(
        shards, tokenizer_dir, tmp_path):  # noqa: F811
    """The first peer trains alone (a round without a partner steps at once); the second joins mid-round.

    The joiner gets the round under way and the step in it, so it ends that round with the first (sending
    weight 0: the round's samples are the first peer's alone) and every later round pairs: the same outer
    weights, the same global inner step and so the same inner learning rate on both. Then the second is
    SIGKILLed: the first loses one round's averaging_timeout and rounds alone from the next. Ctrl-C ends it
    with a checkpoint holding the outer state.
    """
    first = second = None
    try:
        first = Peer(tmp_path / "first", diloco_args(shards, tokenizer_dir, peers_file="peers.txt"))
        address = wait_for_file(tmp_path / "first" / "peers.txt", first, STARTUP_S).split()[0]
        first.wait_for_condition(lambda: 0 in rounds(first), STARTUP_S, "round 0")
        second = Peer(tmp_path / "second", diloco_args(shards, tokenizer_dir, initial_peers=[address]))
        joined = second.wait_for(r"DiLoCo: joined at round (\d+), inner step (\d+)", STARTUP_S)
        joined_round, joined_step = int(joined.group(1)), int(joined.group(2))
        second.wait_for_condition(lambda: max(rounds(second), default=-1) >= joined_round + PAIRED, 120,
                                  f"{PAIRED} rounds together")
        os.killpg(second.process.pid, signal.SIGKILL)
        second.process.wait(timeout=30)
        killed_at = max(rounds(first))
        first.wait_for_condition(lambda: max(rounds(first)) >= killed_at + 3, 120, "3 rounds after the kill")
        os.kill(first.process.pid, signal.SIGINT)
        assert first.wait_exit(90) == 0, first.output()[-4000:]
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.kill()
    ours, theirs = rounds(first), rounds(second)
    assert sorted(ours) == list(range(len(ours))), first.output()[-4000:]
    after_kill = [ours[number] for number in range(killed_at + 1, max(ours) + 1)]
    # the round the dead peer missed waited one averaging_timeout; from the next on the first rounds alone
    assert after_kill[0][0] == 1 and after_kill[0][4] < DILOCO["averaging_timeout"] + SLACK_S, first.output()[-4000:]
    assert all(r[0] == 1 and r[4] < SLACK_S for r in after_kill[1:]), first.output()[-4000:]
    theirs = {number: r for number, r in theirs.items() if number <= killed_at}
    both = sorted(set(ours) & set(theirs))
    assert both[0] == joined_round and len(both) >= PAIRED, (both, second.output()[-4000:])
    # joined mid-round, the joiner's first round counts the first peer's samples only (at step 0: both peers')
    assert ours[joined_round][1] == (H * BATCH if joined_step > 0 else 2 * H * BATCH), (joined_step, ours)
    for number in both:
        assert ours[number][0] == theirs[number][0] == 2, (number, ours[number], theirs[number])
        assert ours[number][2] == theirs[number][2], f"round {number}: the outer weights differ"
        if theirs[number][3] is not None:
            assert ours[number][3] == pytest.approx(theirs[number][3]), f"round {number}: the inner lr differs"
    assert len({r[2] for r in ours.values()}) == len(ours)  # every round moved them
    state = checkpoint(first)["diloco"]
    assert state["round"] == max(ours) + 1  # the checkpoint holds the outer state after the last round
    # TensorBoard: the synchronous mode's tags, the round as collab/epoch, and the bytes of the all-reduces
    # the last step logged may come before the last round ended (Ctrl-C after it): that round or the next
    assert scalars(first, "collab/epoch")[-1][1] in (max(ours), max(ours) + 1)
    assert {value for _, value in scalars(first, "collab/peers")} >= {1.0, 2.0}
    assert scalars(first, "collab/bytes_sent")[-1][1] > 0


@pytest.mark.timeout(400)
def test_a_resumed_diloco_peer_continues_as_the_uninterrupted_run(shards, tokenizer_dir, tmp_path):  # noqa: F811
    """12 inner steps straight, and 6 then a resume to 12, alone (rounds step at once): the checkpoint at step 6
    holds round 1 and the step in it, so the resumed peer ends round 1 at step 10 as the uninterrupted one did,
    with the same outer weights, outer momentum and model weights (no dropout: its generator is not saved).
    The step-6 checkpoint exports the outer weights."""
    model = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    at_6 = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",  # the uninterrupted run's step 6, kept
            "init_args": {"dirpath": "at-6", "every_n_train_steps": 6, "save_top_k": -1}}

    def run(folder: str, *extra: str) -> Peer:
        peer = Peer(tmp_path / folder, [*collaborative_run_args(CONFIG, model, shards, tokenizer_dir, [at_6],
                                                                **DILOCO),
                                        "--model.init_args.total_steps", "20", "--trainer.max_steps", "12", *extra])
        try:
            assert peer.wait_exit(STARTUP_S) == 0, peer.output()[-4000:]
        finally:
            peer.kill()
        return peer

    whole = checkpoint(run("whole"))
    (step_6,) = (tmp_path / "whole" / "at-6").glob("*step=6.ckpt")
    resumed = run("split", "--ckpt_path", str(step_6))
    split = checkpoint(resumed)
    assert sorted(rounds(resumed)) == [1]  # round 1 ended after the resume, at its step 10
    for ckpt in (whole, split):
        assert (ckpt["global_step"], ckpt["diloco"]["round"], ckpt["diloco"]["inner_step"]) == (12, 2, 2)
    for a, b in zip(whole["diloco"]["outer"], split["diloco"]["outer"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    momenta = [[state["momentum_buffer"] for state in ckpt["diloco"]["optimizer"]["state"].values()]
               for ckpt in (whole, split)]
    assert len(momenta[0]) == len(whole["diloco"]["outer"])
    for a, b in zip(*momenta, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for name, value in whole["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][name], value, rtol=1e-4, atol=1e-5)

    # exported mid-round (round 1, step 1), the model is the swarm's outer weights, not the peer's inner ones
    from transformers import AutoModelForMaskedLM

    from convmodel.export import export_model

    mid_round, name = torch.load(step_6, map_location="cpu", weights_only=True), "model.bert.embeddings.word_embeddings.weight"
    assert mid_round["diloco"]["inner_step"] == 1
    assert not torch.equal(mid_round["state_dict"][name], mid_round["diloco"]["outer"][0])
    exported = AutoModelForMaskedLM.from_pretrained(export_model(str(step_6), str(tmp_path / "hf")))
    torch.testing.assert_close(exported.bert.embeddings.word_embeddings.weight, mid_round["diloco"]["outer"][0])


def test_diloco_refuses_the_synchronous_optimizer_switches_and_bad_values_in_one_message():
    from convmodel.collaborative.swarm_options import SwarmOptions
    from convmodel.errors import UserError

    with pytest.raises(UserError) as raised:
        SwarmOptions(algorithm="diloco", inner_steps=0, outer_momentum=1.0, offload_optimizer=True,
                     pseudo_gradient_compression="zip").check()
    message = str(raised.value)
    for part in ("trainer.strategy.init_args", "inner_steps must be an integer >= 1", "outer_momentum in [0, 1)",
                 "pseudo_gradient_compression must be one of", "offload_optimizer is an option of algorithm "
                 "synchronous"):
        assert part in message, message
    with pytest.raises(UserError, match="algorithm must be one of synchronous, diloco"):
        SwarmOptions(algorithm="dilocoo").check()


XLARGE = REPO / "configs" / "collaborative" / "lean-albert-xlarge-diloco.yaml"


@pytest.mark.timeout(400)
def test_two_peers_train_with_the_xlarge_diloco_configs_options(shards, tokenizer_dir, tmp_path):  # noqa: F811
    """configs/collaborative/lean-albert-xlarge-diloco.yaml at tiny size: 8-bit LAMB inner steps in bf16-mixed,
    accumulating 2 batches and clipped, size-adaptive pseudo-gradients (the GEGLU matrix in 8 bits), on
    127.0.0.1 without the internet options. The two peers pair with the same outer weights and inner lr, and
    every parameter moves: each outer momentum buffer is non-zero."""
    from test_collaborative_production import TINY_ALBERT

    loopback = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, use_auto_relay=False, nat_port_map=False,
                    auto_nat=False, bootstrap_timeout=30.0)

    def args(**strategy) -> list[str]:
        return [*collaborative_run_args(XLARGE, TINY_ALBERT, shards, tokenizer_dir,
                                        **{**DILOCO, **loopback, "inner_steps": 3, **strategy}),
                "--data.objective", "mlm", "--data.whole_word_mask", "false", "--data.num_workers", "0",
                "--trainer.accelerator", "cpu", "--trainer.accumulate_grad_batches", "2",
                "--trainer.limit_val_batches", "2", "--model.init_args.total_steps", "100000",
                "--trainer.max_steps", "1000000"]

    first = second = None
    try:
        first = Peer(tmp_path / "first", args(peers_file="peers.txt"))
        address = wait_for_file(tmp_path / "first" / "peers.txt", first, STARTUP_S).split()[0]
        second = Peer(tmp_path / "second", args(initial_peers=[address]))
        joined = int(second.wait_for(r"DiLoCo: joined at round (\d+)", STARTUP_S).group(1))
        second.wait_for_condition(lambda: max(rounds(second), default=-1) >= joined + PAIRED - 1, 180,
                                  f"{PAIRED} rounds together")
        for peer in (second, first):
            os.kill(peer.process.pid, signal.SIGINT)
        for peer in (second, first):
            assert peer.wait_exit(90) == 0, peer.output()[-4000:]
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.kill()
    ours, theirs = rounds(first), rounds(second)
    both = [n for n in sorted(set(ours) & set(theirs)) if n > joined]
    assert len(both) >= PAIRED - 1, (ours, theirs)
    for number in both:
        assert ours[number][0] == theirs[number][0] == 2, (number, ours[number], theirs[number])
        assert ours[number][2] == theirs[number][2], f"round {number}: the outer weights differ"
        assert ours[number][3] == pytest.approx(theirs[number][3]), f"round {number}: the inner lr differs"
    state = checkpoint(second)["diloco"]
    momenta = [entry["momentum_buffer"] for entry in state["optimizer"]["state"].values()]
    assert len(momenta) == len(state["outer"])
    assert all(bool(m.abs().sum() > 0) for m in momenta), "a parameter never moved"
