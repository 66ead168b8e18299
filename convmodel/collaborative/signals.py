"""Leaving a swarm on a signal: the first one asks to stop cleanly, a second one stops at once.

Shared by the trainer's HivemindStrategy (Ctrl-C) and the auxiliary peer (Ctrl-C and SIGTERM).
Why a handler of our own: hivemind's averagers set SIGINT to "ignore" in this process before
they fork and never put it back, so Ctrl-C would do nothing; and a KeyboardInterrupt raised
inside a hivemind call can leave a lock held that the goodbye then waits on forever. So the first
signal only asks the peer's loop to stop after what it is doing (a clean leave the others notice
within one matchmaking round); the second restores the previous handlers and raises
KeyboardInterrupt.

A terminal's Ctrl-C is sent to the whole foreground process group, hivemind's processes included:
`sigint_ignored` starts them with SIGINT ignored (inherited across fork), and dht.py puts the Go
p2pd daemon, which handles SIGINT itself whatever it inherits, in a process group of its own.
Without that the daemon and the DHT died under the trainer, whose goodbye then waited for them.
"""

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StopOnSignal:
    """Install with `install()` once hivemind has started its processes; `restore()` puts the old handlers back.

    `on_first(signum)` runs for the first signal and returns whether it took it; when it returns
    False (nothing to stop yet) the signal acts as a second one.
    """

    def __init__(self, signals: tuple[int, ...], on_first: Callable[[int], bool]):
        self.signals, self.on_first = signals, on_first
        self.received: int | None = None  # the first signal's number, once one came
        self._previous: dict[int, object] = {}
        self._restored: dict[int, object] | None = None  # what `restore` put back

    def install(self, previous: dict[int, object] | None = None) -> None:
        """Take over the signals (in the main thread only; elsewhere Python cannot set handlers).

        `previous`: the handlers to restore, when hivemind already replaced the ones before it.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._restored = None
        for number in self.signals:
            handler = (previous or {}).get(number, signal.getsignal(number))
            self._previous[number] = signal.default_int_handler if (
                handler is None and number == signal.SIGINT) else handler
            signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._restored is not None:
            # restored already, and someone put this handler back (Lightning's signal connector restores
            # the handlers it found at the start of fit, after the strategy's teardown): act as before us
            handler = self._restored.get(signum)
            restore_handlers({signum: handler})
            if callable(handler):
                return handler(signum, frame)
            if handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # delivered again, now to the default action
            return None  # SIG_IGN, or a handler Python did not set: nothing more to do
        if self.received is None and self.on_first(signum):
            self.received = signum
            return
        self.restore()
        raise KeyboardInterrupt

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        if previous:
            self._restored = previous
        restore_handlers(previous)


def restore_handlers(handlers: dict[int, object]) -> None:
    """Set each signal's handler back (main thread only; a None handler, one not set from Python, stays)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)



@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process while the block starts child processes (they inherit "ignore").

    Main thread only (elsewhere the block runs as it is); the handler before it is put back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
