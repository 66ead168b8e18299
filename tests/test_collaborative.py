"""HivemindStrategy with real peers on 127.0.0.1: trainer processes started from the CLI as users start them.

Every wait polls a file or a log line with a deadline; every child process is killed in `finally`.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind")

from convmodel.cli import main  # noqa: E402
from convmodel.data import JsonlDataModule, prepare_train_data  # noqa: E402
from convmodel.models import BertPretraining  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "collaborative" / "bert-tiny.yaml"
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
STARTUP_S = 120  # a peer on a loaded 2-core machine: imports, DHT, model (usually 10-20 s)
STRATEGY = "--trainer.strategy.init_args."


@pytest.fixture(scope="module")
def shards(text_corpus, tokenizer_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collab-shards")
    for split in ("train", "valid"):
        prepare_train_data(text_corpus[split], tokenizer_dir, str(root / split), objective="mlm", max_seq_len=64,
                           num_workers=1, progress=False)
    return root


def collaborative_run_args(config: Path, model_config: dict, shards: Path, tokenizer_dir: str,
                           callbacks: list[dict] = (), every_step_checkpoint: bool = True, **strategy) -> list[str]:
    """A shipped collaborative config at test size: `model_config` for the model, our shards, no validation
    until the end, a checkpoint every step in checkpoints/ (or, without `every_step_checkpoint`, the config's
    own RunCheckpoint in runs/checkpoints/), `callbacks` after it, and per-peer strategy options."""
    args = ["--config", str(config),
            "--data.tokenizer", tokenizer_dir,
            "--data.train_files", str(shards / "train" / "part-*.jsonl"),
            "--data.val_files", str(shards / "valid" / "part-*.jsonl"), "--data.test_files", "null",
            "--data.max_seq_len", "64", "--data.batch_size", "8", "--data.shuffle_buffer_size", "100",
            "--model.init_args.config", json.dumps(model_config), "--model.init_args.warmup_steps", "2",
            "--model.init_args.total_steps", "50",
            "--trainer.val_check_interval", "1000000", "--trainer.limit_val_batches", "2",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", "runs"]
    if every_step_checkpoint:
        args += ["--trainer.callbacks", json.dumps([
            {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "checkpoints", "save_last": True, "every_n_train_steps": 1, "save_top_k": 0}},
            *callbacks])]
    else:
        for callback in callbacks:
            args += ["--trainer.callbacks+", json.dumps(callback)]
    for name, value in strategy.items():
        args += [STRATEGY + name, value if isinstance(value, str) else json.dumps(value)]
    return args


def peer_args(shards: Path, tokenizer_dir: str, **strategy) -> list[str]:
    """The shipped collaborative config with a tiny model, our shards and per-peer strategy options."""
    return [*collaborative_run_args(CONFIG, TINY_BERT, shards, tokenizer_dir, **strategy), "--trainer.max_steps", "3000"]


class Peer:
    """One trainer.py process in its own directory; its output goes to a log file we poll."""

    def __init__(self, workdir: Path, args: list[str]):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.log_path = workdir, workdir / "output.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        env.pop("CONVMODEL_INITIAL_PEERS", None)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(REPO / "trainer" / "trainer.py"), *args], cwd=workdir,
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in the output; fails if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.process.poll() is not None:
                match = re.search(pattern, self.output())
                if match:
                    return match
                pytest.fail(f"peer in {self.workdir} exited ({self.process.returncode}) before printing "
                            f"{pattern!r}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"peer in {self.workdir} printed no {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    def wait_for_condition(self, condition, timeout: float, what: str) -> None:
        """Poll `condition()` until it holds; fails if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                if condition():
                    return
                pytest.fail(f"peer in {self.workdir} exited ({self.process.returncode}) before {what}:\n"
                            f"{self.output()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"peer in {self.workdir}: no {what} within {timeout} s:\n{self.output()[-4000:]}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"peer in {self.workdir} still running after {timeout} s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)  # its DHT, averagers and p2pd daemon share the session
            self.process.wait(timeout=30)
        else:
            try:
                os.killpg(self.process.pid, 9)  # leftovers of a peer that exited
            except ProcessLookupError:
                pass
        self.log.close()


def wait_for_file(path: Path, peer: Peer, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        if peer.process.poll() is not None:
            pytest.fail(f"peer exited ({peer.process.returncode}) before writing {path}:\n{peer.output()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {path} within {timeout} s:\n{peer.output()[-4000:]}")


def checkpoint(peer: Peer) -> dict:
    return torch.load(peer.workdir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def scalars(peer: Peer, tag: str) -> list[tuple[int, float]]:
    from convmodel.run_summary import latest_version_dir, read_scalars

    return read_scalars(latest_version_dir(str(peer.workdir / "runs")), tag)


# ---- bad inputs: one clear error each ----------------------------------------------------------


def run_cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.timeout(60)
def test_malformed_initial_peer_is_one_error(shards, tokenizer_dir, capsys):
    err = run_cli_error(peer_args(shards, tokenizer_dir, initial_peers="/ip4/127.0.0.1/tcp/notaport/p2p/x"), capsys)
    assert "initial_peers" in err and "is not a multiaddr" in err and "/ip4/127.0.0.1/tcp/notaport" in err


@pytest.mark.timeout(60)
def test_initial_peer_without_peer_id_is_one_error(shards, tokenizer_dir, capsys):
    err = run_cli_error(peer_args(shards, tokenizer_dir, initial_peers=["/ip4/127.0.0.1/tcp/4001"]), capsys)
    assert "has no /p2p/<peer id> part" in err


@pytest.mark.timeout(60)
def test_malformed_peer_in_environment_names_the_variable(shards, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setenv("CONVMODEL_INITIAL_PEERS", "ip4/10.0.0.1/tcp/1")
    err = run_cli_error(peer_args(shards, tokenizer_dir), capsys)
    assert "$CONVMODEL_INITIAL_PEERS" in err and "Must begin with /" in err


@pytest.mark.timeout(60)
def test_run_id_with_a_dot_is_one_error(shards, tokenizer_dir, capsys):
    err = run_cli_error(peer_args(shards, tokenizer_dir, run_id="bert.v2"), capsys)
    assert "run_id 'bert.v2' must not contain dots" in err and "bert_v2" in err


@pytest.mark.timeout(60)
def test_two_devices_with_reused_gradient_buffers_is_one_error(shards, tokenizer_dir, capsys, tmp_path, monkeypatch):
    # refused when the Trainer is built, before a second rank is started (tests/test_swarm_local_ranks.py trains two)
    monkeypatch.chdir(tmp_path)
    err = run_cli_error([*peer_args(shards, tokenizer_dir, reuse_grad_buffers=True), "--trainer.accelerator", "cpu",
                         "--trainer.devices", "2"], capsys)
    assert "trainer.devices: 2 devices in one peer: reuse_grad_buffers" in err and "set trainer.devices: 1" in err


@pytest.mark.timeout(120)
def test_unreachable_initial_peer_fails_within_the_bootstrap_timeout(shards, tokenizer_dir, capsys, tmp_path,
                                                                     monkeypatch):
    import socket

    from hivemind.p2p import PeerID

    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PeerID.from_base58('QmcTrNP2CDwuUPnYd3mdXHNbYTSM5aqKnD3mnYGDcGtTHu')}"
    started = time.monotonic()
    err = run_cli_error(peer_args(shards, tokenizer_dir, initial_peers=[nobody], bootstrap_timeout=5), capsys)
    assert time.monotonic() - started < 90
    assert "none of" in err and "answered within 5 s" in err and nobody in err


# ---- two peers from the CLI ------------------------------------------------------------------------

LAST_EPOCH = 30
SWARM = dict(target_batch_size=128, max_collaborative_epochs=LAST_EPOCH, matchmaking_time=1.0,
             averaging_timeout=20.0, next_chunk_timeout=5.0)


@pytest.mark.timeout(400)
def test_two_peers_from_the_cli_train_in_lockstep_and_end_with_equal_parameters(shards, tokenizer_dir, tmp_path):
    first = second = None
    try:
        # the second peer joins late, while the first trains alone. The first is slowed down (batches of 2
        # samples: 4x more local steps per collaborative epoch) so that it does not finish alone while the
        # second starts (10-40 s on a loaded 2-core machine). Pausing it with SIGSTOP instead can leave its
        # DHT unable to bootstrap the second.
        first = Peer(tmp_path / "first", [*peer_args(shards, tokenizer_dir, peers_file="peers.txt", **SWARM),
                                          "--data.batch_size", "2"])
        address = wait_for_file(tmp_path / "first" / "peers.txt", first, STARTUP_S).split()[0]
        assert address.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in address
        first.wait_for(r"Other peers join with\n  --trainer.strategy.init_args.initial_peers '\[/ip4/127.0.0.1/", 10)
        first.wait_for(r"collaborative epoch 1 \(", 120)
        second = Peer(tmp_path / "second", peer_args(shards, tokenizer_dir, initial_peers=[address], **SWARM))
        joined = int(second.wait_for(r"joined run 'bert_tiny' at collaborative epoch (\d+)", STARTUP_S).group(1))
        assert second.wait_exit(240) == 0, second.output()[-4000:]
        assert first.wait_exit(60) == 0, first.output()[-4000:]
    finally:
        for peer in (first, second):
            if peer is not None:
                peer.kill()
    for peer in (first, second):
        # a clean exit: nothing after the last epoch but Lightning's own lines (no multiprocessing tracebacks)
        teardown = peer.output().split(f"collaborative epoch {LAST_EPOCH} (")[-1]
        assert "Traceback" not in teardown and "[ERROR]" not in teardown, teardown[-3000:]
    assert 1 <= joined < LAST_EPOCH
    ckpts = checkpoint(first), checkpoint(second)
    # both stopped at the same collaborative epoch, in rounds of two peers
    assert [c["optimizer_states"][0]["state"]["local_epoch"] for c in ckpts] == [LAST_EPOCH, LAST_EPOCH]
    assert max(v for _, v in scalars(second, "collab/peers")) == 2
    # lockstep: once the second counts both peers, it takes every epoch to the end with the first (a peer
    # out of step would jump epochs by downloading state)
    epochs = [(int(e), int(p)) for e, p in re.findall(r"collaborative epoch (\d+) \((\d+) peers?", second.output())]
    synced_at = next(i for i, (_, peers) in enumerate(epochs) if peers == 2)
    in_step = [e for e, _ in epochs[synced_at:]]
    assert in_step == list(range(in_step[0], LAST_EPOCH + 1)) and len(in_step) >= 3, second.output()[-3000:]
    # after the joiner's first round no averaging round lost a part, and at most one failed to form a group.
    # The first round may lose one: the joiner's first backward after the download is its slowest step, and
    # on a loaded machine (CI: one such run in about ten) its part came after next_chunk_timeout
    for peer in (first, second):
        after_join = peer.output().split(f"collaborative epoch {joined + 1} (", 1)[-1]
        assert "of input tensors" not in after_join, after_join[-3000:]
        assert len(re.findall(r"\[ERROR\].*Averaging step failed", peer.output())) <= 1, peer.output()[-3000:]
    # after the last round the parameters are equal within the fp16 error of the averaged gradients
    first_params, second_params = (c["state_dict"] for c in ckpts)
    for name, value in first_params.items():
        torch.testing.assert_close(value, second_params[name], atol=2e-3, rtol=2e-3, msg=name)
    # and the swarm learned: validation loss of the averaged model below the same model untrained (which
    # stays at ~ln(vocab) = 6.9; one run of 30 epochs reached 5.88; 0.93x leaves room for timing, not for no learning)
    trained = BertPretraining.load_from_checkpoint(first.workdir / "checkpoints" / "last.ckpt", map_location="cpu",
                                                   tokenizer=tokenizer_dir)
    torch.manual_seed(0)
    hparams = {k: v for k, v in ckpts[0]["hyper_parameters"].items() if not k.startswith("_")}  # not _class_path
    untrained = BertPretraining(**{**hparams, "tokenizer": tokenizer_dir})
    before, after = validation_loss(untrained, shards, tokenizer_dir), validation_loss(trained, shards, tokenizer_dir)
    assert after < 0.93 * before, (before, after)


def validation_loss(module, shards: Path, tokenizer_dir: str) -> float:
    """Token-weighted MLM loss over the validation shards (fixed masks), as the module computes it."""
    data = JsonlDataModule(tokenizer_dir, val_files=str(shards / "valid" / "part-*.jsonl"), batch_size=8,
                           max_seq_len=64)
    data.setup("validate")
    module.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in data.val_dataloader():
            losses = module.compute_losses(batch)
            total += float(losses.loss) * float(losses.n_targets)
            count += float(losses.n_targets)
    return total / count
