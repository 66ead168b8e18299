"""A callback for subprocess tests: writes a file once training has taken some steps.

The test watches for that file instead of sleeping, then signals the trainer.
"""

from pathlib import Path

from pytorch_lightning import Callback


class StepFile(Callback):
    """Write `path` (the step reached) after `after_steps` optimizer steps."""

    def __init__(self, path: str, after_steps: int = 2):
        self.path = Path(path)
        self.after_steps = after_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.after_steps and not self.path.exists():
            self.path.write_text(str(trainer.global_step))
