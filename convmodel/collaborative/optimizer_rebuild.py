"""The module's own optimizer and schedule, rebuilt as the factories hivemind.Optimizer asks for.

The module already chose the optimizer class, its hyperparameters, parameter groups and the
learning-rate schedule (`configure_optimizers`); a swarm peer keeps all of them. hivemind needs
callables (it builds the optimizer on its own, possibly offloaded, copies of the parameters) and
steps the schedule once per collaborative epoch.
"""

import inspect
import sys
import types

import torch

from convmodel.errors import UserError


def rebuild_optimizer(module_optimizer: torch.optim.Optimizer, clip_val: float | None, clip_algorithm: str):
    """A factory that builds the module's optimizer again on the tensors hivemind gives it, and its groups.

    Keeps the peak lr (before the schedule scaled it). Each step of the rebuilt optimizer first
    checks the swarm's averaged gradient (guard_steps), then clips it, once per collaborative epoch.
    """
    cls = type(module_optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in module_optimizer.defaults.items() if k in accepted and k != "params"}
    groups = []
    for group in module_optimizer.param_groups:
        group = dict(group)
        group["lr"] = group.pop("initial_lr", group["lr"])  # LambdaLR's base lr, not the warmed-up one
        groups.append(group)

    def factory(param_groups):
        optimizer = cls(param_groups, **kwargs)
        guard_steps(optimizer, float(clip_val) if clip_val else None, clip_algorithm)
        return optimizer

    return factory, groups


def guard_steps(optimizer: torch.optim.Optimizer, clip_val: float | None, clip_algorithm: str) -> None:
    """Make `optimizer.step` skip a non-finite gradient, and clip the others.

    The gradient here is the swarm's average, which a NaN or inf from any peer poisons; the
    check must come before clipping (one NaN makes a clipped gradient all NaN) and before the
    step (with delayed state averaging the new parameters are sent before anyone looks at them).
    Every peer averages the same gradient, so every peer skips the same epoch.
    """
    step = optimizer.step

    def guarded_step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not all(bool(torch.isfinite(p.grad).all()) for p in params):
            print("[convmodel] non-finite averaged gradient: skipped this collaborative step's optimizer "
                  "step (every peer skips it)", file=sys.stderr, flush=True)
            return None
        if clip_val and clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        elif clip_val:
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        return step(closure)

    optimizer.step = types.MethodType(guarded_step, optimizer)  # bound: LR schedulers wrap step.__func__


def rebuild_scheduler(scheduler):
    """A factory for the module's schedule on hivemind's optimizer; it steps once per collaborative epoch."""
    if scheduler is None:
        return None
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if type(scheduler) is torch.optim.lr_scheduler.LambdaLR and lambdas:
        return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, list(lambdas))
    raise UserError(f"HivemindStrategy can rebuild a LambdaLR schedule only, the module returned "
                    f"{type(scheduler).__name__}; return a LambdaLR from configure_optimizers")


def sync_scheduler(opt) -> None:
    """Step hivemind's schedule until it matches the collaborative epoch (after a checkpoint load)."""
    scheduler = opt.state_averager.scheduler
    if scheduler is None:
        return
    while scheduler.last_epoch < opt.local_epoch:
        scheduler.step()


def module_optimizer(module):
    """The module's optimizer and LambdaLR from configure_optimizers (one of each, as a swarm peer needs)."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        optimizer = configured["optimizer"]
        scheduler = configured.get("lr_scheduler")
        if isinstance(scheduler, dict):
            scheduler = scheduler.get("scheduler")
        return optimizer, scheduler
    return configured, None
