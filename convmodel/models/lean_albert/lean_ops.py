"""The two memory-lean pieces of a LeanALBERT block, as autograd Functions with hand-written backward.

Autograd keeps every intermediate a backward formula asks for. Per token of a block that is, besides
the residual input: the LayerNorm output before QKV, the rotated queries and keys next to the
unrotated projection, the LayerNorm output before the feed-forward, the pre-activation and the
activation. The Functions here keep only what cannot be recomputed cheaply:

- `norm_qkv_rotary`: LayerNorm -> QKV projection -> rotary, saving only its input. Backward
  recomputes the LayerNorm (cheap) and undoes the rotation on the gradient (rotations are
  orthogonal). Its output is the one (B, S, 3H) tensor that attention saves anyway.
- `lean_feed_forward`: LayerNorm -> linear -> activation (optionally gated) -> linear, saving its
  input and the pre-activation. Backward recomputes the LayerNorm output and the activation.

With attention run by `scaled_dot_product_attention` (no probability matrix kept) a block saves
6H + 2I floats per token: input, QKV and attention output (5H), then the feed-forward's input and
pre-activation (H + 2I). Matrix products are never recomputed.

Each linear may carry a low-rank adapter: y = x W^T + b + (x A^T) B^T with A (r, in), B (out, r).
Under autocast the products run in the autocast dtype in forward; backward casts to the dtype of
the incoming gradient, which is the dtype forward produced.

This file ships inside exported model folders: it imports only torch.
"""

import torch
import torch.nn.functional as F

# ---- linear with an optional low-rank adapter ------------------------------------------------


def _linear(x, weight, bias, adapter_first, adapter_second):
    y = F.linear(x, weight, bias)
    if adapter_first is not None:
        y = y + F.linear(F.linear(x, adapter_first), adapter_second)
    return y


def _linear_backward(grad, x, weight, adapter_first, adapter_second, needs: tuple[bool, ...]):
    """Gradients of `_linear` w.r.t. (x, weight, bias, adapter_first, adapter_second); None where not needed."""
    dtype = grad.dtype
    grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
    x_2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
    grad_x = grad_weight = grad_bias = grad_first = grad_second = None
    if needs[1]:
        grad_weight = (grad_2d.t() @ x_2d).to(weight.dtype)  # (out, in)
    if needs[2]:
        grad_bias = grad_2d.sum(0, dtype=weight.dtype)  # accumulate in the parameters' precision
    if needs[0]:
        grad_x = grad_2d @ weight.to(dtype)  # (N, in)
    if adapter_first is not None:
        first, second = adapter_first.to(dtype), adapter_second.to(dtype)
        grad_low = grad_2d @ second  # (N, r)
        if needs[3]:
            grad_first = (grad_low.t() @ x_2d).to(adapter_first.dtype)  # (r, in)
        if needs[4]:
            grad_second = (grad_2d.t() @ (x_2d @ first.t())).to(adapter_second.dtype)  # (out, r)
        if needs[0]:
            grad_x = grad_x + grad_low @ first
    if grad_x is not None:
        grad_x = grad_x.view(*grad.shape[:-1], x.shape[-1])
    return grad_x, grad_weight, grad_bias, grad_first, grad_second


def _layer_norm_with_stats(x, weight, bias, eps):
    """F.layer_norm(x) over the last dimension, plus the mean and 1/std its backward needs."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(grad, x, mean, rstd, weight, bias, needs: tuple[bool, bool, bool]):
    """Gradients of the LayerNorm of x w.r.t. (x, weight, bias); None where not needed."""
    return torch.ops.aten.native_layer_norm_backward(
        grad.to(x.dtype), x, (x.shape[-1],), mean, rstd, weight, bias, list(needs)
    )


# ---- rotary position embeddings ----------------------------------------------------------------


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles (arXiv:2104.09864), each (seq_len, head_dim / 2).

    Angle pos * base^(-2i/d) rotates the pair (i, i + d/2) of a head ("rotate half" layout). Built
    in float32 (float64 for a float64 model) whatever the autocast dtype.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=dtype, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def _rotate_into(out, x, cos, sin, sign: float = 1.0):
    """out = x rotated by +angle (sign 1) or -angle (sign -1); x, out (..., S, heads, d); may alias."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (S, 1, d/2)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    new_first = torch.addcmul(first * cos, second, sin, value=-sign)
    new_second = torch.addcmul(second * cos, first, sin, value=sign)
    out[..., :half].copy_(new_first)
    out[..., half:].copy_(new_second)


# ---- LayerNorm -> QKV -> rotary ------------------------------------------------------------------


