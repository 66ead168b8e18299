"""The status file a swarm peer writes and the health check the Docker images run on it (convmodel/health.py).

The check is run as the images run it, a separate process (`python -m convmodel.health`); the
file comes from a real one-peer swarm on 127.0.0.1.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

from test_collaborative import REPO, STARTUP_S, Peer, peer_args, shards  # noqa: F401  (shards: a fixture)

from convmodel.health import StatusFile, check_status


def healthcheck(*args: str, status_env: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m convmodel.health ARGS` with $CONVMODEL_STATUS_FILE set to `status_env` (None: unset)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("CONVMODEL_STATUS_FILE", None)
    environment.pop("CONVMODEL_HEALTH_MAX_AGE", None)
    environment.update(env or {})
    if status_env is not None:
        environment["CONVMODEL_STATUS_FILE"] = status_env
    return subprocess.run([sys.executable, "-m", "convmodel.health", *args], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_every_unhealthy_state_gives_exit_1_and_one_line_why(tmp_path):
    path = tmp_path / "status.json"
    result = healthcheck("--status_file", str(path))
    assert (result.returncode, result.stdout.count("\n")) == (1, 1)
    assert "does not exist" in result.stdout

    path.write_text("{not json")
    assert "cannot be read as a status file" in healthcheck("--status_file", str(path)).stdout

    status = StatusFile(str(path), "trainer", "bert_tiny")
    status.write(joined=True, epoch=3, peers=2, peer_id="12D3KooWexample")
    result = healthcheck("--status_file", str(path), "--max_age", "60")
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(r"healthy: the trainer is in run 'bert_tiny' at collaborative epoch 3, 2 peer\(s\) seen "
                        r"\(status written \d+ s ago\)\n", result.stdout), result.stdout

    stale, why = check_status(str(path), max_age=60, now=time.time() + 61)
    assert not stale and "wrote no status for 61 s (more than --max_age 60)" in why
    stale_env = {"CONVMODEL_HEALTH_MAX_AGE": "0.001"}  # the images' way to set max_age
    assert "more than --max_age 0.001" in healthcheck("--status_file", str(path), env=stale_env).stdout

    status.write(joined=False, epoch=3, peers=2)
    result = healthcheck("--status_file", str(path))
    assert result.returncode == 1 and "the trainer is not in its swarm" in result.stdout

    result = healthcheck(status_env="")
    assert result.returncode == 1 and "no status file: set $CONVMODEL_STATUS_FILE" in result.stdout
    result = healthcheck("--status_file", str(path), "--max_age", "0")
    assert result.returncode == 2 and "--max_age must be a number of seconds > 0" in result.stderr


def test_a_trainer_writes_its_status_while_in_the_swarm_and_says_when_it_left(shards, tokenizer_dir,  # noqa: F811
                                                                              tmp_path):
    status_path = tmp_path / "peer" / "status.json"
    peer = Peer(tmp_path / "peer", [*peer_args(shards, tokenizer_dir), "--trainer.strategy.init_args.status_file",
                                    str(status_path)])
    try:
        peer.wait_for(r"collaborative epoch 3 ", STARTUP_S)
        status = json.loads(status_path.read_text())  # rewritten at epoch 2, before epoch 3's first step
        assert status["joined"] is True and status["role"] == "trainer" and status["run_id"] == "bert_tiny"
        assert status["epoch"] >= 2 and status["peers"] == 1
        peers_file = tmp_path / "peer" / "runs" / "bert-tiny-swarm" / "peers.txt"  # the config's peers_file
        assert status["peer_id"] in peers_file.read_text()
        result = healthcheck("--status_file", str(status_path))
        assert result.returncode == 0, result.stdout

        os.killpg(peer.process.pid, signal.SIGTERM)
        assert peer.wait_exit(STARTUP_S) == 0, peer.output()[-4000:]
        assert json.loads(status_path.read_text())["joined"] is False
        result = healthcheck("--status_file", str(status_path))
        assert result.returncode == 1 and "not in its swarm" in result.stdout
    finally:
        peer.kill()
