"""The auxiliary peer (run_aux_peer.py) with real trainer processes on 127.0.0.1.

It monitors two trainers (TensorBoard), stores the swarm's state as checkpoints, serves it to a trainer
that starts when only the auxiliary peer is up, and its latest checkpoint resumes a trainer and exports;
with --assist_in_averaging it averages with a trainer in client mode and stores a last checkpoint on leaving.
A writer killed during a checkpoint write leaves the previous checkpoint whole; bad options end in one
error line. Every wait polls a log, a file or a pipe with a deadline; every child is killed in `finally`.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

pytest.importorskip("hivemind")

from test_collaborative import (  # noqa: E402, F401
    REPO,
    STARTUP_S,
    Peer,
    peer_args,
    shards,
    wait_for_file,
)

from convmodel.collaborative.aux_peer import main  # noqa: E402
from convmodel.collaborative.checkpoint_store import (  # noqa: E402
    LATEST,
    CheckpointStore,
    checkpoint_epoch,
    latest_checkpoint,
)

SWARM = dict(target_batch_size=64, matchmaking_time=1.0, averaging_timeout=5.0, metadata_expiration=10.0,
             next_chunk_timeout=2.0, load_state_timeout=30.0, max_collaborative_epochs=1_000_000)
STORED = re.compile(r"stored the swarm's state at collaborative epoch (\d+)")


class AuxPeer(Peer):
    """One run_aux_peer.py process in its own directory; its output goes to a log file we poll."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.log_path = workdir, workdir / "output.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("CONVMODEL_INITIAL_PEERS", None)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(REPO / "trainer" / "run_aux_peer.py"), *args],
                                        cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)


def swarm_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the auxiliary peer's event files, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        return {}
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


FORGED = dict(epoch=10**6, samples_per_second=1e9, samples_accumulated=10**12, loss=0.0, mini_steps=1)


def start_forger(address: str):
    """A DHT next to the aux peer holding a forged record under a trainer's subkey, signed with another key."""
    from functools import partial

    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey
    from test_monitor import LOOPBACK, plant, signed_value

    # its one validator only strips signatures when it reads (hivemind cannot decode signed values
    # without it); the forgery goes straight into its storage, past any check
    forger = hivemind.DHT(start=True, initial_peers=[address], record_validators=[RSASignatureValidator()],
                          **LOOPBACK)
    try:
        found = forger.get("bert_tiny_metrics", latest=True)
        assert found is not None and found.value, "no metrics record to forge"
        victim = next(iter(found.value))
        expiration = get_dht_time() + 120
        forged = signed_value(victim, FORGED, expiration, RSAPrivateKey(), run_id="bert_tiny")
        assert forger.run_coroutine(partial(plant, subkey=victim, value=forged, expiration=expiration,
                                            run_id="bert_tiny"))
    except BaseException:
        forger.shutdown()
        raise
    return forger


