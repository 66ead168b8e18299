"""A TensorBoard logger that gets a real Ctrl-C (SIGINT to this process) while Lightning closes it.

That is where a user's second Ctrl-C lands when a swarm peer's goodbye ended a moment before it: Lightning
then handles the KeyboardInterrupt by finalizing the logger again, which fails ("Writer is closed").
"""
import signal

from pytorch_lightning.loggers import TensorBoardLogger


class CtrlCWhileClosingLogger(TensorBoardLogger):
    def finalize(self, status: str) -> None:
        if status != "success":
            return super().finalize(status)
        # the state a Ctrl-C leaves when it interrupts SummaryWriter.close() waiting for its writer thread: the
        # event file's writer is closed, the SummaryWriter does not know it yet
        self.experiment.flush()
        for writer in self.experiment.all_writers.values():
            writer.event_writer._async_writer.close()
        signal.raise_signal(signal.SIGINT)
