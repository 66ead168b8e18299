"""The module's own optimizer and schedule, rebuilt as the factories hivemind.Optimizer asks for.

The module already chose the optimizer class, its hyperparameters, parameter groups and the
learning-rate schedule (`configure_optimizers`); a swarm peer keeps all of them. hivemind needs
callables (it builds the optimizer on its own, possibly offloaded, copies of the parameters) and
steps the schedule once per collaborative epoch.
"""

import inspect

import torch

from convmodel.errors import UserError


def rebuild_optimizer(module_optimizer: torch.optim.Optimizer, clip_val: float | None, clip_algorithm: str):
    """A factory that builds the module's optimizer again on the tensors hivemind gives it, and its groups.

    Keeps the peak lr (before the schedule scaled it). Clipping is a step pre-hook on the rebuilt
    optimizer, so it applies to the swarm's averaged gradient once per collaborative epoch.
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
        if clip_val:
            optimizer.register_step_pre_hook(_clip_hook(float(clip_val), clip_algorithm))
        return optimizer

    return factory, groups


def _clip_hook(clip_val: float, algorithm: str):
    def clip(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)

    return clip


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
