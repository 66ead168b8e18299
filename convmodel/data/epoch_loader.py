"""The DataLoader the DataModule hands Lightning: it tells its stream and collator the epoch of each pass.

Lightning creates the loader once and iterates it once per epoch; the stream's shard order and
shuffle and the collator's training masks are drawn per epoch, so each pass has to be told
which one it is (and, resuming, how many batches of it were already trained on) before its
workers start.
"""

from collections.abc import Callable

from torch.utils.data import DataLoader


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its dataset and collator the epoch before each pass.

    `set_epoch` runs in the main process when the iterator is created; with
    persistent_workers=False the workers start afterwards and see the new value.
    `start_fn` (the training loader's) gives (epoch, batches to leave out) for the pass that
    starts, and `on_batch` hears of every batch handed out.
    """

    def __init__(self, dataset, *args, epoch_fn: Callable[[], int] | None = None,
                 start_fn: Callable[[], tuple[int, int]] | None = None, on_batch: Callable[[], None] | None = None,
                 **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.start_fn = start_fn
        self.on_batch = on_batch

    def __iter__(self):
        if self.start_fn is not None:
            epoch, skip = self.start_fn()
        else:
            epoch, skip = (self.epoch_fn() if self.epoch_fn is not None else 0), 0
        self.dataset.set_epoch(epoch)
        if skip:
            self.dataset.resume_after(skip, self.batch_size, self.num_workers)
        if hasattr(self.collate_fn, "set_epoch"):
            self.collate_fn.set_epoch(epoch)
        batches = super().__iter__()
        return batches if self.on_batch is None else self._counted(batches)

    def _counted(self, batches):
        for batch in batches:
            self.on_batch()
            yield batch
