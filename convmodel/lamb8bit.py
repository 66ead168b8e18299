"""LAMB with both Adam moments stored in 8 bits: the step of `convmodel.optim.Lamb`, a quarter of its state.

Why not bitsandbytes' `LAMB8bit`: it is Adam whose update is clipped to `max_unorm * ||w||`. The
clip only scales down and is 0 for a zero tensor, so zero-initialised biases and adapter factors
never move, and norms get no Adam steps. Here the moments are stored as bitsandbytes'
blockwise dynamic 8-bit codes (signed map for the first moment, unsigned for the second, one
fp32 absmax per block of 256 values), and each step dequantises, takes exactly `Lamb`'s fp32 step
(bias correction, decay inside the update, trust ratio 1 where a norm is 0, none for groups with
`layer_adaptation: False`) and quantises again. Tensors under `min_8bit_size` elements keep
fp32 moments, as in bitsandbytes: they are few bytes and quantisation error hurts them most.

State per 8-bit tensor: `step`, `exp_avg_q` / `exp_avg_sq_q` (uint8, the parameter's shape) and
`exp_avg_absmax` / `exp_avg_sq_absmax` (fp32, one per block): 2 + 8/256 bytes per parameter
against 8 for fp32 moments. Small tensors hold `step`, `exp_avg`, `exp_avg_sq` as `Lamb` does.
Works wherever bitsandbytes' blockwise kernels do (CPU and CUDA); the state lives on the
parameter's device.
"""

import functools
import logging
from collections.abc import Iterable

import torch

from convmodel.errors import UserError
from convmodel.optim import LambBase, adam_direction_

BLOCK_SIZE = 256  # values per absmax; bitsandbytes' 8-bit optimizers use the same
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 moments
CHUNK = BLOCK_SIZE * 16384  # elements dequantised at a time (4M: 16 MB of fp32 per moment)
_MAPS: dict[tuple[torch.device, bool], torch.Tensor] = {}


def import_bitsandbytes_functional():
    """bitsandbytes.functional, or a UserError that says how to get it (imported only when used)."""
    # bitsandbytes warns at import about an optional 4-bit CPU kernel that LAMB does not use
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:
        raise UserError("model.init_args.optimizer: lamb8bit needs bitsandbytes "
                        f"(pip install bitsandbytes) ({exc}); or use optimizer: lamb") from exc
    finally:
        bnb_logger.setLevel(level)
    return functional


@functools.cache
def _bnb():
    """bitsandbytes.functional for the step (looked up once; `Lamb8bit()` checks it is there)."""
    return import_bitsandbytes_functional()


