"""Leaving a swarm on a signal: the first one asks to stop cleanly, a second one stops at once.

Shared by the trainer's HivemindStrategy and the auxiliary peer, for Ctrl-C and SIGTERM alike (what
`docker stop`, systemd and Kubernetes send).
Why a handler of our own: hivemind's averagers set SIGINT to "ignore" in this process before
they fork and never put it back, so Ctrl-C would do nothing; and a KeyboardInterrupt raised
inside a hivemind call can leave a lock held that the goodbye then waits on forever. So the first
signal only asks the peer's loop to stop after what it is doing (a clean leave the others notice
within one matchmaking round); the second restores the previous handlers and raises
KeyboardInterrupt (or, once the program is shutting down, ends the process at once).

A terminal's Ctrl-C is sent to the whole foreground process group, hivemind's processes included
(and systemd's SIGTERM to every process of a unit): `shielded_children` starts them with both
ignored and dying with their parent, and dht.py puts the Go p2pd daemon, which handles SIGINT
itself whatever it inherits, in a process group of its own. Without that the daemon and the DHT
died under the trainer, whose goodbye then waited for them.
"""

import atexit
import os
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

    def take_back(self) -> None:
        """Handle the signals again where someone replaced the handler since `install` (main thread only)."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for number in self.signals:
                signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        if not threading.main_thread().is_alive():
            # Python is shutting down (the fit returned): whatever handler came before would raise in an exit
            # handler (CI: torch's library finalizer, "Exception ignored ... KeyboardInterrupt")
            exit_at_once(signum)
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


def exit_at_once(signum: int) -> None:
    """End the process now with the shell's status for `signum` (130 for Ctrl-C), after one line.

    For a second signal while Python shuts down (the main program has returned: the main thread
    counts as stopped). A KeyboardInterrupt raised there lands in an exit handler, such as the
    one joining the thread pools' threads (a thread left in a goodbye cut short can keep that
    join waiting): Python prints it as "Exception ignored" with a traceback and goes on waiting.
    hivemind's processes die with this one (`shielded_children`), so nothing is left behind.
    """
    import sys

    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, f"[convmodel] stopping at once ({name})\n".encode())
    os._exit(128 + signum)


def restore_handlers(handlers: dict[int, object]) -> None:
    """Set each signal's handler back (main thread only; a None handler, one not set from Python, stays)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)



class _ForkMark:
    """Alive while `shielded_children` runs: multiprocessing's after-fork registry holds it weakly."""

    def __init__(self):
        self.parent = os.getpid()


@contextmanager
def shielded_children() -> Iterator[None]:
    """Processes forked by multiprocessing in this block ignore SIGINT and SIGTERM and die with this process.

    For hivemind's DHT and averager processes, which the trainer stops itself after its goodbye: a
    Ctrl-C to the terminal's group, or systemd's SIGTERM to every process of the unit, used to end
    them under the trainer, whose goodbye then waited for them. And a `kill -9` of the trainer alone
    left them running for good (they kept announcing the dead peer and held its port and identity,
    so a restart with the same identity_path failed): PR_SET_PDEATHSIG (Linux) sends them SIGKILL
    when the thread that forked them ends, so only forks from the main thread get it. Nothing changes
    in this process: a signal to it during the block is handled as before.

    Ignoring SIGTERM means `Process.terminate()` no longer ends them, and multiprocessing's exit
    handler terminates then joins every daemon child without a timeout: one left alive (a goodbye
    cut short) would hang the exit. So the processes started here are killed (SIGKILL) at exit, before
    that handler runs.
    """
    import multiprocessing.util

    before = set(multiprocessing.active_children())
    mark = _ForkMark()
    multiprocessing.util.register_after_fork(mark, _in_a_shielded_child)
    mark.main_thread = threading.current_thread() is threading.main_thread()
    try:
        yield
    finally:
        del mark  # the registry drops it: later forks (DataLoader workers) are left as they are
        started = [process for process in multiprocessing.active_children() if process not in before]
        if started and not _SHIELDED:
            atexit.register(_kill_shielded)  # atexit runs last-registered first: before multiprocessing's
        _SHIELDED.extend(started)


#: processes started by `shielded_children`, killed at exit if still alive
_SHIELDED: list = []


def _kill_shielded() -> None:
    alive = [process for process in _SHIELDED if process.is_alive()]
    for process in alive:
        process.kill()
    for process in alive:
        process.join(5)


def _in_a_shielded_child(mark: _ForkMark) -> None:
    """Runs in the forked child before its work starts (multiprocessing's after-fork hook)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mark.main_thread:
        die_with_parent(signal.SIGKILL)
        if os.getppid() != mark.parent:  # the parent died before the line above
            os._exit(1)


def die_with_parent(signum: int) -> None:
    """PR_SET_PDEATHSIG: this process gets `signum` when its parent ends (Linux; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
