"""A downloaded swarm state that does not fit this peer is refused before any of it is applied.

The unit tests check the comparisons on real tensors and real model configs; the swarm test starts a
real first peer and a joiner of the same run_id with another hidden size, which must stop with one
error naming the setting, the serving peer and both values (before, hivemind retried the download
forever, one traceback per try, and the joiner never exited).
"""

import json
import math
import re

import pytest
import torch

pytest.importorskip("hivemind")

from test_collaborative import STARTUP_S, TINY_BERT, Peer, peer_args, shards, wait_for_file  # noqa: E402, F401

from convmodel.collaborative.state_check import (  # noqa: E402
    first_non_finite,
    model_schema,
    parameter_names,
    schema_mismatch,
    state_mismatch,
)


def test_a_state_of_another_shape_or_dtype_or_count_is_named():
    own = [torch.zeros(4, 8), torch.zeros(8), torch.zeros(3, dtype=torch.uint8)]
    names = ["encoder.weight", "encoder.bias"]
    assert state_mismatch(own, [t.clone() for t in own], names) is None
    wider = [torch.zeros(4, 16), torch.zeros(8), torch.zeros(3, dtype=torch.uint8)]
    assert state_mismatch(own, wider, names).startswith("the swarm's encoder.weight is [4, 16] float32, "
                                                        "this peer's [4, 8] float32; peers of one run_id")
    # shapes that broadcast (copy_ would take them silently) are refused too
    assert "encoder.bias is [1]" in state_mismatch(own, [own[0], torch.zeros(1), own[2]], names)
    codes = [own[0], own[1], torch.zeros(3)]
    assert "tensor 2 of the state is [3] float32, this peer's [3] uint8" in state_mismatch(own, codes, names)
    assert state_mismatch(own, own[:2], names).startswith("the swarm's state has 2 tensors, this peer's model "
                                                          "and optimizer 3")


def test_a_non_finite_tensor_is_found_by_name():
    state = [torch.zeros(2), torch.tensor([1.0, math.nan]), torch.zeros(2, dtype=torch.uint8)]
    assert first_non_finite(state, ["a", "b"]) == "b"
    assert first_non_finite([torch.tensor([math.inf])], []) == "tensor 0 of the state"
    assert first_non_finite(state[:1] + state[2:], ["a"]) is None


def test_a_schema_names_the_settings_that_differ_and_ignores_floats_and_runtime_switches():
    from types import SimpleNamespace

    from transformers import BertConfig

    def schema(**settings):
        config = BertConfig(**{**TINY_BERT, **settings})
        return model_schema(SimpleNamespace(model=SimpleNamespace(config=config)), torch.optim.AdamW([torch.zeros(1)]))

    own = schema()
    assert own["hidden_size"] == TINY_BERT["hidden_size"] and own["optimizer"] == "AdamW"
    assert schema_mismatch(own, {**schema(hidden_dropout_prob=0.5, use_cache=False), "peer": "12D3KooWx"}) is None
    served = {**schema(hidden_size=64, num_attention_heads=4), "peer": "12D3KooWx"}
    message = schema_mismatch(own, served)
    assert message.startswith(f"peer 12D3KooWx serves hidden_size 64, num_attention_heads 4; this config has "
                              f"hidden_size {TINY_BERT['hidden_size']}, num_attention_heads "
                              f"{TINY_BERT['num_attention_heads']}; peers of one run_id"), message
    sgd = {**own, "optimizer": "SGD"}
    assert "serves optimizer SGD; this config has optimizer AdamW" in schema_mismatch(own, sgd)


def test_parameter_names_follow_the_optimizers_order():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD([{"params": [module[1].weight, module[0].bias]},
                                 {"params": [module[0].weight]}], lr=0.1)
    assert parameter_names(module, optimizer) == ["1.weight", "0.bias", "0.weight"]


@pytest.mark.timeout(300)
def test_a_joiner_with_another_hidden_size_stops_with_one_error_naming_it(shards, tokenizer_dir,  # noqa: F811
                                                                          tmp_path):
    first = joiner = None
    swarm = dict(target_batch_size=32, max_collaborative_epochs=10_000, matchmaking_time=1.0, load_state_timeout=30.0)
    try:
        first = Peer(tmp_path / "first", peer_args(shards, tokenizer_dir, peers_file="peers.txt", **swarm))
        address = wait_for_file(tmp_path / "first" / "peers.txt", first, STARTUP_S).split()[0]
        first.wait_for(r"collaborative epoch 2 \(", STARTUP_S)  # it has a state to serve
        wider = {**TINY_BERT, "hidden_size": 64}
        args = peer_args(shards, tokenizer_dir, initial_peers=[address], **swarm)
        args[args.index("--model.init_args.config") + 1] = json.dumps(wider)
        joiner = Peer(tmp_path / "joiner", args)
        status = joiner.wait_exit(STARTUP_S + swarm["load_state_timeout"])
        epoch = max(int(e) for e in re.findall(r"collaborative epoch (\d+) \(", first.output()))
        first.wait_for(rf"collaborative epoch {epoch + 2} \(", 120)  # the first peer trains on
    finally:
        for peer in (first, joiner):
            if peer is not None:
                peer.kill()
    output = joiner.output()
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1, output[-4000:]
    # the serving peer's schema came with its state: the error names the setting, the peer and both values
    assert re.match(r"error: trainer\.strategy[\w.]*: cannot join run 'bert_tiny': peer 12D3\w+ serves hidden_size 32; "
                    r"this config has hidden_size 64; peers of one run_id must train one model", errors[0]), errors[0]
    assert "Failed to load state from peers" not in output and "must match the size" not in output, output[-4000:]


def test_a_checkpoint_of_another_run_is_refused_with_the_run_ids():
    from convmodel.collaborative.run_identity import check_checkpoint_run, record_run
    from convmodel.errors import UserError

    checkpoint = {"convmodel": {"vocab_size": 1000}}
    record_run(checkpoint, "bert_tiny", 6)
    assert checkpoint["convmodel"] == {"vocab_size": 1000, "collaborative": {"run_id": "bert_tiny", "epoch": 6}}
    check_checkpoint_run(checkpoint, "bert_tiny")
    check_checkpoint_run({"convmodel": {}}, "bert_tiny")  # saved before runs were recorded: taken as it is
    with pytest.raises(UserError, match=r"saved in run 'bert_tiny', but trainer\.strategy\.init_args\.run_id is "
                                        r"'other'; resume it with run_id 'bert_tiny'"):
        check_checkpoint_run(checkpoint, "other")
