"""StepProgressBar: training progress in optimizer steps of trainer.max_steps.

Our shards are streamed (an IterableDataset without a length), so Lightning's bars count
batches of an epoch whose size it does not know: `Epoch 3/-2`, `170/99` after a resume,
`Validation 6/--`. A pretraining run is measured in steps, so the training bar shows
`step 170/400` across epochs and resumes, and an evaluation bar of unknown length shows only
how many batches it has done.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, convert_inf

STEP_DESCRIPTION = "Training step"
UNKNOWN_TOTAL_FORMAT = "{desc}{n_fmt} batches [{elapsed}, {rate_noinv_fmt}{postfix}]"


def _max_steps(trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar counting optimizer steps of max_steps; evaluation bars without a made-up total."""

    def _count_steps(self, trainer, bar=None) -> None:
        bar = bar if bar is not None else self.train_progress_bar
        bar.total = _max_steps(trainer)
        bar.n = trainer.global_step
        bar.set_description(STEP_DESCRIPTION)
        bar.refresh()

    def init_train_tqdm(self) -> Tqdm:
        max_steps = _max_steps(self.trainer)
        if max_steps is None:
            return super().init_train_tqdm()
        # total and position from the first draw (else it reads `Training: 0/?`); also for a run
        # resumed mid-epoch, which gets no on_train_epoch_start
        return Tqdm(desc=STEP_DESCRIPTION, total=max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if _max_steps(trainer) is None:  # no step budget: Lightning's per-epoch bar
            return super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if _max_steps(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _fix_unknown_total(self, bar, total) -> None:
        if bar is not None and convert_inf(total) is None:
            bar.bar_format = UNKNOWN_TOTAL_FORMAT

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._fix_unknown_total(self.val_progress_bar, self.total_val_batches_current_dataloader)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._fix_unknown_total(self.test_progress_bar, self.total_test_batches_current_dataloader)
