"""Optimizer and learning-rate schedule factories shared by every model module.

Modules name an optimizer and a schedule with plain strings (`Literal` choices in their
signatures), so a YAML file stays serialisable and `--print_config` shows the choice.
"""

import math
from collections.abc import Iterable
from functools import partial
from itertools import chain
from typing import Literal

import torch

from convmodel.errors import UserError

OptimizerName = Literal["adamw", "lamb", "lamb8bit"]
ScheduleName = Literal["linear", "constant"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (weights, embeddings) decay, vectors (biases, norms) do not.

    One rule instead of a list of names (nanoGPT): a parameter with two or more
    dimensions is decayed, anything else is not. Frozen parameters are left out.
    `layer_adaptation` is read by LAMB only (AdamW keeps and ignores the key): the trust
    ratio ||w|| / ||update|| suits matrices, but a zero-initialised bias would move by
    about lr * ||bias|| per step, i.e. hardly at all, so vectors take plain Adam steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "layer_adaptation": True},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "layer_adaptation": False},
    ]


def adam_direction_(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update the fp32 moments with `grad` in place and return Adam's bias-corrected direction.

    Shared by Lamb and Lamb8bit so the two take the same step; `out` (fp32, the shape of
    `grad`) receives the direction, which lets Lamb8bit fill one buffer chunk by chunk.
    """
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = torch.div(exp_avg_sq, 1 - beta2**step, out=out).sqrt_().add_(eps)
    return torch.div(exp_avg, denom, out=denom).div_(1 - beta1**step)


def lamb_apply_(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, adapt: bool) -> None:
    """Add decoupled weight decay to `update` (fp32, consumed) and move `param` by lr * trust * update.

    The trust ratio ||w|| / ||update|| is computed as tensors (no host sync on CUDA) and is 1
    where either norm is 0, so a zero-initialised tensor takes an Adam step instead of none.
    """
    weight = param.float()  # the parameter itself when it is fp32: read here, written last
    if weight_decay != 0:
        update.add_(weight, alpha=weight_decay)
    if adapt:
        w_norm, u_norm = weight.norm(), update.norm()
        update.mul_(torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0))
    if weight is param:
        param.sub_(update, alpha=lr)
    else:
        param.copy_(weight.sub_(update, alpha=lr))


class LambBase(torch.optim.Optimizer):
    """What Lamb and Lamb8bit share: hyperparameter checks and a `load_state_dict` that keeps dtypes.

    torch's `Optimizer.load_state_dict` casts every state tensor of a floating-point parameter
    to the parameter's dtype: Lamb8bit's uint8 codes would become floats, and with bf16
    parameters the fp32 moments and block scales would lose precision. Here each state tensor
    keeps the dtype it was saved with. Group keys that a checkpoint lacks (`layer_adaptation`
    in checkpoints written before it existed) are taken from the groups the optimizer was built
    with, so a resumed run follows `param_groups()` as it is now.
    """

    def __init__(self, params: Iterable, defaults: dict):
        lr, eps, wd, (beta1, beta2) = defaults["lr"], defaults["eps"], defaults["weight_decay"], defaults["betas"]
        if lr < 0 or eps < 0 or wd < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"invalid LAMB hyperparameters: lr={lr}, betas={defaults['betas']}, eps={eps}, "
                             f"weight_decay={wd}")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                update = self._direction(p, state, group)
                lamb_apply_(p, update, group["lr"], group["weight_decay"], group["layer_adaptation"])
        return loss

    def _direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Adam's direction for `p` from its moments in `state` (updated in place); per subclass."""
        raise NotImplementedError

    def _convert_saved_state(self, state_dict: dict) -> dict:
        """Hook for a subclass to read other state layouts; the identity here."""
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = self._convert_saved_state(state_dict)
        built = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                # a copy: stepping this optimizer must not change the dict it was loaded from
                self.state[param] = {k: v.to(device=param.device, copy=True) if torch.is_tensor(v) else v
                                     for k, v in saved.items()}
        for group, before in zip(self.param_groups, built, strict=True):
            for key, value in before.items():
                group.setdefault(key, value)


class Lamb(LambBase):
    """LAMB (You et al., 2019): Adam's update rescaled per tensor by ||w|| / ||update||.

    The trust ratio lets large batches use a large learning rate: each tensor moves by
    about `lr` times its own norm. Weight decay is part of the update (so it is scaled by
    the trust ratio too), the ratio is 1 where either norm is 0 (fresh zero-initialised
    tensors), and moments are kept in fp32 whatever the parameter dtype. Groups with
    `layer_adaptation: False` (param_groups() sets it on biases and norms) take Adam steps.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        layer_adaptation: bool = True,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "layer_adaptation": layer_adaptation})

    def _direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Adam's bias-corrected direction from fp32 moments, created at the first step."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return adam_direction_(p.grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"],
                               group["betas"], group["eps"])


def build_optimizer(
    name: OptimizerName,
    param_groups: list[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer called `name`; groups keep their own `weight_decay`, the argument is the default."""
    betas = tuple(betas)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "lamb":
        return Lamb(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "lamb8bit":
        from convmodel.lamb8bit import Lamb8bit

        return Lamb8bit(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"model.init_args.optimizer: unknown optimizer {name!r}; choose adamw, lamb or lamb8bit")


def lr_factor(step: int, schedule: ScheduleName, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup rises linearly, reaching 1 at step `warmup_steps - 1`, so the first step
    already learns; `linear` then falls linearly to 0 at `total_steps`, `constant` stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: ScheduleName,
    warmup_steps: int,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to step once per optimizer step; `total_steps` is needed for `linear` only."""
    if schedule not in ("linear", "constant"):
        raise UserError(f"model.init_args.schedule: unknown schedule {schedule!r}; choose linear or constant")
    if warmup_steps < 0:
        raise UserError(f"model.init_args.warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "linear" and (total_steps is None or total_steps <= 0 or math.isinf(total_steps)):
        raise UserError("the linear schedule needs the number of training steps: set trainer.max_steps "
                        "or model.init_args.total_steps (or use model.init_args.schedule: constant)")
    # a partial (not a lambda or an object) so LambdaLR saves nothing of it in checkpoints:
    # a resumed run follows the schedule of its current config
    fn = partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
