"""The unraisable-exception filter drops only hivemind's closed-loop message from MPFuture.__del__."""

import gc
import sys

from convmodel.collaborative import exit_noise


def test_only_the_closed_loop_error_of_mpfuture_del_is_dropped(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(str(unraisable.exc_value)))
    monkeypatch.setattr(exit_noise, "_installed", False)
    exit_noise.ignore_closed_loop_in_mpfuture_del()

    class MPFuture:  # the same qualified name as hivemind's, raising what it raises at exit
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    MPFuture.__del__.__qualname__ = "MPFuture.__del__"
    MPFuture("Event loop is closed")
    MPFuture("something else")
    gc.collect()
    assert seen == ["something else"]
