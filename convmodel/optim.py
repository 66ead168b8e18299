"""Optimizer and learning-rate schedule factories shared by every model module.

Modules name an optimizer and a schedule with plain strings (`Literal` choices in their
signatures), so a YAML file stays serialisable and `--print_config` shows the choice.
"""

import math
from collections.abc import Iterable
from functools import partial
from typing import Literal

import torch

from convmodel.errors import UserError

OptimizerName = Literal["adamw", "lamb", "lamb8bit"]
ScheduleName = Literal["linear", "constant"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (weights, embeddings) decay, vectors (biases, norms) do not.

    One rule instead of a list of names (nanoGPT): a parameter with two or more
    dimensions is decayed, anything else is not. Frozen parameters are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam's update rescaled per tensor by ||w|| / ||update||.

    The trust ratio lets large batches use a large learning rate: each tensor moves by
    about `lr` times its own norm. Weight decay is part of the update (so it is scaled by
    the trust ratio too), the ratio is 1 where either norm is 0 (fresh zero-initialised
    biases), and moments are kept in fp32 whatever the parameter dtype.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                weight = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(weight, alpha=group["weight_decay"])
                w_norm, u_norm = weight.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.copy_(weight - group["lr"] * trust * update)
        return loss


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
        return _lamb8bit(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"model.init_args.optimizer: unknown optimizer {name!r}; choose adamw, lamb or lamb8bit")


def _lamb8bit(param_groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit LAMB: optimizer state in 8 bits (runs on CPU and CUDA in bitsandbytes >= 0.45)."""
    import logging

    # bitsandbytes warns at import about an optional 4-bit CPU kernel that LAMB does not use
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError("model.init_args.optimizer: lamb8bit needs bitsandbytes "
                        f"(pip install bitsandbytes) ({exc}); or use optimizer: lamb") from exc
    finally:
        bnb_logger.setLevel(level)
    return bnb.optim.LAMB8bit(param_groups, **kwargs)


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
