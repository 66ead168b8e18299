"""Where the training stream stands, so that a resumed run reads on exactly where the first stopped.

The position is (epoch of the data, batches of it consumed). It is the data's own epoch, one per
pass over the shards, not Lightning's `current_epoch`: a run stopped by max_steps in the middle of
a pass has its Lightning epoch counted as finished, and resuming it would start the next epoch's
order and masks where the uninterrupted run was still reading the first.

Batches consumed: with a Trainer, the batches its training loop has run since this pass began
(the growth of its `batch_progress.total.processed`, a count Lightning saves and restores and
never resets between epochs; the DataLoader has already handed out a batch or two more,
prefetched). Without one (a plain loop over train_dataloader()), the
batches the loader has handed out.
"""

from collections.abc import Callable

FORMAT = 1
# the options a mid-epoch position depends on: with another value the same position is other samples
LAYOUT = ("batch_size", "num_workers", "world_size", "seed", "shuffle_buffer_size", "records")
OPTION = {"batch_size": "data.batch_size", "num_workers": "data.num_workers",
          "world_size": "the number of devices (trainer.devices x trainer.num_nodes)", "seed": "data.seed",
          "shuffle_buffer_size": "data.shuffle_buffer_size", "records": "the records in data.train_files"}


class TrainPosition:
    """The train loader's pass counter and its count of consumed batches."""

    def __init__(self):
        self.epoch = 0
        self.started = False
        self.skip = 0  # batches left out at the start of this pass (a resume)
        self.yielded = 0  # batches handed out in this pass, the skipped ones included
        self.trainer_base = 0  # the Trainer's total count of processed batches when this pass began
        self.pending: tuple[int, int] | None = None  # (epoch, batches) loaded from a checkpoint

    def begin_pass(self, first_epoch: int, batches_per_pass: Callable[[], int], processed: int | None) -> tuple[int, int]:
        """(epoch, batches to skip) of the pass that starts now."""
        if self.pending is not None:
            (epoch, skip), self.pending = self.pending, None
            if skip and skip >= batches_per_pass():  # stopped right at the end of a pass
                epoch, skip = epoch + 1, 0
        else:
            epoch, skip = (self.epoch + 1 if self.started else first_epoch), 0
        self.epoch, self.skip, self.yielded, self.started = epoch, skip, skip, True
        self.trainer_base = processed or 0
        return epoch, skip

    def consumed(self, processed: int | None) -> int:
        """Batches of this pass that training has used (`processed`: the Trainer's total count, None: no Trainer)."""
        if processed is None:
            return self.yielded
        return self.skip + processed - self.trainer_base


def mismatches(saved: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's layout and this run's, as option = saved vs now."""
    return [f"{OPTION[k]} was {saved.get(k)!r}, now {now[k]!r}" for k in LAYOUT if saved.get(k) != now[k]]
