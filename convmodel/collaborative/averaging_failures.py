"""Counts hivemind's failed averaging rounds, which it reports only in its log, often at DEBUG level.

When a round fails (no group formed in time, a peer died mid-round, a timeout), hivemind.Optimizer
goes on with local gradients or unaveraged parameters and says so with `logger.log(status_loglevel,
...)`: DEBUG unless `verbose`, so a swarm that never really averages looks healthy. We let those two
loggers create their DEBUG records, count the failures and drop what the user did not ask to see.
The tracebacks of rounds hivemind itself had cancelled are dropped too (quiet_cancelled_round_errors).
"""

import logging

GRADIENTS_LOGGER, GRADIENTS_FAILED = "hivemind.optim.optimizer", "Averaging gradients failed"
STATE_LOGGER, STATE_FAILED = "hivemind.optim.state_averager", "Averaging failed with"


class AveragingFailureCounter(logging.Filter):
    """A filter on hivemind's optimizer and state averager loggers: counts failures, hides DEBUG noise."""

    def __init__(self, on_failure=None):
        super().__init__()
        self.on_failure = on_failure  # called after each failed round (liveness.py pings the other peers)
        self.gradients = 0  # rounds that fell back to local gradients
        self.state = 0  # parameter/optimizer-state rounds that failed
        self._levels: dict[str, int] = {}  # each logger's own level, restored by detach
        self._shown: dict[str, int] = {}  # the level each logger showed before we lowered it

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failed = False
        if record.name == GRADIENTS_LOGGER and message.startswith(GRADIENTS_FAILED):
            self.gradients += 1
            failed = True
        elif record.name == STATE_LOGGER and message.startswith(STATE_FAILED):
            self.state += 1
            failed = True
        if failed and self.on_failure is not None:
            self.on_failure()
        return record.levelno >= self._shown.get(record.name, logging.NOTSET)

    def attach(self) -> "AveragingFailureCounter":
        for name in (GRADIENTS_LOGGER, STATE_LOGGER):
            logger = logging.getLogger(name)
            self._levels[name], self._shown[name] = logger.level, logger.getEffectiveLevel()
            logger.setLevel(logging.DEBUG)
            logger.addFilter(self)
        return self

    def detach(self) -> None:
        for name, level in self._levels.items():
            logger = logging.getLogger(name)
            logger.removeFilter(self)
            logger.setLevel(level)
        self._levels = {}


class _DropCancelledRoundErrors(logging.Filter):
    """Drop asyncio's "Task exception was never retrieved" for a round the optimizer had already cancelled.

    hivemind.Optimizer pre-schedules averaging rounds and cancels one it no longer needs (a state
    round while the previous one still runs, a round of a peer that thinks it is alone); when the
    averager process has already formed the group it then sets a result on the cancelled future,
    and hivemind's handler catches asyncio's InvalidStateError, not the concurrent.futures one
    MPFuture raises. Nothing waits for that round, so the traceback tells the user nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from concurrent.futures import InvalidStateError

        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, InvalidStateError) and "CANCELLED" in str(exc))


def quiet_cancelled_round_errors() -> None:
    """Before the averagers fork (their processes inherit the filter): silence cancelled-round noise."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropCancelledRoundErrors) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropCancelledRoundErrors())