class _NormQkvRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, adapter_first, adapter_second, cos, sin,
                num_heads: int, eps: float):
        normed = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        qkv = _linear(normed, weight, bias, adapter_first, adapter_second)  # (B, S, 3H)
        if cos is not None:
            heads = qkv.view(*qkv.shape[:-1], 3, num_heads, -1)  # (B, S, 3, nh, d)
            query_key = heads[..., :2, :, :].transpose(-3, -4)  # (B, 2, S, nh, d), a view into qkv
            _rotate_into(query_key, query_key, cos, sin)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight, adapter_first, adapter_second, cos, sin)
        ctx.num_heads, ctx.eps = num_heads, eps
        return qkv

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight, adapter_first, adapter_second, cos, sin = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if cos is not None:  # the rotation is orthogonal: its backward rotates the gradient back
            heads = grad.reshape(*grad.shape[:-1], 3, ctx.num_heads, -1)  # (B, S, 3, nh, d)
            unrotated = torch.empty_like(heads, memory_format=torch.contiguous_format)
            _rotate_into(unrotated[..., :2, :, :].transpose(-3, -4), heads[..., :2, :, :].transpose(-3, -4),
                         cos, sin, sign=-1.0)
            unrotated[..., 2, :, :].copy_(heads[..., 2, :, :])
            grad = unrotated.flatten(-3)
        normed, mean, rstd = _layer_norm_with_stats(x, norm_weight, norm_bias, ctx.eps)
        grad_normed, grad_weight, grad_bias, grad_first, grad_second = _linear_backward(
            grad, normed, weight, adapter_first, adapter_second,
            (any(needs[:3]), needs[3], needs[4], needs[5], needs[6]))
        grad_x = grad_norm_weight = grad_norm_bias = None
        if any(needs[:3]):
            grad_x, grad_norm_weight, grad_norm_bias = _layer_norm_backward(
                grad_normed, x, mean, rstd, norm_weight, norm_bias, needs[:3])
        return (grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, grad_first, grad_second,
                None, None, None, None)


def norm_qkv_rotary(x, norm_weight, norm_bias, weight, bias, adapter_first=None, adapter_second=None,
                    cos=None, sin=None, num_heads: int = 1, eps: float = 1e-12):
    """rotary(LayerNorm(x) W^T + b) for x (B, S, H) -> (B, S, 3H) laid out as (B, S, [q|k|v], heads, d).

    Queries and keys are rotated when cos and sin (S, d/2) are given; saves only x for backward.
    """
    return _NormQkvRotary.apply(x, norm_weight, norm_bias, weight, bias, adapter_first, adapter_second,
                                cos, sin, num_heads, eps)


# ---- LayerNorm -> linear -> activation -> linear -------------------------------------------------


def _activate(pre, activation, gated: bool):
    if not gated:
        return activation(pre)
    gate, linear = pre.chunk(2, dim=-1)  # GLU: act(x W_gate) * (x W_lin)
    return activation(gate) * linear


class _LeanFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, in_weight, in_bias, in_first, in_second,
                out_weight, out_bias, out_first, out_second, activation, gated: bool, eps: float):
        normed = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        pre = _linear(normed, in_weight, in_bias, in_first, in_second)  # (B, S, I or 2I)
        out = _linear(_activate(pre, activation, gated), out_weight, out_bias, out_first, out_second)
        ctx.save_for_backward(x, pre, norm_weight, norm_bias, in_weight, in_first, in_second,
                              out_weight, out_first, out_second)
        ctx.activation, ctx.gated, ctx.eps = activation, gated, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        (x, pre, norm_weight, norm_bias, in_weight, in_first, in_second,
         out_weight, out_first, out_second) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # recompute the activation; autograd differentiates the activation function alone
        gate, linear = pre.chunk(2, dim=-1) if ctx.gated else (pre, None)
        with torch.enable_grad():
            gate = gate.detach().requires_grad_(True)
            activated = ctx.activation(gate)
        hidden = activated.detach() * linear if ctx.gated else activated.detach()
        grad_hidden, grad_out_weight, grad_out_bias, grad_out_first, grad_out_second = _linear_backward(
            grad, hidden, out_weight, out_first, out_second, (True, *needs[7:11]))
        del hidden
        if ctx.gated:  # d(act(g) * l): dg = act'(g) * grad * l, dl = grad * act(g), written side by side
            grad_pre = torch.empty_like(pre)
            half = linear.shape[-1]
            torch.mul(grad_hidden, activated.detach(), out=grad_pre[..., half:])
            grad_pre[..., :half] = torch.autograd.grad(activated, gate, grad_hidden * linear)[0]
        else:
            (grad_pre,) = torch.autograd.grad(activated, gate, grad_hidden)
        del activated, grad_hidden
        normed, mean, rstd = _layer_norm_with_stats(x, norm_weight, norm_bias, ctx.eps)
        grad_normed, grad_in_weight, grad_in_bias, grad_in_first, grad_in_second = _linear_backward(
            grad_pre, normed, in_weight, in_first, in_second, (any(needs[:3]), *needs[3:7]))
        grad_x = grad_norm_weight = grad_norm_bias = None
        if any(needs[:3]):
            grad_x, grad_norm_weight, grad_norm_bias = _layer_norm_backward(
                grad_normed, x, mean, rstd, norm_weight, norm_bias, needs[:3])
        return (grad_x, grad_norm_weight, grad_norm_bias, grad_in_weight, grad_in_bias, grad_in_first,
                grad_in_second, grad_out_weight, grad_out_bias, grad_out_first, grad_out_second, None, None, None)


def lean_feed_forward(x, norm_weight, norm_bias, in_weight, in_bias, out_weight, out_bias, activation,
                      gated: bool = False, eps: float = 1e-12, in_adapter=(None, None), out_adapter=(None, None)):
    """act(LayerNorm(x) W_in^T + b_in) W_out^T + b_out (no residual), saving only x and the pre-activation.

    With `gated` the first matrix is 2I wide: act(first half) * second half (GEGLU for gelu).
    `in_adapter`/`out_adapter` are optional (A, B) low-rank adapter pairs.
    """
    return _LeanFeedForward.apply(x, norm_weight, norm_bias, in_weight, in_bias, *in_adapter,
                                  out_weight, out_bias, *out_adapter, activation, gated, eps)
