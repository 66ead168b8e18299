"""Optimizer-state bytes per parameter and step time: fp32 LAMB, our 8-bit LAMB, bitsandbytes' LAMB8bit.

Tensors of LeanALBERT's shape scaled down so that a CPU fits them: hidden 1024 with the xlarge
ratios (one shared set of large matrices: QKV 3072x1024, attention out 1024x1024, GEGLU FFN in
8192x1024 and out 1024x4096), embeddings 8000x128 and their 128 -> 1024 projection, and the
vectors (biases, LayerNorm weights and biases): 18.0M parameters, fp32, on the CPU. Groups as
`param_groups()` makes them (weight decay 0.01 and the trust ratio on matrices only; bitsandbytes
ignores the `layer_adaptation` key). Gradients are fixed random tensors, so the step is the
optimizer alone.

State: bytes of the tensors in `optimizer.state` after the first step (bitsandbytes' 256-entry
quantisation maps included), per parameter. Time: seconds per `optimizer.step()`, the median of
`--steps` steps per round; rounds alternate between the optimizers so that machine noise hits
them alike; reported: the median over rounds and the ratio of medians to fp32 LAMB.

    python bench/lamb8bit.py [--rounds 5] [--steps 3] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from convmodel.lamb8bit import import_bitsandbytes_functional
from convmodel.optim import build_optimizer, param_groups

H, VOCAB, E = 1024, 8000, 128
SHAPES = {
    "word_embeddings": (VOCAB, E), "embedding_projection": (H, E), "embedding_projection.bias": (H,),
    "embedding_norm.weight": (E,), "embedding_norm.bias": (E,),
    "qkv": (3 * H, H), "qkv.bias": (3 * H,), "attention_out": (H, H), "attention_out.bias": (H,),
    "ffn_in": (8 * H, H), "ffn_in.bias": (8 * H,), "ffn_out": (H, 4 * H), "ffn_out.bias": (H,),
    "attention_norm.weight": (H,), "attention_norm.bias": (H,), "ffn_norm.weight": (H,), "ffn_norm.bias": (H,),
}


def build_params() -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Module()
    for name, shape in SHAPES.items():
        value = torch.ones(shape) if name.endswith("norm.weight") else (
            torch.zeros(shape) if len(shape) == 1 else 0.02 * torch.randn(shape))
        module.register_parameter(name.replace(".", "_"), torch.nn.Parameter(value))
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return module


def make_optimizer(name: str, module: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(module, 0.01)
    if name == "bitsandbytes LAMB8bit":
        import_bitsandbytes_functional()  # quiets its import-time warning
        import bitsandbytes as bnb

        return bnb.optim.LAMB8bit(groups, lr=1e-3, eps=1e-6, weight_decay=0.01)
    return build_optimizer(name, groups, lr=1e-3, eps=1e-6, weight_decay=0.01)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from optimizer.state (bitsandbytes nests some in dicts)."""
    def size(value) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    return sum(size(s) for s in optimizer.state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = ["lamb", "lamb8bit", "bitsandbytes LAMB8bit"]
    modules = {name: build_params() for name in names}
    optimizers = {name: make_optimizer(name, modules[name]) for name in names}
    n_params = sum(p.numel() for p in modules["lamb"].parameters())
    for opt in optimizers.values():
        opt.step()  # creates the state
    per_param = {name: state_bytes(opt) / n_params for name, opt in optimizers.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            seconds = []
            for _ in range(args.steps):
                start = time.perf_counter()
                optimizers[name].step()
                seconds.append(time.perf_counter() - start)
            times[name].append(statistics.median(seconds))
    base = statistics.median(times["lamb"])
    print(f"LeanALBERT-shaped tensors (hidden {H}): {n_params / 1e6:.1f}M parameters, fp32, CPU, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    print("| optimizer | state bytes / parameter | state MiB | step s (median) | step / fp32 LAMB |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {per_param[name]:.3f} | {per_param[name] * n_params / 2**20:.0f} | {median:.3f} | "
              f"{median / base:.2f} |")


if __name__ == "__main__":
    main()
