"""Silence two harmless messages hivemind leaves when a peer's process ends.

A hivemind MPFuture that is garbage-collected after its asyncio loop has closed (at interpreter
exit, after the DHT and averagers shut down) tries to wake that loop and Python reports
"Exception ignored in: MPFuture.__del__ ... RuntimeError: Event loop is closed" with a
traceback. Nothing is lost: nobody waits on that future any more. The traceback made a clean
two-peer run look like a crash in the logs (and failed the test that checks logs hold none), so
exactly that case is dropped; every other unraisable exception still reaches the previous hook.

After the goodbye, asyncio tasks of hivemind's client loops in this process that nobody awaits
any more are garbage-collected at exit, and asyncio logs "Task was destroyed but it is pending!"
for each (seen after a clean SIGTERM leave, about one run in five). Once the peer has left, that
line says nothing, so it is dropped from then on; during training it still shows.
"""

import logging
import sys

_installed = False


def ignore_closed_loop_in_mpfuture_del() -> None:
    """Install the filter once per process (idempotent)."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        obj = getattr(unraisable, "object", None)
        owner = getattr(obj, "__qualname__", "")
        if (owner == "MPFuture.__del__" and isinstance(unraisable.exc_value, RuntimeError)
                and "Event loop is closed" in str(unraisable.exc_value)):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True


class _DropPendingTaskDestroyed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task was destroyed but it is pending!")


def ignore_pending_tasks_destroyed_after_leaving() -> None:
    """Called once the peer has left its swarm (idempotent)."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropPendingTaskDestroyed) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropPendingTaskDestroyed())
