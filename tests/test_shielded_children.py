"""Processes started in `shielded_children` (how hivemind's DHT and averagers are started) in a real parent process.

They ignore SIGINT and SIGTERM (a terminal's Ctrl-C, systemd's SIGTERM to every process), die when the parent is
SIGKILLed, and do not hang the parent's normal exit (multiprocessing joins its daemon children at exit).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PARENT = """
import multiprocessing, sys, time
from convmodel.collaborative.signals import shielded_children

def forever():
    while True:
        time.sleep(1)

if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    with shielded_children():
        child = context.Process(target=forever, daemon=True)
        child.start()
    outside = context.Process(target=forever, daemon=True)  # started after the block: left as it is
    outside.start()
    print(child.pid, outside.pid, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
    outside.kill()  # the exit below must not wait for the shielded child
"""


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def start_parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int, int]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True, env=env)
    child, outside = (int(pid) for pid in parent.stdout.readline().split())
    return parent, child, outside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_shielded_child_ignores_terminal_signals_and_dies_with_a_killed_parent(tmp_path):
    parent, child, outside = start_parent(tmp_path, "wait")
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(child, signum)
        os.kill(outside, signal.SIGTERM)
        assert wait_gone(outside, 10)  # a process started after the block still ends on SIGTERM
        assert alive(child)
        parent.kill()  # SIGKILL: no exit handler of the parent runs
        parent.wait(10)
        assert wait_gone(child, 10), "the shielded child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        for pid in (child, outside):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_parent_exits_without_waiting_for_a_shielded_child(tmp_path):
    parent, child, _ = start_parent(tmp_path, "exit")
    try:
        assert parent.wait(30) == 0  # multiprocessing's exit handler alone would join it forever
        assert wait_gone(child, 10)
    finally:
        parent.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)
