"""StopOnSignal, the one signal policy of trainer and auxiliary peer: the first signal asks, the second stops."""

import signal

import pytest

from convmodel.collaborative.signals import StopOnSignal
from convmodel.collaborative.swarm_options import SwarmOptions
from convmodel.errors import UserError

try:  # the shards of the multi-peer tests (they need hivemind; the first tests here do not)
    from test_collaborative import TINY_BERT, shards  # noqa: F401
except pytest.skip.Exception:
    TINY_BERT = None


def test_first_signal_asks_to_stop_and_the_second_stops_at_once():
    asked = []
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopOnSignal((signal.SIGUSR1,), lambda signum: asked.append(signum) or True)
    stop.install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert asked == [signal.SIGUSR1] and stop.received == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR1)
        assert signal.getsignal(signal.SIGUSR1) == previous  # the second one put the old handler back
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_with_nothing_to_stop_stops_at_once():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopOnSignal((signal.SIGUSR2,), lambda signum: False)  # e.g. Ctrl-C before training began
    stop.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR2)
    finally:
        stop.restore()
        signal.signal(signal.SIGUSR2, previous)


# a program whose first Ctrl-C is taken and whose exit then waits (as for a thread left in a cut-short goodbye)
SHUTDOWN_WAITS = """
import atexit, signal, threading
from convmodel.collaborative.signals import StopOnSignal
stop = StopOnSignal((signal.SIGINT,), lambda signum: True)
stop.install()
def waiting_exit():
    print("waiting at exit", flush=True)
    threading.Event().wait(120)
atexit.register(waiting_exit)
signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: asks to stop
assert stop.received == signal.SIGINT
"""


def test_a_second_ctrl_c_while_python_shuts_down_exits_at_once_without_a_traceback():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", SHUTDOWN_WAITS], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while (line := process.stdout.readline()) and "waiting at exit" not in line:
            lines.append(line)
        assert line, (lines, process.stderr.read())
        process.send_signal(signal.SIGINT)  # the second Ctrl-C, in an exit handler
        status = process.wait(30)
    finally:
        process.kill()
    stderr = process.stderr.read()
    assert status == 130, stderr
    assert stderr.strip() == "[convmodel] stopping at once (Ctrl-C)", stderr


def test_delayed_optimizer_step_needs_delayed_state_averaging():
    # hivemind asserts this inside its background thread at the first collaborative step
    options = SwarmOptions(offload_optimizer=True, delay_optimizer_step=True, delay_state_averaging=False)
    with pytest.raises(UserError, match="delay_optimizer_step needs delay_state_averaging: true"):
        options.check()


@pytest.mark.timeout(180)
def test_ctrl_c_after_fit_returns_stops_the_program(shards, tokenizer_dir, capsys):  # noqa: F811
    """Lightning's signal connector puts back the handlers it found at its start, ours among them, after our
    teardown: a Ctrl-C after fit() must act as before fit(), not ask a finished trainer to stop."""
    pytest.importorskip("hivemind")
    from pytorch_lightning import Trainer

    from convmodel.collaborative import HivemindStrategy
    from convmodel.data import JsonlDataModule
    from convmodel.models import BertPretraining

    strategy = HivemindStrategy(run_id="sigint_test", target_batch_size=16, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                use_ipfs=False, use_relay=False, use_auto_relay=False, nat_port_map=False,
                                auto_nat=False, matchmaking_time=0.5, averaging_timeout=5.0,
                                max_collaborative_epochs=1)
    model = BertPretraining(tokenizer=tokenizer_dir, config=TINY_BERT, lr=2e-3, warmup_steps=2, total_steps=50)
    data = JsonlDataModule(tokenizer=tokenizer_dir, train_files=str(shards / "train" / "part-*.jsonl"),
                           batch_size=8, max_seq_len=64, shuffle_buffer_size=100)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=100, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    before = signal.getsignal(signal.SIGINT)
    # as in a fresh program (hivemind peers started by earlier tests set SIGINT to "ignore" in this process)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer.fit(model, datamodule=data)
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert "leaving the swarm" not in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, before)
