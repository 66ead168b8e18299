"""The auxiliary peer and a client-mode trainer in a DiLoCo swarm, real processes on 127.0.0.1.

configs/collaborative/bert-tiny-diloco.yaml at test size (test_diloco_swarm.py's options). A server
trainer and a client-mode trainer average every round (the server sees the client through its
declaration: a client cannot offer its state); the auxiliary peer monitors both from their metrics
records, stores the outer state as checkpoints and serves it: a trainer that starts when only the
auxiliary peer is up begins at the round it holds; the stored checkpoint exports, and its validation
loss is below the untrained model's.
"""

import json
import os
import re
import signal

import pytest
import torch

pytest.importorskip("hivemind")

from test_aux_peer import STORED, AuxPeer, swarm_scalars  # noqa: E402
from test_collaborative import STARTUP_S, Peer, shards, validation_loss, wait_for_file  # noqa: E402, F401
from test_diloco_swarm import diloco_args, rounds  # noqa: E402

from convmodel.collaborative.checkpoint_store import LATEST, checkpoint_epoch  # noqa: E402

DOWNLOADED = re.compile(r"downloaded the swarm's state at collaborative epoch (\d+)")
TOGETHER = 3  # rounds of 2 peers, on both


@pytest.mark.timeout(420)
def test_aux_peer_stores_and_serves_a_diloco_run_that_a_client_mode_peer_averages_in(
        shards, tokenizer_dir, tmp_path):  # noqa: F811
    aux_dir, ckpts, tb = tmp_path / "aux", tmp_path / "aux" / "ckpts", tmp_path / "aux" / "tb"
    aux = server = client = newcomer = None
    try:
        aux = AuxPeer(aux_dir, [*diloco_args(shards, tokenizer_dir, peers_file="peers.txt"),
                                "--store_checkpoints", str(ckpts), "--checkpoint_every", "1", "--refresh_period", "0.5",
                                "--logdir", "tb"])
        address = wait_for_file(aux_dir / "peers.txt", aux, STARTUP_S).split()[0]
        server = Peer(tmp_path / "server", diloco_args(shards, tokenizer_dir, initial_peers=[address],
                                                       peers_file="peers.txt", status_file="status.json"))
        server_address = wait_for_file(tmp_path / "server" / "peers.txt", server, STARTUP_S).split()[0]
        client = Peer(tmp_path / "client", diloco_args(shards, tokenizer_dir, initial_peers=[server_address],
                                                       client_mode=True))

        def paired(peer: Peer) -> int:
            return sum(1 for r in rounds(peer).values() if r[0] == 2)

        client.wait_for_condition(lambda: paired(client) >= TOGETHER and paired(server) >= TOGETHER, 180,
                                  f"{TOGETHER} rounds of 2 peers on both")
        aux.wait_for_condition(lambda: len(STORED.findall(aux.output())) >= 2
                               and 2.0 in {v for _, v in swarm_scalars(tb).get("swarm/alive_peers", [])}, 120,
                               "two stored checkpoints and swarm/alive_peers == 2")
        status = json.loads((tmp_path / "server" / "status.json").read_text())
        for trainer in (client, server):
            os.kill(trainer.process.pid, signal.SIGINT)
        for trainer in (client, server):
            assert trainer.wait_exit(90) == 0, trainer.output()[-4000:]
        left = json.loads((tmp_path / "server" / "status.json").read_text())
        aux.wait_for(r"no alive peer", 60)
        held = int(DOWNLOADED.findall(aux.output())[-1])

        # only the aux peer is up: a new trainer starts from the outer state it holds, at the round's start
        newcomer = Peer(tmp_path / "newcomer", diloco_args(shards, tokenizer_dir, initial_peers=[address]))
        joined = newcomer.wait_for(r"DiLoCo: joined at round (\d+), inner step (\d+)", STARTUP_S)
        newcomer.kill()
        os.kill(aux.process.pid, signal.SIGINT)
        assert aux.wait_exit(90) == 0, aux.output()[-4000:]
    finally:
        for peer in (aux, server, client, newcomer):
            if peer is not None:
                peer.kill()

    ours, theirs = rounds(server), rounds(client)
    both = [n for n in sorted(set(ours) & set(theirs)) if ours[n][0] == theirs[n][0] == 2]
    assert len(both) >= TOGETHER and all(ours[n][2] == theirs[n][2] for n in both), (ours, theirs)
    assert (int(joined.group(1)), int(joined.group(2))) == (held, 0), aux.output()[-4000:]
    assert status["joined"] and status["epoch"] >= 1 and status["peers"] == 2, status
    assert not left["joined"], left
    scalars = swarm_scalars(tb)
    assert max(v for _, v in scalars["swarm/epoch"]) >= 2 and scalars["swarm/loss"], sorted(scalars)

    stored = torch.load(ckpts / LATEST, map_location="cpu", weights_only=True)
    epoch = checkpoint_epoch(stored)
    assert epoch == int(STORED.findall(aux.output())[-1]) >= held
    assert stored["diloco"]["round"] == epoch and stored["diloco"]["inner_step"] == 0
    assert stored["optimizer_states"] == [] and stored["convmodel"]["collaborative"] == {
        "epoch": epoch, "run_id": "bert_tiny_diloco"}

    from transformers import AutoModelForMaskedLM

    from convmodel.export import export_model

    exported = AutoModelForMaskedLM.from_pretrained(export_model(str(ckpts / LATEST), str(tmp_path / "hf")))
    name = "model.bert.embeddings.word_embeddings.weight"  # the first parameter: outer[0]
    torch.testing.assert_close(stored["diloco"]["outer"][0], stored["state_dict"][name])
    torch.testing.assert_close(exported.bert.embeddings.word_embeddings.weight, stored["state_dict"][name])

    # the swarm learned: the stored outer weights' validation loss is below the same model untrained (~ln(vocab))
    from convmodel.models import BertPretraining

    trained = BertPretraining.load_from_checkpoint(ckpts / LATEST, map_location="cpu", tokenizer=tokenizer_dir)
    hparams = {k: v for k, v in stored["hyper_parameters"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    untrained = BertPretraining(**{**hparams, "tokenizer": tokenizer_dir})
    before, after = validation_loss(untrained, shards, tokenizer_dir), validation_loss(trained, shards, tokenizer_dir)
    assert after < 0.93 * before, (before, after)