def closed_port() -> int:
    """A loopback port nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rising(values: list[float], count: int) -> bool:
    """At least `count` distinct values, each first seen after the smaller ones."""
    firsts = list(dict.fromkeys(values))
    return len(firsts) >= count and firsts == sorted(firsts)


# ---- the swarm ------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_aux_peer_monitors_stores_and_serves_the_swarm(shards, tokenizer_dir, tmp_path):  # noqa: F811
    """Two trainers + the auxiliary peer; the trainers stop; the aux restarts; a trainer joins it alone.

    The aux's TensorBoard shows both trainers and a rising epoch; it stores checkpoints as the swarm goes
    (a failed upload does not stop it) and leaves cleanly on SIGINT/SIGTERM. Restarted on its folder, it loads
    the latest checkpoint and serves it: a trainer that starts when only the aux is up begins there
    ("the first peer of the day"). The latest.ckpt resumes a trainer alone (--ckpt_path) at its epoch
    and exports to a folder that transformers loads with the stored weights.
    """
    aux_dir, tb, ckpts = tmp_path / "aux", tmp_path / "aux" / "tb", tmp_path / "aux" / "ckpts"
    latest = ckpts / LATEST
    aux = first = second = restarted = newcomer = resumed = forger = None
    try:
        # uploads go to a Hub that refuses connections: each fails, is reported, and the aux goes on
        aux = AuxPeer(aux_dir, [*peer_args(shards, tokenizer_dir, peers_file="peers.txt", **SWARM),
                                "--store_checkpoints", str(ckpts), "--checkpoint_every", "2", "--refresh_period",
                                "0.5", "--logdir", "tb", "--push_to_hub", "convmodel/aux-test", "--upload_every", "2"],
                      env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
        address = wait_for_file(aux_dir / "peers.txt", aux, STARTUP_S).split()[0]
        first = Peer(tmp_path / "first", peer_args(shards, tokenizer_dir, initial_peers=[address], **SWARM))
        second = Peer(tmp_path / "second", peer_args(shards, tokenizer_dir, initial_peers=[address], **SWARM))

        def monitored() -> bool:
            scalars = swarm_scalars(tb)
            alive = scalars.get("swarm/alive_peers", [])
            together = next((i for i, (_, peers) in enumerate(alive) if peers == 2), None)
            if together is None:
                return False
            epochs = [value for _, value in scalars.get("swarm/epoch", [])[together:]]
            return rising(epochs, 3) and len(STORED.findall(aux.output())) >= 2

        aux.wait_for_condition(monitored, STARTUP_S + 120, "swarm/alive_peers == 2, a rising swarm/epoch and two "
                                                            "stored checkpoints")
        # a forger plants a record under a trainer's key, signed with its own
        forger = start_forger(address)
        aux.wait_for_condition(lambda: max((v for _, v in swarm_scalars(tb).get("swarm/rejected_records", [])),
                                           default=0) >= 1, 60, "the forged record counted as rejected")
        for trainer in (first, second):
            os.kill(trainer.process.pid, signal.SIGINT)
        for trainer in (first, second):
            assert trainer.wait_exit(90) == 0, trainer.output()[-4000:]
        aux.wait_for(r"no alive peer", 60)
        os.kill(aux.process.pid, signal.SIGINT)
        aux.wait_for(r"SIGINT: writing the last checkpoint", 30)
        assert aux.wait_exit(90) == 0, aux.output()[-4000:]
        aux.wait_for(r"auxiliary peer stopped", 1)
        stored_last = int(STORED.findall(aux.output())[-1])
        assert checkpoint_epoch(torch.load(latest, weights_only=True)) == stored_last

        # the next day: the aux restarts on its folder, and the first trainer to come begins where it stopped
        restarted = AuxPeer(tmp_path / "restarted", [*peer_args(shards, tokenizer_dir, peers_file="peers.txt",
                                                                **SWARM), "--store_checkpoints", str(ckpts)])
        loaded = int(restarted.wait_for(r"loaded .*latest\.ckpt \(collaborative epoch (\d+)\)", STARTUP_S).group(1))
        address = wait_for_file(tmp_path / "restarted" / "peers.txt", restarted, STARTUP_S).split()[0]
        newcomer = Peer(tmp_path / "newcomer", peer_args(shards, tokenizer_dir, initial_peers=[address], **SWARM))
        joined = int(newcomer.wait_for(r"joined run 'bert_tiny' at collaborative epoch (\d+)", STARTUP_S).group(1))
        newcomer.kill()
        os.kill(restarted.process.pid, signal.SIGTERM)  # as a service manager stops it
        restarted.wait_for(r"SIGTERM: writing the last checkpoint", 30)
        assert restarted.wait_exit(90) == 0, restarted.output()[-4000:]

        stored = torch.load(latest, map_location="cpu", weights_only=True)
        epoch = checkpoint_epoch(stored)
        resumed = Peer(tmp_path / "resumed", [*peer_args(shards, tokenizer_dir, **SWARM), "--ckpt_path", str(latest)])
        resumed_at = int(resumed.wait_for(r"training run 'bert_tiny' from collaborative epoch (\d+)",
                                          STARTUP_S).group(1))
    finally:
        for peer in (aux, first, second, restarted, newcomer, resumed):
            if peer is not None:
                peer.kill()
        if forger is not None:
            forger.shutdown()

    scalars = swarm_scalars(tb)
    assert max(v for _, v in scalars["swarm/alive_peers"]) == 2, scalars["swarm/alive_peers"]
    # the forgery changed no number: its epoch and samples/s are far above anything the trainers reach
    assert max(v for _, v in scalars["swarm/epoch"]) < FORGED["epoch"], scalars["swarm/epoch"]
    assert max(v for _, v in scalars["swarm/samples_per_second"]) < FORGED["samples_per_second"]
    assert loaded == joined == stored_last >= 2
    assert resumed_at == epoch >= stored_last
    assert stored["global_step"] == epoch and stored["convmodel"]["collaborative"] == {"epoch": epoch,
                                                                                       "run_id": "bert_tiny"}
    failed_upload = re.search(r"upload of collaborative epoch \d+ failed: --push_to_hub convmodel/aux-test: .*"
                              r"Connection refused", aux.output())
    assert failed_upload and STORED.search(aux.output(), failed_upload.end()), aux.output()[-4000:]
    assert (ckpts / "export" / "config.json").is_file()
    files = sorted(p.name for p in ckpts.glob("epoch-*.ckpt"))
    assert len(files) <= 3 and files[-1] == f"epoch-{epoch:06d}.ckpt", files
    assert os.path.samefile(latest, ckpts / files[-1])

    from transformers import AutoModelForMaskedLM

    from convmodel.export import export_model

    out = export_model(str(latest), str(tmp_path / "hf"))
    model = AutoModelForMaskedLM.from_pretrained(out)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight,
                               stored["state_dict"]["model.bert.embeddings.word_embeddings.weight"])


EPOCH_LINE = re.compile(r"collaborative epoch (\d+) \((\d+) peers?,")


def epoch_lines(peer: Peer) -> list[tuple[int, int]]:
    return [(int(e), int(p)) for e, p in EPOCH_LINE.findall(peer.output())]


def in_step(peer: Peer, count: int) -> int | None:
    """The first epoch of `count` consecutive epoch lines (e, e+1, ...) with 2 peers, if the peer printed them."""
    lines = epoch_lines(peer)
    for i in range(len(lines) - count + 1):
        window = lines[i:i + count]
        if all(peers == 2 and epoch == window[0][0] + k for k, (epoch, peers) in enumerate(window)):
            return window[0][0]
    return None


@pytest.mark.timeout(300)
def test_assisting_aux_peer_averages_with_a_client_mode_peer_and_stores_on_leaving(shards, tokenizer_dir,  # noqa: F811
                                                                                    tmp_path):
    """--assist_in_averaging with a trainer and a trainer in client mode; SIGINT to the aux while they train.

    The aux is not counted as a trainer (2 peers), no averaging round fails once both train together, and
    the aux's last checkpoint (the only one: checkpoint_every is out of reach) is downloaded from the live
    swarm after the SIGINT; the trainers go on without it.
    """
    aux_dir = tmp_path / "aux"
    aux = server = client = None
    try:
        aux = AuxPeer(aux_dir, [*peer_args(shards, tokenizer_dir, peers_file="peers.txt", **SWARM),
                                "--assist_in_averaging", "--store_checkpoints", "ckpts", "--checkpoint_every",
                                "100000", "--refresh_period", "0.5"])
        address = wait_for_file(aux_dir / "peers.txt", aux, STARTUP_S).split()[0]
        server = Peer(tmp_path / "server", peer_args(shards, tokenizer_dir, initial_peers=[address], **SWARM))
        client = Peer(tmp_path / "client", peer_args(shards, tokenizer_dir, initial_peers=[address],
                                                     client_mode=True, **SWARM))
        client.wait_for(r"joined in client mode", STARTUP_S)

        client.wait_for_condition(lambda: in_step(client, 4) is not None, 120, "4 consecutive epochs with 2 peers")
        in_step_from = in_step(client, 4)
        os.kill(aux.process.pid, signal.SIGINT)
        assert aux.wait_exit(90) == 0, aux.output()[-4000:]
        left_at = max(e for e, _ in epoch_lines(server))
        server.wait_for_condition(lambda: max(e for e, _ in epoch_lines(server)) >= left_at + 2, 60,
                                  "2 epochs after the aux left")
    finally:
        for peer in (aux, server, client):
            if peer is not None:
                peer.kill()

    goodbye = aux.output().split("SIGINT: writing the last checkpoint")[-1]
    stored = [int(e) for e in STORED.findall(goodbye)]
    # a state from the live swarm (not the initial one). Its epoch can lag the epochs counted above by a few:
    # only the non-client trainer can send state, and it may be behind the client-mode trainer whose epochs
    # in_step counts (once: stored 7 while the client printed 11 and the server about 9)
    assert len(stored) == 1 and stored[0] >= 1, aux.output()[-4000:]
    assert STORED.findall(aux.output()) == STORED.findall(goodbye)  # nothing stored before the SIGINT
    assert checkpoint_epoch(torch.load(aux_dir / "ckpts" / LATEST, weights_only=True)) == stored[0]
    assert all(peers <= 2 for _, peers in epoch_lines(server) + epoch_lines(client))
    for peer in (server, client):  # once in step, rounds succeed (at most one lost to a loaded machine)
        in_step_output = peer.output().split(f"collaborative epoch {in_step_from} (")[-1]
        assert in_step_output.count("Averaging step failed") <= 1, in_step_output[-3000:]


# ---- the checkpoint files ---------------------------------------------------------------------------


def test_store_keeps_the_last_checkpoints_and_points_latest_at_the_newest(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpts"), keep=2)
    assert store.latest() is None and latest_checkpoint(str(tmp_path / "ckpts")) is None
    for epoch in (2, 4, 6):
        store.write(epoch, {"state_dict": {"w": torch.full((2,), float(epoch))}})
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch-000004.ckpt", "epoch-000006.ckpt", LATEST]
    latest = latest_checkpoint(str(tmp_path / "ckpts"))
    assert latest == str(tmp_path / "ckpts" / LATEST)
    assert torch.load(latest, weights_only=True)["state_dict"]["w"].tolist() == [6.0, 6.0]
    os.remove(latest)  # without latest.ckpt, the highest epoch
    assert latest_checkpoint(str(tmp_path / "ckpts")) == str(tmp_path / "ckpts" / "epoch-000006.ckpt")


WRITER = """
import sys, threading
import torch
from convmodel.collaborative.checkpoint_store import CheckpointStore

