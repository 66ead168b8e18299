"""Every optimizer trains every trainable parameter of every model family, at a sensible rate.

Tiny BERT (mlm, sop), GPT-2 (clm) and LeanALBERT (mlm with low-rank adapters, whose second
factor starts at zero; sop) each take STEPS optimizer steps on one real batch (real shards, the
real collator) through the module's own `configure_optimizers`, once per optimizer name, all
from the same initial weights and at the same constant learning rate. Dropout is off (eval
mode) so that the runs differ by their optimizer only.

What "a sensible rate" means, tensor by tensor:

* Vectors (biases, norm weights; `param_groups()` gives them no weight decay and, for LAMB, no
  trust ratio): LAMB on them is Adam, so the length of each one's path (the sum of its step
  lengths) must be within a factor RATE of the path AdamW gave it. Not the net distance: where
  AdamW's gradient changes sign (a classifier bias, once AdamW's fast-moving matrices fit the
  batch) its net distance shrinks while its steps stay Adam-sized; the fixed optimizers give
  0.66-2.1x AdamW's path. The old `lamb` (trust ratio on biases) moved a zero-initialised bias
  by lr * sqrt(n) in its first step and then by lr * ||bias|| ~ lr^2 * sqrt(n) per step: 0.15-0.2x;
  bitsandbytes' LAMB8bit (update clipped to ||w||) did not move it at all, and its norm weights
  took <= 0.36x.
* Matrices under LAMB: the trust ratio makes each step move the tensor by lr * ||w|| exactly,
  by design (AdamW moves a 0.02-initialised matrix ~50x further in relative terms, so comparing
  with AdamW would be wrong here): each step must move it by between 1/RATE and RATE times
  lr * ||w||. A zero-initialised matrix (the adapters' second factor) has no norm to scale by:
  its first step is an Adam step and must be within RATE of AdamW's first step; after that it
  is a LAMB matrix like the others (it then grows by a factor ~(1 + lr) per step: slow, but
  that is what LAMB does with zero-initialised matrices).
* Under AdamW itself only "moved at all" is a real check (the rates compare AdamW with itself).
"""

import copy

import pytest
import torch

from convmodel.models import BertPretraining, Gpt2Pretraining
from convmodel.models.lean_albert_pretraining import LeanAlbertPretraining

STEPS = 8
LR = 1e-3
RATE = 3.0  # allowed factor either way

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_GPT2 = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
TINY_LEAN = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
             "embedding_size": 16, "hidden_act_gated": True, "share_large_matrices": 1}

FAMILIES = {
    "bert-mlm": (BertPretraining, TINY_BERT, "mlm"),
    "bert-sop": (BertPretraining, TINY_BERT, "sop"),
    "gpt2-clm": (Gpt2Pretraining, TINY_GPT2, "clm"),
    "lean-albert-mlm-adapters": (LeanAlbertPretraining, {**TINY_LEAN, "adapter_dim": 4}, "mlm"),
    "lean-albert-sop": (LeanAlbertPretraining, TINY_LEAN, "sop"),
}


@pytest.fixture(scope="module")
def batches(text_corpus, tokenizer_dir, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """One batch per objective from shards of the corpus' validation text, as training reads them."""
    from convmodel.data import JsonlDataModule, prepare_train_data

    root = tmp_path_factory.mktemp("shards")
    out = {}
    for objective in ("mlm", "sop", "clm"):
        prepare_train_data(text_corpus["valid"], tokenizer_dir, str(root / objective), objective=objective,
                           max_seq_len=64, num_workers=1, progress=False)
        data = JsonlDataModule(tokenizer_dir, train_files=f"{root / objective}/part-*.jsonl", objective=objective,
                               batch_size=8, max_seq_len=64, shuffle_buffer_size=0)
        data.setup("fit")
        out[objective] = next(iter(data.train_dataloader()))
    return out


@pytest.fixture(scope="module")
def runs(tokenizer_dir, batches):
    """run(family, optimizer) -> {name: [weights before step 0, after step 1, ...]}, cached."""
    modules, cache = {}, {}

    def run(family: str, optimizer: str) -> dict[str, list[torch.Tensor]]:
        if (family, optimizer) in cache:
            return cache[family, optimizer]
        cls, config, objective = FAMILIES[family]
        if family not in modules:
            torch.manual_seed(0)
            modules[family] = cls(tokenizer_dir, config=config, objective=objective)
        module = copy.deepcopy(modules[family]).eval()
        # no Trainer: total_steps given, so configure_optimizers does not ask one for max_steps
        module.optimizer_name, module.lr, module.schedule, module.warmup_steps, module.total_steps = (
            optimizer, LR, "constant", 0, 100)
        configured = module.configure_optimizers()
        opt, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        history = {name: [p.detach().clone()] for name, p in params.items()}
        batch = batches[objective]
        for _ in range(STEPS):
            loss = module.compute_losses(batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            for name, p in params.items():
                history[name].append(p.detach().clone())
        cache[family, optimizer] = history
        return history

    return run


def path_length(weights: list[torch.Tensor]) -> float:
    return sum((after - before).norm().item() for before, after in zip(weights, weights[1:]))


@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "lamb8bit"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_moves_at_its_optimizers_rate(runs, family, optimizer):
    history, adamw = runs(family, optimizer), runs(family, "adamw")
    lamb = optimizer != "adamw"
    if family == "lean-albert-mlm-adapters":
        assert any(w[0].count_nonzero() == 0 for name, w in history.items() if "adapter" in name), \
            "the adapters' second factor should start at zero"
    stuck, wrong_rate = [], []
    for name, weights in history.items():
        start, end = weights[0], weights[-1]
        if torch.equal(start, end):
            stuck.append(name)
            continue
        if lamb and start.dim() >= 2:
            for t in range(STEPS):
                step, norm = (weights[t + 1] - weights[t]).norm().item(), weights[t].norm().item()
                if norm == 0:
                    ratio = step / (adamw[name][1] - adamw[name][0]).norm().item()  # an Adam step
                else:
                    ratio = step / (LR * norm)
                if not 1 / RATE <= ratio <= RATE:
                    wrong_rate.append(f"{name} step {t}: {ratio:.3g}")
                    break
        else:
            ratio = path_length(weights) / path_length(adamw[name])
            if not 1 / RATE <= ratio <= RATE:
                wrong_rate.append(f"{name}: {ratio:.3g} of AdamW's path")
    assert not stuck, f"{optimizer} never moved: {stuck}"
    assert not wrong_rate, f"{optimizer} moved at the wrong rate: {wrong_rate}"
