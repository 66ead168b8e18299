"""StopOnSignal, the one signal policy of trainer and auxiliary peer: the first signal asks, the second stops."""

import signal

import pytest

from convmodel.collaborative.signals import StopOnSignal
from convmodel.collaborative.swarm_options import SwarmOptions
from convmodel.errors import UserError


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


def test_delayed_optimizer_step_needs_delayed_state_averaging():
    # hivemind asserts this inside its background thread at the first collaborative step
    options = SwarmOptions(offload_optimizer=True, delay_optimizer_step=True, delay_state_averaging=False)
    with pytest.raises(UserError, match="delay_optimizer_step needs delay_state_averaging: true"):
        options.check()