class Stall:
    # pickled inside torch.save: says so, then never returns (the test kills the process here)
    def __reduce__(self):
        print("writing", flush=True)
        threading.Event().wait()

store = CheckpointStore(sys.argv[1])
store.write(1, {"state_dict": {"w": torch.ones(3)}})
print("stored", flush=True)
store.write(2, {"state_dict": {"w": torch.zeros(3)}, "stall": Stall()})
"""


class LineReader:
    """A child's stdout read line by line with a deadline (select on the raw pipe, our own buffer)."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.buffer = process, b""

    def next(self, timeout: float) -> str:
        """The next line; fails if the child exits or prints nothing within `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"the writer printed no line within {timeout} s (so far {self.buffer!r})")
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    pytest.fail(f"the writer exited ({self.process.wait()}): {self.process.stderr.read()!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()


@pytest.mark.timeout(120)
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ckpts"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
    lines = LineReader(writer)
    try:
        assert lines.next(60) == "stored"
        assert lines.next(60) == "writing"
        # torch.save is inside the second checkpoint: its temporary file exists, latest.ckpt is the first
        unfinished = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert len(unfinished) == 1 and unfinished[0].startswith(".epoch-000002.ckpt."), unfinished
        writer.kill()
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)
        writer.stdout.close()
        writer.stderr.close()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["epoch-000001.ckpt", LATEST]
    previous = torch.load(folder / LATEST, weights_only=True)
    assert previous["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]
    # the next store to open the folder (an auxiliary peer restarting) removes the unfinished file
    store = CheckpointStore(str(folder))
    assert store.removed_temp_files == unfinished
    assert sorted(os.listdir(folder)) == ["epoch-000001.ckpt", LATEST]


# ---- bad input: one error line each -----------------------------------------------------------------


def run_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.timeout(120)
def test_bad_options_are_one_error_each(shards, tokenizer_dir, capsys, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    err = run_error([*peer_args(shards, tokenizer_dir, client_mode=True), "--assist_in_averaging"], capsys)
    assert "--assist_in_averaging" in err and "client_mode" in err
    err = run_error([*peer_args(shards, tokenizer_dir), "--store_checkpoints", "ckpts", "--push_to_hub",
                     "not a/valid/repo"], capsys)
    assert "--push_to_hub 'not a/valid/repo' is not a Hub repository name" in err
    err = run_error([*peer_args(shards, tokenizer_dir), "--checkpoint_every", "0"], capsys)
    assert "--checkpoint_every must be an integer >= 1, got 0" in err
    err = run_error(["--store_checkpoints", "ckpts"], capsys)
    assert "--config is required" in err
    err = run_error([*peer_args(shards, tokenizer_dir, algorithm="diloco"), "--assist_in_averaging"], capsys)
    assert "--assist_in_averaging: under algorithm diloco" in err and "leave out --assist_in_averaging" in err
    assert not (tmp_path / "ckpts").exists()  # nothing was started or written


def test_an_upload_that_fails_with_any_error_is_reported_and_tried_again(tmp_path, capsys):
    """Not only a refusing Hub: an error export does not expect (here ENOSPC, a full disk, from the store) is
    reported with its type, the loop goes on, and the next interval tries the same epoch again."""
    import errno
    from types import SimpleNamespace

    from convmodel.collaborative.aux_loop import AuxiliaryPeer

    class FullDiskStore:
        directory, calls = str(tmp_path), 0

        def latest(self):
            self.calls += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    aux = AuxiliaryPeer.__new__(AuxiliaryPeer)
    aux.options = SimpleNamespace(push_to_hub="convmodel/aux-test", upload_every=0.0)
    aux.peer = SimpleNamespace(options=SimpleNamespace(run_id="bert_tiny"))
    aux.store, aux.stored_epoch, aux.uploaded_epoch, aux.last_upload = FullDiskStore(), 7, None, float("-inf")
    aux._maybe_upload()
    aux._maybe_upload()
    assert aux.store.calls == 2 and aux.uploaded_epoch is None
    err = capsys.readouterr().err
    assert err.count("upload of collaborative epoch 7 failed: OSError: [Errno 28] No space left on device; "
                     "trying again in 0 s (--upload_every)") == 2, err


# ---- a stranger serving an absurd state ---------------------------------------------------------------


class TinyModule(pl.LightningModule):
    """What the aux peer stores: a real LightningModule (hyperparameters, state_dict), two real tensors."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 2)