class Lamb8bit(LambBase):
    """LAMB whose moments are blockwise 8-bit codes; same hyperparameters and step as `Lamb`.

    Args:
        params: parameters or groups; a group may set `layer_adaptation: False` (Adam steps).
        lr, betas, eps, weight_decay, layer_adaptation: as in `convmodel.optim.Lamb`.
        min_8bit_size: tensors with fewer elements keep fp32 moments.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        layer_adaptation: bool = True,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        import_bitsandbytes_functional()  # fail here, with the way out, not at the first step
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "layer_adaptation": layer_adaptation, "min_8bit_size": min_8bit_size})

    # ---- quantisation ---------------------------------------------------------------------------

    # module-level helpers, not attributes: torch pickles and deep-copies an optimizer through
    # __getstate__, which keeps only defaults, state and param_groups

    @staticmethod
    def _map(device: torch.device, signed: bool) -> torch.Tensor:
        """bitsandbytes' dynamic 8-bit map (256 values in [-1, 1] or [0, 1]), one copy per device."""
        key = (device, signed)
        if key not in _MAPS:
            _MAPS[key] = _bnb().create_dynamic_map(signed=signed).to(device)
        return _MAPS[key]

    def _quantize(self, values: torch.Tensor, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """Write the 8-bit codes of fp32 `values` into `codes` and their block scales into `absmax`."""
        _bnb().quantize_blockwise(values, code=self._map(values.device, signed), absmax=absmax, out=codes,
                                  blocksize=BLOCK_SIZE)

    def _dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
        return _bnb().dequantize_blockwise(codes, absmax=absmax, code=self._map(codes.device, signed),
                                           blocksize=BLOCK_SIZE)

    def _init_8bit_state(self, state: dict, param: torch.Tensor, exp_avg=None, exp_avg_sq=None) -> None:
        """8-bit moments for `param`: zeros, or the given fp32 moments quantised."""
        blocks = -(-param.numel() // BLOCK_SIZE)
        for name, signed, value in (("exp_avg", True, exp_avg), ("exp_avg_sq", False, exp_avg_sq)):
            codes = torch.empty(param.shape, dtype=torch.uint8, device=param.device)
            absmax = torch.empty(blocks, dtype=torch.float32, device=param.device)
            if value is None:
                value = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            self._quantize(value.float().contiguous().view(-1), signed, codes.view(-1), absmax)
            state[f"{name}_q"], state[f"{name}_absmax"] = codes, absmax

    # ---- the step ----------------------------------------------------------------------------

    def _direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Adam's direction: from 8-bit moments for large tensors, fp32 ones for small (made at the first step)."""
        if "exp_avg_q" not in state and "exp_avg" not in state:
            if p.numel() >= group["min_8bit_size"]:
                self._init_8bit_state(state, p)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if "exp_avg_q" in state:
            return self._8bit_direction(p.grad, state, group)
        return adam_direction_(p.grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"],
                               group["betas"], group["eps"])

    def _8bit_direction(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Adam's direction from the 8-bit moments, which are updated and quantised again.

        Chunks of whole blocks are dequantised one at a time, so the fp32 memory a step needs
        beyond the direction itself is a few chunks, not two tensors the size of the parameter.
        """
        flat_grad = grad.reshape(-1)
        update = torch.empty(flat_grad.shape, dtype=torch.float32, device=grad.device)
        m_codes, v_codes = state["exp_avg_q"].view(-1), state["exp_avg_sq_q"].view(-1)
        m_absmax, v_absmax = state["exp_avg_absmax"], state["exp_avg_sq_absmax"]
        for start in range(0, flat_grad.numel(), CHUNK):
            end = min(start + CHUNK, flat_grad.numel())
            blocks = slice(start // BLOCK_SIZE, -(-end // BLOCK_SIZE))
            m = self._dequantize(m_codes[start:end], m_absmax[blocks], signed=True)
            v = self._dequantize(v_codes[start:end], v_absmax[blocks], signed=False)
            adam_direction_(flat_grad[start:end].float(), m, v, state["step"], group["betas"], group["eps"],
                            out=update[start:end])
            self._quantize(m, True, m_codes[start:end], m_absmax[blocks])
            self._quantize(v, False, v_codes[start:end], v_absmax[blocks])
        return update.view(grad.shape)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _convert_saved_state(self, state_dict: dict) -> dict:
        """Read checkpoints of bitsandbytes' LAMB8bit (convmodel's lamb8bit before this class).

        Its moments are `state1`/`state2` (8-bit codes with `qmap*`/`absmax*`, blocks of 256, or
        fp32 for small tensors); they are dequantised here and stored in this class's layout.
        """
        wrapper = "__bnb_optimizer_quant_state__"  # bitsandbytes >= 0.48 nests the moments under this key
        flat = {saved_id: {**{k: v for k, v in saved.items() if k != wrapper}, **saved.get(wrapper, {})}
                for saved_id, saved in state_dict["state"].items()}
        if not any("state1" in saved for saved in flat.values()):
            return state_dict
        params = {saved_id: (p, group) for group, saved in zip(self.param_groups, state_dict["param_groups"],
                                                                strict=True)
                  for saved_id, p in zip(saved["params"], group["params"], strict=True)}
        state = {}
        for saved_id, saved in flat.items():
            if "state1" not in saved:
                state[saved_id] = saved
                continue
            param, group = params[saved_id]
            moments = []
            for i in ("1", "2"):
                value = saved[f"state{i}"]
                if value.dtype == torch.uint8:
                    value = _bnb().dequantize_blockwise(
                        value.to(param.device), absmax=saved[f"absmax{i}"].float().to(param.device),
                        code=saved[f"qmap{i}"].float().to(param.device), blocksize=BLOCK_SIZE)
                moments.append(value.float().to(param.device))
            converted = {"step": int(saved["step"])}
            if param.numel() >= group["min_8bit_size"]:
                self._init_8bit_state(converted, param, *moments)
            else:
                converted["exp_avg"], converted["exp_avg_sq"] = moments
            state[saved_id] = converted
        return {**state_dict, "state": state}
