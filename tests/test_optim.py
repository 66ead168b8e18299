"""Optimizers and schedules: decay groups, one LAMB step by hand, the schedule's values."""

import math

import pytest
import torch

from convmodel.errors import UserError
from convmodel.optim import Lamb, build_optimizer, build_scheduler, lr_factor, param_groups


def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_param_groups_decay_matrices_only():
    net = tiny_net()
    net[1].bias.requires_grad_(False)
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[1].weight)}
    # the frozen bias is in neither group
    assert {id(p) for p in no_decay["params"]} == {id(net[2].weight), id(net[2].bias)}


def test_lamb_single_step_matches_hand_computation():
    w0 = [[1.0, -2.0], [3.0, 0.5]]
    g = [[0.1, -0.2], [0.3, 0.4]]
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-6, 0.05
    p = torch.nn.Parameter(torch.tensor(w0))
    p.grad = torch.tensor(g)
    Lamb([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd).step()

    # by hand: moments after one step, bias-corrected, Adam direction plus decay, trust ratio
    flat_w, flat_g = sum(w0, []), sum(g, [])
    m_hat = [(1 - b1) * x / (1 - b1) for x in flat_g]
    v_hat = [(1 - b2) * x * x / (1 - b2) for x in flat_g]
    update = [m / (math.sqrt(v) + eps) + wd * w for m, v, w in zip(m_hat, v_hat, flat_w)]
    trust = math.sqrt(sum(w * w for w in flat_w)) / math.sqrt(sum(u * u for u in update))
    expected = [w - lr * trust * u for w, u in zip(flat_w, update)]
    torch.testing.assert_close(p.detach().flatten(), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    Lamb([p], lr=0.01, eps=0.0).step()
    # Adam's first step is sign(g); with ||w|| = 0 the ratio is 1, not 0 (the bias would never move)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.01, 0.01, -0.01]))


def test_lamb_keeps_fp32_state_for_bf16_parameters():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    opt = Lamb([p], lr=0.1)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert p.dtype == torch.bfloat16 and (p.detach().float() < 1).all()


def test_lamb_fits_a_linear_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    net = torch.nn.Linear(8, 1)
    opt = build_optimizer("lamb", param_groups(net, 0.0), lr=0.05)
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(net(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.01 * losses[0]


@pytest.mark.parametrize("name, cls_name", [("adamw", "AdamW"), ("lamb", "Lamb"), ("lamb8bit", "LAMB8bit")])
def test_build_optimizer_keeps_group_decay_and_steps_on_cpu(name, cls_name):
    net = tiny_net()
    opt = build_optimizer(name, param_groups(net, 0.1), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert type(opt).__name__ == cls_name
    assert [group["weight_decay"] for group in opt.param_groups] == [0.1, 0.0]
    before = net[1].weight.detach().clone()
    net(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    assert not torch.equal(before, net[1].weight.detach())


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="model.init_args.optimizer"):
        build_optimizer("sgd", param_groups(tiny_net(), 0.0), lr=1.0)


def lrs(scheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    values = lrs(build_scheduler(opt, "linear", warmup_steps=4, total_steps=10), 12)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0]
    assert values == pytest.approx([2.0 * f for f in expected])


def test_constant_schedule_stays_after_warmup_and_needs_no_total():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert lrs(build_scheduler(opt, "constant", warmup_steps=2), 5) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert lr_factor(0, "constant", 0, None) == 1.0


def test_linear_schedule_without_total_steps_says_which_option_to_set():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match=r"trainer\.max_steps.*model\.init_args\.total_steps"):
        build_scheduler(opt, "linear", warmup_steps=10, total_steps=None)


def test_scheduler_state_does_not_pin_the_schedule():
    # a resumed run follows its current config (e.g. a longer trainer.max_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = build_scheduler(opt, "linear", warmup_steps=0, total_steps=10)
    lrs(old, 5)
    new = build_scheduler(opt, "linear", warmup_steps=0, total_steps=20)
    new.load_state_dict(old.state_dict())
    assert new.lr_lambdas[0](5) == pytest.approx(15 / 20)
