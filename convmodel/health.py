"""Is this peer in its swarm? A status file the peer rewrites, and the check a container runs on it.

A swarm peer (HivemindStrategy's SwarmPeer, the auxiliary peer's loop) writes a small JSON file
once it has joined and again while it works:

    {"time": 1764770000.0, "role": "trainer", "joined": true, "run_id": "bert_tiny",
     "epoch": 12, "peers": 2, "peer_id": "12D3KooW..."}

and `joined: false` when it leaves. The path is `trainer.strategy.init_args.status_file`, else
$CONVMODEL_STATUS_FILE (the Docker images set it); with neither, nothing is written.

    convmodel-healthcheck [--status_file PATH] [--max_age SECONDS]     (python -m convmodel.health)

exits 0 when the file says joined and was written at most max_age seconds ago, 1 otherwise, with
one line saying why: the images' HEALTHCHECK. max_age defaults to $CONVMODEL_HEALTH_MAX_AGE, else
120 s. A trainer writes nothing while one step's averaging round runs, so max_age must outlast a
round (matchmaking_time + averaging_timeout): the images set 900 s, enough for the internet
config's 60 + 600 s. A peer whose process hangs (a deadlocked averaging
round, a stuck DHT) stops rewriting the file and turns unhealthy, which a process check alone would
not see.

This module uses the standard library only, outside convmodel.collaborative: a health check runs
every 30 s, and importing torch, Lightning and hivemind for it would cost seconds of CPU each time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

STATUS_FILE_ENV = "CONVMODEL_STATUS_FILE"
MAX_AGE_ENV = "CONVMODEL_HEALTH_MAX_AGE"
#: a trainer rewrites its file at most this often between collaborative epochs (a step costs one time check)
WRITE_EVERY_S = 10.0
DEFAULT_MAX_AGE_S = 120.0


def status_path(option: str | None) -> str | None:
    """The status file to write: the option, else $CONVMODEL_STATUS_FILE, else None (no file)."""
    return option or os.environ.get(STATUS_FILE_ENV) or None


class StatusFile:
    """Writes one peer's status to `path` (None: nowhere), replacing the file whole each time.

    `write(...)` writes at once; `write_due(...)` writes only when WRITE_EVERY_S passed since the
    last write, so that a trainer may call it every local step: a swarm whose epochs take minutes
    still shows a live peer. A write that fails (a full disk, a removed volume) is reported once and
    never stops the peer: the health check then says the file is stale.
    """

    def __init__(self, path: str | None, role: str, run_id: str):
        self.path, self.role, self.run_id = path, role, run_id
        self._written_at = -float("inf")
        self._failed = False

    def write_due(self, **status) -> None:
        if self.path is not None and time.monotonic() - self._written_at >= WRITE_EVERY_S:
            self.write(**status)

    def write(self, *, joined: bool, epoch: int | None = None, peers: int | None = None,
              peer_id: str | None = None) -> None:
        if self.path is None:
            return
        status = {"time": time.time(), "role": self.role, "joined": joined, "run_id": self.run_id,
                  "epoch": epoch, "peers": peers, "peer_id": peer_id}
        try:
            write_atomically(self.path, json.dumps(status) + "\n")
        except OSError as exc:
            if not self._failed:
                print(f"[convmodel] cannot write the status file {self.path} ({exc}); the health check will call "
                      "this peer unhealthy", file=sys.stderr, flush=True)
            self._failed = True
            return
        self._written_at = time.monotonic()


def write_atomically(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`: a reader sees the old
    file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".status-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass
        raise


def check_status(path: str | None, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line why) for the status file at `path`."""
    if not path:
        return False, f"no status file: set ${STATUS_FILE_ENV} (or --status_file) to the file the peer writes"
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        return False, f"{path} does not exist: the peer has not joined its swarm yet"
    except (OSError, ValueError) as exc:
        return False, f"{path} cannot be read as a status file ({type(exc).__name__}: {exc})"
    if not isinstance(status, dict) or not isinstance(status.get("time"), int | float):
        return False, f"{path} is not a status file (no time field)"
    age = (time.time() if now is None else now) - status["time"]
    where = f"run {status.get('run_id')!r}"
    if status.get("epoch") is not None:
        where += f" at collaborative epoch {status['epoch']}"
    if status.get("peers") is not None:
        where += f", {status['peers']} peer(s) seen"
    role = status.get("role") or "peer"
    if not status.get("joined"):
        return False, f"the {role} is not in its swarm ({where}; status written {age:.0f} s ago)"
    if age > max_age:
        return False, (f"the {role} wrote no status for {age:.0f} s (more than --max_age {max_age:g}): it is stuck "
                       f"or gone ({where})")
    return True, f"the {role} is in {where} (status written {age:.0f} s ago)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convmodel-healthcheck", description=(
        "Exit 0 when the swarm peer's status file says it is in its swarm and is fresh, 1 otherwise."))
    parser.add_argument("--status_file", default=os.environ.get(STATUS_FILE_ENV),
                        help=f"the file the peer writes (default: ${STATUS_FILE_ENV})")
    parser.add_argument("--max_age", type=float, default=None,
                        help=f"seconds after which a status counts as stale (default: ${MAX_AGE_ENV}, else "
                             f"{DEFAULT_MAX_AGE_S:g})")
    args = parser.parse_args(argv)
    if args.max_age is None:
        try:
            args.max_age = float(os.environ.get(MAX_AGE_ENV) or DEFAULT_MAX_AGE_S)
        except ValueError:
            parser.error(f"${MAX_AGE_ENV} must be a number of seconds, got {os.environ[MAX_AGE_ENV]!r}")
    if not args.max_age > 0:
        parser.error(f"--max_age must be a number of seconds > 0, got {args.max_age:g}")
    healthy, why = check_status(args.status_file, args.max_age)
    print(("healthy: " if healthy else "unhealthy: ") + why)
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
