"""What a training peer tells about its swarm: the epoch line, the collab/* scalars and its metrics record.

One line per collaborative epoch ("collaborative epoch N (P peers, lr X, S s)", S being the
seconds since the previous epoch line: a stalled swarm shows there first, with the averaging
rounds that failed), the values the trainer logs at each local step, and the signed record the
monitor reads from the DHT (MetricsPublisher).
"""

import math
import time

import torch


class EpochReport:
    """Per-epoch bookkeeping of one peer; `failures` is an AveragingFailureCounter or None."""

    def __init__(self, run_id: str, target_batch_size: int, failures=None):
        self.run_id, self.target_batch_size, self.failures = run_id, target_batch_size, failures
        self.epoch_seen: int | None = None
        self._started_at: float | None = None
        self._swarm_samples_per_second = float("nan")
        self._failures_seen = 0
        self._loss_sum: torch.Tensor | None = None  # this peer's losses in the current epoch
        self._mini_steps = 0
        self.samples_contributed = 0
        self._publisher = None  # MetricsPublisher, from `start`

    def start(self, opt, dht, signer, expiration: float) -> None:
        from convmodel.collaborative.publisher import MetricsPublisher

        self.epoch_seen, self._started_at = opt.local_epoch, time.perf_counter()
        self._publisher = MetricsPublisher(dht, self.run_id, signer, expiration)
        self.publish(opt)  # counted by the monitor from the start, not only after an epoch

    def add_loss(self, loss: torch.Tensor) -> None:
        # a tensor sum: no device sync per step; read once per collaborative epoch
        loss = loss.detach().float().sum()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._mini_steps += 1

    def new_epoch(self, opt) -> bool:
        """Print the epoch line if the swarm moved to a new epoch since the last call; True if it did."""
        epoch = opt.local_epoch
        if self.epoch_seen is None or epoch == self.epoch_seen:
            return False
        now = time.perf_counter()
        seconds = now - self._started_at if self._started_at is not None else float("nan")
        if epoch == self.epoch_seen + 1:
            self._swarm_samples_per_second = self.target_batch_size / max(seconds, 1e-9)
        self.epoch_seen, self._started_at = epoch, now
        peers = max(opt.tracker.global_progress.num_peers, 1)  # 0 until the first progress fetch
        failures = self.failures.gradients + self.failures.state if self.failures is not None else 0
        failed = f", {failures - self._failures_seen} averaging round(s) failed" if failures > self._failures_seen else ""
        self._failures_seen = failures
        print(f"[convmodel] collaborative epoch {epoch} ({peers} peer{'s' if peers != 1 else ''}, "
              f"lr {opt.param_groups[0]['lr']:.3g}, {seconds:.2f} s{failed})", flush=True)
        return True

    def publish(self, opt) -> None:
        """This peer's record for the monitor: the epoch it is in now, and its loss summed over the local
        steps of the epoch that just ended (the monitor divides the swarm's sums: a mean over all steps)."""
        if self._publisher is None:
            return
        loss_sum = float(self._loss_sum) if self._loss_sum is not None else None
        self._publisher.publish(
            epoch=opt.local_epoch, samples_per_second=float(opt.tracker.performance_ema.samples_per_second),
            samples_accumulated=self.samples_contributed, loss=loss_sum, mini_steps=self._mini_steps)
        self._loss_sum, self._mini_steps = None, 0

    def values(self, opt, skipped_steps: int) -> dict[str, float]:
        """The collab/* scalars of this local step."""
        progress = opt.tracker.global_progress
        values = {
            "collab/epoch": float(opt.local_epoch),
            "collab/peers": float(max(progress.num_peers, 1)),
            "collab/samples_accumulated": float(progress.samples_accumulated),
            "collab/local_samples_per_second": float(opt.tracker.performance_ema.samples_per_second),
            "collab/skipped_steps": float(skipped_steps),
        }
        if self.failures is not None:
            values["collab/failed_gradient_rounds"] = float(self.failures.gradients)
            values["collab/failed_state_rounds"] = float(self.failures.state)
        if not math.isnan(self._swarm_samples_per_second):
            values["collab/samples_per_second"] = self._swarm_samples_per_second
        return values

    def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()
        failures, self.failures = self.failures, None
        if failures is not None:
            failures.detach()
