"""hivemind.Optimizer as a swarm peer uses it: one that Lightning can wrap, with three of its habits fixed.

- Offloaded state stays on the CPU: Lightning moves optimizer state to the accelerator in place
  through `.state` (at setup and after loading a checkpoint), and hivemind hands out its real
  per-parameter dicts; the offloaded state then sat on cuda:0 beside CPU parameters and every
  step failed inside hivemind's background thread, logged and ignored.
- A joiner keeps its own hyperparameters: a downloaded state_dict carries the serving peer's
  betas, eps and weight decay, which silently replaced the joiner's config.
- Batches count by their samples (SampleWeightedGradientAverager): hivemind scales each local
  gradient by its size relative to the first batch after a reset and then divides by the number
  of batches, so [5, 32] gave the second 3.7x its weight.

hivemind is imported only when a peer starts, so the classes are built at the first call.
"""

import sys

_OPTIMIZER_CLASS = None
_AVERAGER_CLASS = None


def swarm_optimizer_class():
    """The hivemind.Optimizer subclass (built once, on first use)."""
    global _OPTIMIZER_CLASS
    if _OPTIMIZER_CLASS is None:
        _OPTIMIZER_CLASS = _build_class()
    return _OPTIMIZER_CLASS


def _build_class():
    import hivemind

    class SwarmOptimizer(hivemind.Optimizer):
        """hivemind.Optimizer that Lightning can wrap.

        Lightning's LightningOptimizer copies the optimizer's __dict__ into a subclass
        instance; hivemind's __del__ would shut the averagers down when that copy is
        collected. Only the original shuts down on deletion (teardown does it anyway).
        zero_grad leaves reused gradient buffers alone (Lightning calls it each step).
        """

        refused_download: str | None = None  # why the last downloaded state was refused (state_check.py)

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._original_id = id(self)
            # the config's hyperparameters (all but lr, which the schedule sets from its own base lr)
            self._configured = [_hyperparameters(group) for group in self.opt.param_groups]

        @property
        def state(self):
            state = super().state
            if not self.state_averager.offload_optimizer:
                return state  # the state lives with the module's parameters and moves with them
            # copies of the per-parameter dicts: what Lightning moves there stays beside the CPU parameters
            return {key: dict(value) if isinstance(value, dict) else value for key, value in state.items()}

        def _make_state_averager(self, **kwargs):
            from convmodel.collaborative.state_check import checked_state_averager_class

            # hivemind's own arguments (hivemind/optim/optimizer.py, 1.1.12) with the checked class, built as
            # such so that its state-serving thread sends the schema (state_check.py)
            return checked_state_averager_class()(
                dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
                allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
                offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
                status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
                client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

        def _make_progress_tracker(self, target_batch_size: int, **kwargs):
            from convmodel.collaborative.liveness import live_progress_tracker_class

            # hivemind's own arguments (hivemind/optim/optimizer.py, 1.1.12) with a tracker that drops dead peers
            return live_progress_tracker_class()(
                dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
                status_loglevel=self.status_loglevel, start=True, **kwargs)

        def load_state_from_peers(self, **kwargs):
            # a state that does not fit is refused (state_check.py) and said here; this peer keeps its own.
            # SwarmPeer.catch_up turns a refusal at the join into the run's error
            super().load_state_from_peers(**kwargs)
            self.refused_download, self.state_averager.state_mismatch = self.state_averager.state_mismatch, None
            if self.refused_download:
                print(f"[convmodel] refused the state a peer sent: {self.refused_download}", file=sys.stderr,
                      flush=True)
            _keep_configured(self.opt, self._configured, self.state_averager.scheduler)

        def __del__(self):
            if getattr(self, "_original_id", None) == id(self):
                super().__del__()

        @property
        def defaults(self) -> dict:
            return self.state_averager.optimizer.defaults  # read by LearningRateMonitor

        def zero_grad(self, set_to_none: bool = True):
            if self.use_gradient_averaging and self.grad_averager.reuse_grad_buffers:
                return  # hivemind zeroes its accumulators after each collaborative epoch
            super().zero_grad(set_to_none)

    return SwarmOptimizer


def _hyperparameters(group: dict) -> dict:
    return {key: value for key, value in group.items() if key not in ("params", "lr")}


def _keep_configured(optimizer, configured: list[dict], scheduler) -> None:
    """Put the config's hyperparameters back after a download, saying which ones the serving peer differed in."""
    differing = {}
    for group, own in zip(optimizer.param_groups, configured, strict=True):
        for key, value in own.items():
            if group.get(key) != value:
                differing[key] = (group.get(key), value)
            group[key] = value
    if scheduler is not None:  # the lr of this epoch from this peer's own schedule and base lr
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    if differing:
        theirs = ", ".join(f"{key}={served!r}" for key, (served, _) in differing.items())
        ours = ", ".join(f"{key}={own!r}" for key, (_, own) in differing.items())
        print(f"[convmodel] the peer that sent the swarm's state trains with {theirs}; this peer keeps its "
              f"config's {ours} (model.init_args)", flush=True)


def sample_weighted_averager_class():
    """hivemind's GradientAverager whose accumulated gradient is the sample-weighted mean of the local batches."""
    global _AVERAGER_CLASS
    if _AVERAGER_CLASS is None:
        import torch
        from hivemind.optim.grad_averager import GradientAverager

        class SampleWeightedGradientAverager(GradientAverager):
            """Each batch's mean gradient counts by its samples: sum(b_i g_i) / sum(b_i).

            hivemind adds (b_i / b_0) g_i for each batch and divides by their number; dividing by
            sum(b_i) / b_0 instead gives the weighted mean. With reuse_grad_buffers the .grad
            buffers hold the plain sum of the batches' mean gradients and hivemind's mean stays.
            """

            @torch.no_grad()
            def load_accumulators_into_averager_(self):
                if self.reuse_grad_buffers or not self._anchor_batch_size or not self.local_samples_accumulated:
                    return super().load_accumulators_into_averager_()
                scale = self._anchor_batch_size / self.local_samples_accumulated
                with self.get_tensors() as averaged_grads:
                    for grad_acc, averaged_grad in zip(self._grad_accumulators(), averaged_grads, strict=True):
                        averaged_grad.copy_(grad_acc, non_blocking=True).mul_(scale)

        _AVERAGER_CLASS = SampleWeightedGradientAverager
    return _AVERAGER_CLASS
