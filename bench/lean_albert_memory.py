"""Activation memory and step time of LeanALBERT against transformers' ALBERT and BERT of one shape.

Shape (the reference's): hidden 256, 4 layers, 4 heads, intermediate 1024, vocab 8000, embedding
128 (ALBERT and LeanALBERT), batch 16 x 128 tokens, masked-LM loss over every position, training
mode, dropout off. LeanALBERT is gated (GEGLU, so its first FFN matrix is 2I
wide) with one shared set of large matrices; ALBERT shares whole layers; BERT shares nothing. An
ungated LeanALBERT (ALBERT's FLOPs) isolates what the backward recomputation costs.

Memory: bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
counting each storage once and leaving parameters out. "Per layer" is what is first saved while a
block runs (the block's input included), the mean over blocks; "in all" is the whole forward,
embeddings, MLM head and loss included. Expected for ours: (6H + 2I) floats per token per block.

Time: one training step (forward, backward, AdamW step) on `--threads` threads; rounds alternate
between the models so machine noise hits them alike; reported: medians, the ratio of medians to
HF ALBERT (eager, as in the reference) and the median of the per-round ratios.

    python bench/lean_albert_memory.py [--rounds 9] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from convmodel.models.lean_albert import LeanAlbertConfig, LeanAlbertForMaskedLM

H, LAYERS, HEADS, INTER, VOCAB, E = 256, 4, 4, 1024, 8000, 128
BATCH, SEQ = 16, 128
MiB = 2**20


def build_models() -> dict[str, tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """name -> (masked-LM model, the block modules whose calls count as layers).

    transformers' models run with dropout off (LeanALBERT's and ALBERT's default) and with both
    attention implementations: "eager" keeps the attention probabilities (the reference numbers
    were taken so), "sdpa" (transformers 5's default) does not.
    """
    from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM

    shape = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=INTER, max_position_embeddings=SEQ)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    models = {}
    variants = {
        "LeanALBERT (ours)": {},
        "LeanALBERT (ours) + checkpointing": {"gradient_checkpointing": True},
        "LeanALBERT (ours) ungated": {"hidden_act_gated": False},  # ALBERT's FLOPs
    }
    for name, overrides in variants.items():
        torch.manual_seed(0)
        ours = LeanAlbertForMaskedLM(LeanAlbertConfig(
            **shape, embedding_size=E, **{"hidden_act_gated": True, "share_large_matrices": 1, **overrides}))
        models[name] = (ours, list(ours.albert.encoder.layers))
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        albert = AlbertForMaskedLM(AlbertConfig(**shape, **no_dropout, embedding_size=E,
                                                attn_implementation=attention))
        models[f"HF ALBERT {attention}"] = (albert, [albert.albert.encoder.albert_layer_groups[0].albert_layers[0]])
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        bert = BertForMaskedLM(BertConfig(**shape, **no_dropout, attn_implementation=attention))
        models[f"HF BERT {attention}"] = (bert, list(bert.bert.encoder.layer))
    return models


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(6, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def saved_bytes(model: torch.nn.Module, blocks: list[torch.nn.Module], batch) -> tuple[list[int], int]:
    """(bytes first saved during each block call, bytes saved in all) for one training forward."""
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    per_call: list[int] = []
    state = {"call": None}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in parameters and storage.nbytes() > 0:
            seen.add(key)
            total[0] += storage.nbytes()
            if state["call"] is not None:
                per_call[state["call"]] += storage.nbytes()
        return tensor

    def enter(module, args):
        per_call.append(0)
        state["call"] = len(per_call) - 1

    def leave(module, args, output):
        state["call"] = None

    total = [0]
    handles = [h for b in set(blocks) for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()
    del loss
    return per_call, total[0]


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per model, interleaved")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch()

    models = build_models()
    print(f"shape: hidden {H}, {LAYERS} layers, {HEADS} heads, intermediate {INTER}, vocab {VOCAB}, "
          f"batch {BATCH}x{SEQ}; reference LeanALBERT: 30.0 MiB per layer ((7H + 2I) x B x S floats), "
          "191.7 MiB in all\n")
    print(f"{'model':34} {'params':>11} {'saved/layer MiB':>16} {'saved in all MiB':>17}")
    for name, (model, blocks) in models.items():
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        per_call, total = saved_bytes(model, blocks, batch)
        # with checkpointing a block keeps only its input, saved by the checkpoint outside the block
        per_layer = "-" if "checkpointing" in name else f"{statistics.mean(per_call) / MiB:.1f}"
        print(f"{name:34} {params:>11,} {per_layer:>16} {total / MiB:>17.1f}")
    print(f"ours, expected per layer (6H + 2I) x B x S x 4 bytes: {(6 * H + 2 * INTER) * BATCH * SEQ * 4 / MiB:.1f} MiB")

    timed = {name: model for name, (model, _) in models.items()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in timed.items()}
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.warmup + args.rounds):
        for name, model in timed.items():
            seconds = step_seconds(model, optimizers[name], batch)
            if round_ >= args.warmup:
                times[name].append(seconds)
    albert = times["HF ALBERT eager"]
    print(f"\nstep time, {args.threads} threads, {args.rounds} interleaved rounds (AdamW); ratios to HF ALBERT "
          "eager: of the medians, and the median of the per-round ratios")
    for name, values in times.items():
        median = statistics.median(values)
        per_round = statistics.median(v / a for v, a in zip(values, albert))
        print(f"{name:34} {median * 1000:>8.0f} ms   x{median / statistics.median(albert):.2f}   "
              f"per round x{per_round:.2f}")


if __name__ == "__main__":
    main()