def state_averager(dht, module, run_id: str, **options):
    """A hivemind TrainingStateAverager under the run's prefix, as a trainer's or the aux peer's (with an LR
    schedule: a state at epoch 10**9 applied would step it 10**9 times)."""
    from hivemind.optim.state_averager import TrainingStateAverager

    return TrainingStateAverager(dht=dht, prefix=f"{run_id}_state_averager", optimizer=partial(torch.optim.SGD, lr=0.1),
                                 params=list(module.parameters()), start=True,
                                 scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=constant_lr),
                                 **options)


def constant_lr(epoch: int) -> float:
    return 1.0


def serving(averager, epoch: int) -> None:
    averager.local_epoch = epoch
    averager.state_sharing_priority = float(epoch)
    averager.allow_state_sharing = True


def declared(dht, run_id: str, averager) -> bool:
    """The averager's offer to serve its state is in the DHT (what a download looks up first)."""
    found = dht.get(f"{run_id}_state_averager.all_averagers", latest=True)
    entry = found.value.get(averager.peer_id.to_bytes()) if found is not None else None
    return entry is not None and entry.value is not None


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_a_state_served_at_an_absurd_epoch_is_refused_and_never_stored(tmp_path, capsys):
    """A real state averager at local_epoch 10**9 serves its state under the run's prefix, beside one honest
    trainer's metrics record at epoch 3: the aux loop's checkpoint download refuses it before hivemind applies
    any of it (the held tensors stay, and its LR schedule is not stepped 10**9 times), nothing is stored;
    once an honest peer serves epoch 4, that state is downloaded and stored."""
    from types import SimpleNamespace

    import hivemind
    from hivemind.utils.crypto import RSAPrivateKey
    from test_monitor import LOOPBACK, addresses

    from convmodel.collaborative.aux_loop import AuxiliaryPeer
    from convmodel.collaborative.held_state import SwarmState
    from convmodel.collaborative.metrics import metrics_validators, publish_metrics
    from convmodel.collaborative.monitor import SwarmMonitor, monitor_validators
    from convmodel.health import StatusFile

    run = "absurd"
    dhts, averagers, monitor = [], [], None
    try:
        dhts.append(aux_dht := hivemind.DHT(start=True, record_validators=monitor_validators(run), **LOOPBACK))
        validators, signer = metrics_validators(run, RSAPrivateKey())
        dhts.append(trainer_dht := hivemind.DHT(start=True, initial_peers=addresses(aux_dht),
                                                record_validators=validators, **LOOPBACK))
        dhts.append(liar_dht := hivemind.DHT(start=True, initial_peers=addresses(aux_dht), **LOOPBACK))
        module = TinyModule()
        held = module.layer.weight.detach().clone()
        averagers.append(aux_averager := state_averager(aux_dht, module, run, allow_state_sharing=False))
        averagers.append(liar := state_averager(liar_dht, TinyModule(), run))
        serving(liar, 10**9)

        monitor = SwarmMonitor(aux_dht, run, None)
        aux = AuxiliaryPeer.__new__(AuxiliaryPeer)  # the loop alone: its monitor, held state and store are real
        aux.options = SimpleNamespace(checkpoint_every=1, push_to_hub=None)
        aux.module, aux.datamodule, aux.monitor = module, None, monitor
        aux.state = SwarmState(SimpleNamespace(load_state_timeout=20.0, client_mode=False, run_id=run), aux_averager)
        aux.store = CheckpointStore(str(tmp_path / "ckpts"))
        aux.stored_epoch = aux.swarm_epoch = aux.swarm_loss = aux._tried_at_epoch = None
        aux.alive_peers = 0
        aux.peer = SimpleNamespace(dht=aux_dht)  # what the status file reads of the swarm peer: its DHT's id
        aux.status = StatusFile(str(tmp_path / "status.json"), "auxiliary peer", run)

        assert publish_metrics(trainer_dht, run, signer, epoch=3, samples_per_second=5.0, samples_accumulated=64,
                               loss=4.0, mini_steps=2).result(timeout=30)
        wait_until(lambda: declared(aux_dht, run, liar), 60, "the liar's offer to serve its state")
        wait_until(lambda: monitor.refresh() is not None, 60, "the trainer's record reaching the aux")
        aux.refresh()  # the swarm is 3 epochs past nothing stored: a checkpoint is due, the download is refused
        assert aux.swarm_epoch == 3 and aux._tried_at_epoch == 3
        assert "refused the state a peer sent: its collaborative epoch 1000000000 is implausible" in \
            capsys.readouterr().err
        assert aux.state.epoch is None and not aux_averager.allow_state_sharing  # nothing held, nothing served
        assert aux_averager.local_epoch == 0 and aux_averager.scheduler.last_epoch < 10
        torch.testing.assert_close(module.layer.weight.detach(), held)
        assert sorted(os.listdir(tmp_path / "ckpts")) == []
        # still in its swarm, at the majority's epoch, not the liar's: what the container's health check reads
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["joined"] and status["epoch"] == 3 and status["peer_id"] == str(aux_dht.peer_id), status

        # the liar leaves; an honest trainer serves epoch 4 and says so in its record
        liar.shutdown()
        averagers.remove(liar)
        honest_module = TinyModule()
        averagers.append(honest := state_averager(trainer_dht, honest_module, run))
        serving(honest, 4)
        assert publish_metrics(trainer_dht, run, signer, epoch=4, samples_per_second=5.0, samples_accumulated=128,
                               loss=3.0, mini_steps=2).result(timeout=30)

        def stored() -> bool:
            aux.refresh()
            return aux.stored_epoch is not None

        wait_until(stored, 60, "the honest state stored")
    finally:
        if monitor is not None:
            monitor.close()
        for averager in averagers:
            averager.shutdown()
        for dht in reversed(dhts):
            dht.shutdown()
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch-000004.ckpt", LATEST]
    stored_state = torch.load(tmp_path / "ckpts" / LATEST, weights_only=True)
    assert checkpoint_epoch(stored_state) == 4
    torch.testing.assert_close(stored_state["state_dict"]["layer.weight"], honest_module.layer.weight.detach())

    # restarted on a folder whose only checkpoint an older version stored from the liar: the swarm's records
    # (epoch 4 a moment ago) say it cannot be, so it is not loaded and not served
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    stored_state["optimizer_states"][0]["state"]["local_epoch"] = 10**9
    torch.save(stored_state, poisoned / "epoch-1000000000.ckpt")
    aux.store, aux.peer = CheckpointStore(str(poisoned)), SimpleNamespace(options=SimpleNamespace(run_id=run))
    aux._load_stored()
    assert aux.stored_epoch == 4 and aux.state.epoch == 4
    assert re.search(r"passed over .*epoch-1000000000\.ckpt: its collaborative epoch 1000000000 is beyond what "
                     r"the swarm's metrics records allow \(at most \d+\)", capsys.readouterr().out)


