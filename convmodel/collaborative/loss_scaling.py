"""Loss scaling for `trainer.precision: 16-mixed` in a synchronous swarm.

fp16 gradients underflow unless the loss is multiplied by a large scale before backward
(Lightning's MixedPrecision plugin does that in `pre_backward`); the scale must then be divided
out, and a gradient that overflowed to inf/NaN dropped, before the gradient counts. In a swarm
both must happen before hivemind accumulates the local step, and an overflow must cost one local
step, not a collaborative epoch:

- Gradient buffers not reused (the default): each local step's gradients sit alone in `.grad`;
  the plain torch GradScaler unscales them in place before hivemind copies them into its own
  accumulators, so the scale may change from one local step to the next.
- `reuse_grad_buffers: true`: `.grad` holds the sum of the epoch's local steps, which can be
  unscaled only once, inside the collaborative step; hivemind's GradScaler checks each local
  step, unscales in hivemind's step and grows the scale only after one, so that every local step
  summed in the buffers was scaled alike.

An overflow with a finite loss is fp16 doing its ordinary business: the step's gradients are
dropped and the scale falls. It is not a NaN event (nan_guard.py counts those and restores
backups). The scaler stays the precision plugin's, so Lightning saves its scale in every
checkpoint (under the plugin's class name) and restores it on resume.
"""

import sys

import torch

from convmodel.collaborative.nan_guard import all_finite, drop_local_gradients
from convmodel.collaborative.swarm_options import OPTION, SwarmOptions
from convmodel.errors import UserError


class _Gradients:
    """What torch's GradScaler.unscale_ reads of an optimizer: the parameters whose .grad it divides."""

    def __init__(self):
        self.param_groups: list[dict] = []


class SwarmLossScaler:
    """The precision plugin's scaler applied to one peer's local steps (SwarmPeer.unscale_gradients and step)."""

    def __init__(self, scaler, reuse_grad_buffers: bool):
        self.scaler = scaler
        self.in_hivemind_step = reuse_grad_buffers  # hivemind's GradScaler: unscaled inside hivemind's step
        self.overflows = 0
        self._gradients = _Gradients()  # one object: the scaler keys its per-step record by id until update()

    @property
    def scale(self) -> float:
        return float(self.scaler.get_scale())

    def overflowed(self, opt) -> bool:
        """After backward: unscale this local step's gradients (or, reused, only check them); True on inf/NaN."""
        if self.in_hivemind_step:
            return not self.scaler.are_grads_finite(opt)  # records the check for update()
        return self.overflowed_params(list(opt.state_averager.main_parameters))

    def overflowed_params(self, params: list[torch.Tensor]) -> bool:
        """Unscale these parameters' gradients in place (torch's scaler); True when one is inf/NaN. Every rank of a
        peer with several devices calls it on the same averaged gradients, so their scales stay equal."""
        self._gradients.param_groups = [{"params": params}]
        self.scaler.unscale_(self._gradients)  # an inf or NaN stays one
        return not all_finite([p.grad for p in params if p.grad is not None])

    def step_arguments(self) -> dict:
        """Extra arguments of hivemind.Optimizer.step: its GradScaler unscales the summed buffers itself."""
        return {"grad_scaler": self.scaler} if self.in_hivemind_step else {}

    def drop(self, opt) -> None:
        """An overflow: this local step's gradients never count (update() then lowers the scale)."""
        drop_local_gradients(opt, self.in_hivemind_step)

    def update(self, overflowed: bool, announce: bool = True) -> None:
        """Once per local step, after the step or the drop: the scale falls after an overflow, may grow after none."""
        self.scaler.update()
        self.overflows += int(overflowed)
        if overflowed and announce:
            print(f"[convmodel] fp16 gradients overflowed: skipped a local step, loss scale now {self.scale:g} "
                  f"(total {self.overflows})", file=sys.stderr, flush=True)


def swarm_loss_scaler(plugin, options: SwarmOptions) -> SwarmLossScaler | None:
    """The loss scaler for the precision plugin of a synchronous peer, or None when it scales nothing.

    The plugin's scaler is replaced by one of the kind the options need (same settings and state),
    so Lightning's backward scales the loss with the scaler the peer unscales with.
    """
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    if options.reuse_grad_buffers and options.delay_optimizer_step:
        raise UserError(f"{OPTION}: precision 16-mixed with reuse_grad_buffers: true cannot delay the optimizer "
                        "step (the loss scale would change while the next epoch's gradients are summed into the "
                        "same buffers); set delay_optimizer_step: false, or reuse_grad_buffers: false")
    matching = _scaler_of_kind(scaler, hivemind_kind=options.reuse_grad_buffers)
    if matching is not scaler:
        plugin.scaler = matching
    return SwarmLossScaler(matching, options.reuse_grad_buffers)


def _scaler_of_kind(scaler, hivemind_kind: bool):
    """`scaler` if it is of the kind asked for, else one of that kind with its settings and state."""
    from hivemind import GradScaler as HivemindGradScaler

    if isinstance(scaler, HivemindGradScaler) == hivemind_kind:
        return scaler
    kind = HivemindGradScaler if hivemind_kind else torch.amp.GradScaler
    # torch.amp.GradScaler keeps its settings in these attributes (torch/amp/grad_scaler.py)
    matching = kind(scaler._device, init_scale=scaler._init_scale, growth_factor=scaler._growth_factor,
                    backoff_factor=scaler._backoff_factor, growth_interval=scaler._growth_interval, enabled=True)
    state = scaler.state_dict()
    if state:  # a scaler that already scaled a loss
        matching.load_state_dict(state)
    return matching
