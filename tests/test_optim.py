"""Optimizers and schedules: decay groups, one LAMB step by hand, 8-bit LAMB against fp32 LAMB,
state round trips (checkpoints, hivemind), zero-initialised tensors that must train, the schedule."""

import copy
import io
import math
import sys

import pytest
import torch

from convmodel.errors import UserError
from convmodel.lamb8bit import Lamb8bit
from convmodel.optim import Lamb, build_optimizer, build_scheduler, lr_factor, param_groups


def tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_param_groups_decay_matrices_only():
    net = tiny_net()
    net[1].bias.requires_grad_(False)
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["layer_adaptation"] is True and no_decay["layer_adaptation"] is False
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


@pytest.mark.parametrize("name, cls_name", [("adamw", "AdamW"), ("lamb", "Lamb"), ("lamb8bit", "Lamb8bit")])
def test_build_optimizer_keeps_group_decay_and_steps_on_cpu(name, cls_name):
    net = tiny_net()
    opt = build_optimizer(name, param_groups(net, 0.1), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert type(opt).__name__ == cls_name
    assert [group["weight_decay"] for group in opt.param_groups] == [0.1, 0.0]
    # AdamW keeps the LAMB-only key and ignores it
    assert [group["layer_adaptation"] for group in opt.param_groups] == [True, False]
    before = net[1].weight.detach().clone()
    net(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    assert not torch.equal(before, net[1].weight.detach())


def zero_bias_regression(name: str, steps: int = 200) -> float:
    """Norm of a zero-initialised bias after `steps` steps fitting y = x W + b (a bias the data needs)."""
    torch.manual_seed(0)
    x = torch.randn(128, 64)
    y = x @ (0.1 * torch.randn(64, 64)) + torch.randn(64)
    net = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(net.bias)
    opt = build_optimizer(name, param_groups(net, 0.0), lr=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.bias.norm().item()


@pytest.fixture(scope="module")
def adamw_bias_norm() -> float:
    return zero_bias_regression("adamw")


@pytest.mark.parametrize("name", ["lamb", "lamb8bit"])
def test_zero_initialised_bias_trains_as_fast_as_with_adamw(name, adamw_bias_norm):
    # AdamW: 1.27. bitsandbytes' LAMB8bit clips each update to ||w||: the bias stayed at 0.0; LAMB
    # with the trust ratio on biases: 0.0097. Vectors now take Adam steps: 1.41 with either LAMB
    norm = zero_bias_regression(name)
    assert adamw_bias_norm / 2 < norm < adamw_bias_norm * 2, (norm, adamw_bias_norm)


def paired_params(seed: int = 0, dtype=torch.float32) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """A 64x128 matrix (8-bit state), a 100-vector (fp32 state), and 12 steps of fixed gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((0.05 * torch.randn(64, 128, generator=gen)).to(dtype)),
              torch.nn.Parameter(torch.randn(100, generator=gen).to(dtype))]
    grads = [[(torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen))).to(dtype)
              for p in params] for _ in range(12)]
    return params, grads


def run_steps(opt: torch.optim.Optimizer, params, grads) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def dequantised_moments(opt: Lamb8bit, p) -> tuple[torch.Tensor, torch.Tensor]:
    state = opt.state[p]
    if "exp_avg" in state:
        return state["exp_avg"], state["exp_avg_sq"]
    return (opt._dequantize(state["exp_avg_q"], state["exp_avg_absmax"], signed=True),
            opt._dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], signed=False))


def test_lamb8bit_takes_lambs_step_within_quantisation_error():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    params8, grads = paired_params()
    params32 = [torch.nn.Parameter(p.detach().clone()) for p in params8]
    start = [p.detach().clone() for p in params8]
    opt8, opt32 = Lamb8bit(params8, **kwargs), Lamb(params32, **kwargs)
    run_steps(opt8, params8, grads)
    run_steps(opt32, params32, grads)
    matrix8, matrix32 = params8[0].detach(), params32[0].detach()
    assert opt8.state[params8[0]]["exp_avg_q"].dtype == torch.uint8
    # the matrix moved as fp32 LAMB moved it, up to the 8-bit moments' error
    moved = (matrix32 - start[0]).norm()
    assert (matrix8 - matrix32).norm() < 0.03 * moved, ((matrix8 - matrix32).norm(), moved)
    # one round trip through the signed map costs 1.2% of the norm of a Gaussian; after 12 steps the
    # moments are 2.3% (m) and 1.3% (v) off, as bitsandbytes' own Adam8bit is on these gradients
    for mine, exact in zip(dequantised_moments(opt8, params8[0]), (opt32.state[params32[0]]["exp_avg"],
                                                                   opt32.state[params32[0]]["exp_avg_sq"])):
        assert (mine - exact).norm() < 0.04 * exact.norm()
    # the small vector keeps fp32 moments: the same numbers as Lamb
    torch.testing.assert_close(params8[1].detach(), params32[1].detach(), rtol=1e-6, atol=1e-7)


def state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def test_lamb8bit_state_is_about_two_bytes_per_parameter():
    params, grads = paired_params()
    opt = Lamb8bit(params)
    run_steps(opt, params, grads[:1])
    matrix, vector = params
    # codes: 1 byte per moment; one fp32 absmax per 256 values and moment
    assert state_bytes(opt.state[matrix]) / matrix.numel() == 2 + 2 * 4 / 256
    assert state_bytes(opt.state[vector]) / vector.numel() == 8  # under min_8bit_size: fp32 as Lamb
    assert state_bytes(Lamb8bit([matrix], min_8bit_size=10**6).state[matrix]) == 0  # lazily, on the first step


@pytest.mark.parametrize("cls", [Lamb, Lamb8bit])
def test_state_dict_round_trip_keeps_dtypes_with_bf16_params(cls):
    # torch's load_state_dict casts floating state to the parameter dtype: bf16 moments or scales,
    # and uint8 codes turned into floats; ours keeps what was saved
    params, grads = paired_params(dtype=torch.bfloat16)
    opt = cls(params, lr=1e-2, weight_decay=0.01)
    run_steps(opt, params, grads[:6])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = cls(clones, lr=1e-2, weight_decay=0.01)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(params, clones, strict=True):
        assert opt.state[p].keys() == loaded.state[q].keys()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert loaded.state[q][key].dtype == value.dtype and torch.equal(loaded.state[q][key], value), key
            else:
                assert loaded.state[q][key] == value
    assert {v.dtype for s in loaded.state.values() for v in s.values() if torch.is_tensor(v)} <= {
        torch.float32, torch.uint8}
    # and the next steps are the same steps
    run_steps(opt, params, grads[6:])
    run_steps(loaded, clones, grads[6:])
    for p, q in zip(params, clones, strict=True):
        assert torch.equal(p, q)


def test_lamb8bit_steps_after_a_deepcopy():
    # torch copies an optimizer through __getstate__ (defaults, state, groups): nothing else may be needed
    params, grads = paired_params()
    opt = Lamb8bit(params, lr=1e-2)
    run_steps(opt, params, grads[:2])
    copied = copy.deepcopy(opt)
    run_steps(copied, [p for g in copied.param_groups for p in g["params"]], grads[2:4])
    assert copied.state[copied.param_groups[0]["params"][0]]["step"] == 4


@pytest.mark.parametrize("cls", [Lamb, Lamb8bit])
def test_no_layer_adaptation_is_adam(cls):
    params, grads = paired_params()
    vector = params[1]
    plain = torch.nn.Parameter(vector.detach().clone())
    adapted = torch.nn.Parameter(vector.detach().clone())
    vector_grads = [[g[1]] for g in grads]
    opt = cls([{"params": [vector], "layer_adaptation": False}, {"params": [adapted]}], lr=1e-2)
    run_steps(opt, [vector, adapted], [[g[0], g[0]] for g in vector_grads])
    run_steps(torch.optim.AdamW([plain], lr=1e-2, eps=1e-6, weight_decay=0.0), [plain], vector_grads)
    torch.testing.assert_close(vector.detach(), plain.detach(), rtol=1e-5, atol=1e-6)
    # the other group keeps the trust ratio, which moves it by lr * ||w|| per step instead
    assert not torch.allclose(adapted.detach(), plain.detach(), rtol=1e-3, atol=1e-4)


def test_checkpoint_without_the_flag_takes_it_from_the_current_groups():
    net = tiny_net()
    old = Lamb(param_groups(net, 0.1))
    net(torch.tensor([1, 2])).sum().backward()
    old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["layer_adaptation"]  # written before the flag existed
    resumed = Lamb(param_groups(net, 0.1))
    resumed.load_state_dict(saved)
    assert [group["layer_adaptation"] for group in resumed.param_groups] == [True, False]
    resumed.step()


@pytest.mark.parametrize("name", ["lamb", "lamb8bit"])
def test_the_swarm_optimizer_rebuilt_by_the_strategy_keeps_the_flag(name):
    from convmodel.collaborative.strategy import rebuild_optimizer

    module_opt = build_optimizer(name, param_groups(tiny_net(), 0.1), lr=1e-2, weight_decay=0.1)
    factory, groups = rebuild_optimizer(module_opt, clip_val=None, clip_algorithm="norm")
    rebuilt = factory(groups)
    assert type(rebuilt) is type(module_opt)
    assert [group["layer_adaptation"] for group in rebuilt.param_groups] == [True, False]


def test_lamb8bit_state_round_trips_through_hivemind():
    # hivemind's TrainingStateAverager initialises state with a zero-gradient step, sends
    # dump_optimizer_state's tensors to a joining peer, which loads them with load_optimizer_state
    from hivemind.optim.state_averager import (
        dump_optimizer_state,
        initialize_optimizer_state_,
        load_optimizer_state,
    )

    params, grads = paired_params(dtype=torch.bfloat16)
    opt = Lamb8bit(params, lr=1e-2)
    run_steps(opt, params, grads[:4])
    metadata, tensors = dump_optimizer_state(opt)
    assert torch.uint8 in {t.dtype for t in tensors}
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    joined = Lamb8bit(clones, lr=1e-2)
    initialize_optimizer_state_(joined)
    load_optimizer_state(joined, metadata, [t.clone() for t in tensors])
    for p, q in zip(params, clones, strict=True):
        for key, value in opt.state[p].items():
            got = joined.state[q][key]
            assert torch.equal(got, value) and got.dtype == value.dtype if torch.is_tensor(value) else got == value


def test_lamb8bit_resumes_from_bitsandbytes_lamb8bit_state():
    # convmodel's lamb8bit used to be bitsandbytes' LAMB8bit: its checkpoints load, moments dequantised
    import bitsandbytes as bnb

    params, grads = paired_params()
    old = bnb.optim.LAMB8bit(params, lr=1e-2, betas=(0.9, 0.99))
    run_steps(old, params, grads[:5])
    exact = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = Lamb(exact, lr=1e-2, betas=(0.9, 0.99))
    run_steps(reference, exact, grads[:5])  # the moments depend on the gradients only
    opt = Lamb8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, betas=(0.9, 0.99))
    opt.load_state_dict(old.state_dict())
    for mine, ref in zip(opt.param_groups[0]["params"], exact, strict=True):
        assert opt.state[mine]["step"] == 5
        for value, expected in zip(dequantised_moments(opt, mine), (reference.state[ref]["exp_avg"],
                                                                   reference.state[ref]["exp_avg_sq"])):
            assert (value - expected).norm() < 0.04 * expected.norm()
    assert "exp_avg_q" in opt.state[opt.param_groups[0]["params"][0]]
    run_steps(opt, opt.param_groups[0]["params"], grads[5:6])


def test_lamb8bit_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UserError, match="lamb8bit needs bitsandbytes"):
        build_optimizer("lamb8bit", param_groups(tiny_net(), 0.0), lr=1e-3)


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