def test_a_stored_checkpoint_of_an_absurd_epoch_does_not_become_the_latest(tmp_path):
    """An older version stored a poisoned state as epoch-1000000000.ckpt seconds after epoch 12 and linked
    latest.ckpt to it: the store passes it over (latest is epoch 12), says so, keeps it for the user to
    move, and goes on storing. A folder copied without its times (all files within a second) loses nothing."""
    folder = tmp_path / "ckpts"
    store = CheckpointStore(str(folder), keep=2)
    for epoch in (8, 12):
        store.write(epoch, {"state_dict": {"w": torch.full((2,), float(epoch))}})
    absurd = folder / "epoch-1000000000.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, absurd)
    twelve = os.stat(folder / "epoch-000012.ckpt").st_mtime
    os.utime(absurd, (twelve + 5, twelve + 5))
    os.remove(folder / LATEST)
    os.link(absurd, folder / LATEST)

    reopened = CheckpointStore(str(folder), keep=2)
    assert [os.path.basename(path) for path, _ in reopened.passed_over] == ["epoch-1000000000.ckpt"]
    assert "beyond what a swarm can reach in the 5 s since epoch-000012.ckpt" in reopened.passed_over[0][1]
    assert reopened.latest() == str(folder / "epoch-000012.ckpt")
    reopened.write(14, {"state_dict": {"w": torch.full((2,), 14.0)}})
    assert reopened.latest() == str(folder / LATEST)
    assert torch.load(reopened.latest(), weights_only=True)["state_dict"]["w"].tolist() == [14.0, 14.0]
    assert sorted(os.listdir(folder)) == ["epoch-000012.ckpt", "epoch-000014.ckpt", "epoch-1000000000.ckpt", LATEST]

    copied = tmp_path / "copied"
    copied.mkdir()
    for epoch in (12, 60, 110):
        torch.save({"state_dict": {}}, copied / f"epoch-{epoch:06d}.ckpt")
    assert CheckpointStore(str(copied)).passed_over == []
    assert latest_checkpoint(str(copied)) == str(copied / "epoch-000110.ckpt")
