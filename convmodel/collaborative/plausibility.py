"""What the swarm's numbers can plausibly be, when anyone can sign a metrics record or serve a state.

A metrics record is signed by its peer's own RSA key and a state is served by whoever announces
one under the run's prefix, so a stranger can claim any epoch, loss or throughput. The auxiliary
peer's monitor and checkpoints trust what the majority of records agree on, and what time allows:

- the swarm epoch is the highest epoch a strict majority of alive records reach (`majority_epoch`):
  one honest peer alone gives its own epoch; one honest peer and one liar give the lower of the two,
  so a liar can hold the reported epoch back (until it leaves or a third peer joins) but never push
  it forward, which is the harmful direction (checkpoints wait for the epoch to pass the stored one,
  and an absurd epoch would be stored and served to every joiner);
- an epoch is implausible when it is beyond what time allows since the last accepted one
  (`EpochClock`, at most MAX_EPOCHS_PER_SECOND plus EPOCH_SLACK), or more than MAX_LEAD epochs
  beyond the majority's.

MAX_EPOCHS_PER_SECOND: a hivemind peer learns that the swarm finished an epoch from the progress
records it fetches at most every min_refresh_period (0.5 s by default), and a swarm of several peers
also spends matchmaking_time per averaging round; 5 epochs per second is well above both. Honest
peers stay within a few epochs of each other (one that falls behind downloads the swarm's state),
but a peer that left keeps its record alive for metadata_expiration (60 s by default) at its last
epoch, which can hold the majority back by what the swarm does meanwhile: MAX_LEAD is 100 epochs.
"""

import math
from dataclasses import dataclass

MAX_EPOCHS_PER_SECOND = 5.0
EPOCH_SLACK = 2  # epochs always allowed past the last accepted one (peers one epoch apart, a refresh late)
MAX_LEAD = 100
SAMPLES_FACTOR = 10.0  # a record counts with at most this many times the lower median of samples/s


def majority_epoch(epochs: list[int]) -> int:
    """The highest epoch that more than half of `epochs` reach (the lower median; `epochs` not empty)."""
    ordered = sorted(epochs)
    return ordered[(len(ordered) - 1) // 2]


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def epochs_allowed(epoch: int, seconds: float) -> float:
    """The highest epoch a swarm at `epoch` can plausibly reach `seconds` later."""
    return epoch + EPOCH_SLACK + MAX_EPOCHS_PER_SECOND * max(seconds, 0.0)


@dataclass
class EpochClock:
    """The last accepted swarm epoch and when it was first accepted (time.monotonic()): bounds the next."""

    epoch: int | None = None
    since: float = 0.0

    def bound(self, now: float) -> float:
        """The highest plausible epoch now; infinite before any epoch was accepted."""
        return math.inf if self.epoch is None else epochs_allowed(self.epoch, now - self.since)

    def accept(self, epoch: int, now: float) -> None:
        if epoch != self.epoch:
            self.epoch, self.since = epoch, now


def plausible_mean_loss(record: dict) -> float | None:
    """A record's loss per local step, or None when it has none or it is absurd: non-finite, or not above 0
    (the models' losses are cross-entropies of real text, never 0 in practice). Beside one honest peer,
    a liar can still pull the loss down to a plausible value it claims (it cannot be told from the honest
    one), but not to 0 and not up to an absurd value (monitor.robust_loss)."""
    loss, steps = record["loss"], record["mini_steps"]
    if loss is None or steps <= 0:
        return None
    mean = loss / steps
    return mean if math.isfinite(mean) and mean > 0.0 else None
