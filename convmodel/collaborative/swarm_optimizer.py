"""hivemind.Optimizer as a swarm peer uses it: one that Lightning can wrap and call like its own.

hivemind is imported only when a peer starts, so the subclass is built at the first call.
"""

_OPTIMIZER_CLASS = None


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

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._original_id = id(self)

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
