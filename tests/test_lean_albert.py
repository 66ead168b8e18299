"""LeanALBERT as a transformers model: parameter layout, lean autograd, parity, save/load, remote code."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from convmodel.models.lean_albert import (
    LeanAlbertConfig,
    LeanAlbertForMaskedLM,
    LeanAlbertForPreTraining,
    LeanAlbertForSequenceClassification,
    LeanAlbertModel,
)
from convmodel.models.lean_albert.lean_ops import lean_feed_forward, norm_qkv_rotary, rotary_tables

RULEANALBERT = dict(
    vocab_size=50005, embedding_size=128, hidden_size=4096, num_hidden_layers=32, num_attention_heads=64,
    intermediate_size=16384, hidden_act="gelu_new", hidden_act_gated=True, position_embedding_type="rotary",
    type_vocab_size=2, share_large_matrices=1, layer_norm_eps=1e-12,
)


def small_config(**overrides) -> LeanAlbertConfig:
    kwargs = dict(vocab_size=60, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=24, hidden_act_gated=True, share_large_matrices=1, max_position_embeddings=32)
    kwargs.update(overrides)
    return LeanAlbertConfig(**kwargs)


def unique_parameters(module: torch.nn.Module) -> int:
    """Parameters counted by tensor identity: tied and shared tensors once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def batch(vocab: int = 60, size: tuple[int, int] = (3, 10), seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(6, vocab, size, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---- architecture ------------------------------------------------------------------------------


def test_parameter_counts_match_the_reference_implementation():
    with torch.device("meta"):
        pretraining = LeanAlbertForPreTraining(LeanAlbertConfig(**RULEANALBERT))
        masked_lm = LeanAlbertForMaskedLM(LeanAlbertConfig(**RULEANALBERT))
        unshared = LeanAlbertForPreTraining(LeanAlbertConfig(**{**RULEANALBERT, "share_large_matrices": 0}))
        untied = LeanAlbertForPreTraining(LeanAlbertConfig(**RULEANALBERT, tie_word_embeddings=False))
        tiny = LeanAlbertForPreTraining(LeanAlbertConfig(
            vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            hidden_act_gated=True, share_large_matrices=1))
    assert unique_parameters(pretraining) == 294_965_591  # with the SOP pooler and head
    assert unique_parameters(masked_lm) == 278_176_085  # without them
    assert unique_parameters(pretraining.albert.encoder.matrices) == 2**28  # the one shared set
    assert len(pretraining.albert.encoder.matrices) == 1
    assert unique_parameters(unshared) == 8_616_464_727
    assert unique_parameters(untied) == 301_366_231
    assert unique_parameters(tiny) == 2_231_490
    assert pretraining.predictions.decoder.weight is pretraining.albert.embeddings.word_embeddings.weight
    assert untied.predictions.decoder.weight is not untied.albert.embeddings.word_embeddings.weight


def test_matrix_sets_are_shared_by_consecutive_layers_and_interleaved():
    assert [small_config(num_hidden_layers=4, share_large_matrices=2).matrix_set_of_layer(i)
            for i in range(4)] == [0, 0, 1, 1]
    assert [small_config(num_hidden_layers=4, share_large_matrices=1, num_inner_matrices=2).matrix_set_of_layer(i)
            for i in range(4)] == [0, 1, 0, 1]
    assert [small_config(num_hidden_layers=3, share_large_matrices=0).matrix_set_of_layer(i)
            for i in range(3)] == [0, 1, 2]
    model = LeanAlbertModel(small_config(num_hidden_layers=4, share_large_matrices=2, adapter_dim=2))
    assert len(model.encoder.matrices) == 2
    model(**batch()).last_hidden_state.square().mean().backward()
    # both shared sets and every layer's own adapters get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.matrices.parameters())
    assert all(layer.adapters["ffn_in"].first.grad is not None for layer in model.encoder.layers)


def test_fresh_weights_follow_the_init_scheme():
    torch.manual_seed(0)
    config = small_config(hidden_size=64, intermediate_size=128, adapter_dim=4)
    model = LeanAlbertForPreTraining(config)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    matrices = model.albert.encoder.matrices[0]
    assert abs(matrices.ffn_in.std().item() - config.initializer_range) < 0.1 * config.initializer_range
    assert config.initializer_range == pytest.approx(math.sqrt(2 / (5 * 64)))  # SmallInit when unset
    layer = model.albert.encoder.layers[1]
    assert layer.qkv_bias.abs().sum() == 0 and layer.ffn_in_bias.abs().sum() == 0
    assert layer.adapters["qkv"].second.abs().sum() == 0 and layer.adapters["qkv"].first.abs().sum() > 0
    assert model.predictions.bias.abs().sum() == 0
    assert model.albert.embeddings.word_embeddings.weight[config.pad_token_id].abs().sum() == 0


@pytest.mark.parametrize("bad, message", [
    (dict(adapter_dim=4, share_large_matrices=0), "adapter_dim=4 adapts shared matrices"),
    (dict(num_attention_heads=3), "not a multiple of num_attention_heads"),
    (dict(share_large_matrices=5), "share_large_matrices must be between 0"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
])
def test_config_refuses_inconsistent_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


# ---- lean autograd Functions against plain autograd ------------------------------------------


def plain_feed_forward(x, norm_w, norm_b, w_in, b_in, w_out, b_out, act, gated, eps, in_adapter, out_adapter):
    h = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps)
    pre = F.linear(h, w_in, b_in)
    if in_adapter[0] is not None:
        pre = pre + h @ in_adapter[0].t() @ in_adapter[1].t()
    if gated:
        gate, lin = pre.chunk(2, dim=-1)
        hidden = act(gate) * lin
    else:
        hidden = act(pre)
    out = F.linear(hidden, w_out, b_out)
    if out_adapter[0] is not None:
        out = out + hidden @ out_adapter[0].t() @ out_adapter[1].t()
    return out


@pytest.mark.parametrize("gated, adapter", [(True, True), (False, False)])
def test_feed_forward_function_matches_plain_autograd_and_passes_gradcheck(gated, adapter):
    torch.manual_seed(0)
    H, inter, r = 6, 5, 2
    first = inter * (2 if gated else 1)  # GEGLU's first matrix is twice as wide

    def param(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, norm_w, norm_b, w_in, b_in = param(2, 3, H), param(H), param(H), param(first, H), param(first)
    w_out, b_out = param(H, inter), param(H)
    in_adapter = (param(r, H), param(first, r)) if adapter else (None, None)
    out_adapter = (param(r, inter), param(H, r)) if adapter else (None, None)
    act = ACT2FN["gelu_new"]
    inputs = (x, norm_w, norm_b, w_in, b_in, w_out, b_out, *in_adapter, *out_adapter)

    def lean(x, norm_w, norm_b, w_in, b_in, w_out, b_out, *adapters):
        adapters = adapters if adapter else (None,) * 4
        return lean_feed_forward(x, norm_w, norm_b, w_in, b_in, w_out, b_out, act, gated, 1e-5,
                                 adapters[:2], adapters[2:])

    def plain(x, norm_w, norm_b, w_in, b_in, w_out, b_out, *adapters):
        adapters = adapters if adapter else (None,) * 4
        return plain_feed_forward(x, norm_w, norm_b, w_in, b_in, w_out, b_out, act, gated, 1e-5,
                                  adapters[:2], adapters[2:])

    present = tuple(t for t in inputs if t is not None)
    torch.testing.assert_close(lean(*present), plain(*present), rtol=0, atol=1e-12)
    grad = torch.randn(2, 3, H, dtype=torch.float64)
    lean_grads = torch.autograd.grad(lean(*present), present, grad)
    plain_grads = torch.autograd.grad(plain(*present), present, grad)
    for ours, reference in zip(lean_grads, plain_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lean, present, fast_mode=True)


def test_feed_forward_saves_only_its_input_and_pre_activation():
    H, inter, tokens = 8, 12, 10
    x = torch.randn(1, tokens, H, requires_grad=True)
    w_in = torch.randn(2 * inter, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lean_feed_forward(x * 1.0, torch.ones(H), torch.zeros(H), w_in, None, torch.randn(H, inter), None,
                          ACT2FN["gelu_new"], True, 1e-5)
    activations = [t for t in saved if t.dim() == 3]  # the rest are weights
    assert sorted(t.shape[-1] for t in activations) == [H, 2 * inter]


def rotate_as_complex(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embeddings written independently: pairs (j, j + d/2) as complex numbers times e^{i pos theta_j}."""
    S, d = x.shape[-3], x.shape[-1]
    theta = base ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * theta[None, :]  # (S, d/2)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_norm_qkv_rotary_matches_plain_rotary_and_passes_gradcheck():
    torch.manual_seed(0)
    B, S, H, heads = 2, 5, 8, 2

    def param(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    inputs = (param(B, S, H), param(H), param(H), param(3 * H, H), param(3 * H), param(2, H), param(3 * H, 2))
    cos, sin = rotary_tables(S, H // heads, 10000.0, dtype=torch.float64)

    def lean(x, norm_w, norm_b, w, b, first, second):
        return norm_qkv_rotary(x, norm_w, norm_b, w, b, first, second, cos, sin, heads, 1e-5)

    def plain(x, norm_w, norm_b, w, b, first, second):
        h = F.layer_norm(x, (H,), norm_w, norm_b, 1e-5)
        qkv = (F.linear(h, w, b) + h @ first.t() @ second.t()).view(B, S, 3, heads, -1)
        q, k, v = qkv.unbind(2)
        return torch.stack([rotate_as_complex(q), rotate_as_complex(k), v], dim=2).flatten(2)

    torch.testing.assert_close(lean(*inputs), plain(*inputs), rtol=0, atol=1e-12)
    grad = torch.randn(B, S, 3 * H, dtype=torch.float64)
    for ours, reference in zip(torch.autograd.grad(lean(*inputs), inputs, grad),
                               torch.autograd.grad(plain(*inputs), inputs, grad)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lean, inputs, fast_mode=True)


# ---- the whole model against a plain pre-norm transformer --------------------------------------


def plain_prenorm_encoder(model: LeanAlbertModel, input_ids, attention_mask) -> torch.Tensor:
    """A textbook pre-norm transformer reading LeanAlbertModel's weights (no sharing, no lean autograd)."""
    c = model.config
    emb = model.embeddings
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0]
    x = emb.projection(F.layer_norm(x, (c.embedding_size,), emb.layer_norm.weight, emb.layer_norm.bias,
                                    c.layer_norm_eps))
    B, S, H = x.shape
    d = H // c.num_attention_heads
    blocked = ~attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    for layer, m in zip(model.encoder.layers, model.encoder.matrices):
        h = F.layer_norm(x, (H,), layer.attention_norm.weight, layer.attention_norm.bias, c.layer_norm_eps)
        q, k, v = (h @ m.qkv.t() + layer.qkv_bias).view(B, S, 3, c.num_attention_heads, d).unbind(2)
        q, k = rotate_as_complex(q).transpose(1, 2), rotate_as_complex(k).transpose(1, 2)  # (B, nh, S, d)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(blocked, float("-inf"))
        attended = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, H)
        x = x + attended @ m.attention_out.t() + layer.attention_out_bias
        h = F.layer_norm(x, (H,), layer.ffn_norm.weight, layer.ffn_norm.bias, c.layer_norm_eps)
        gate, lin = (h @ m.ffn_in.t() + layer.ffn_in_bias).chunk(2, dim=-1)
        x = x + (ACT2FN[c.hidden_act](gate) * lin) @ m.ffn_out.t() + layer.ffn_out_bias
    return F.layer_norm(x, (H,), model.encoder.final_norm.weight, model.encoder.final_norm.bias, c.layer_norm_eps)


def test_unshared_model_matches_a_plain_prenorm_transformer_with_gradients():
    torch.manual_seed(0)
    model = LeanAlbertModel(small_config(share_large_matrices=0), add_pooling_layer=False).double()
    with torch.no_grad():  # non-zero biases, so a bias routed to the wrong place shows
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.1)
    inputs = batch()
    mask = inputs["attention_mask"].bool()
    ours = model(**inputs).last_hidden_state
    plain = plain_prenorm_encoder(model, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(ours[mask], plain[mask], rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(ours) * mask[..., None]
    names, params = zip(*model.named_parameters())
    ours_grads = torch.autograd.grad(ours, params, grad)
    plain_grads = torch.autograd.grad(plain, params, grad)
    for name, a, b in zip(names, ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)


def test_padding_does_not_change_the_other_positions():
    torch.manual_seed(0)
    model = LeanAlbertForMaskedLM(small_config()).eval()
    inputs = batch()
    other = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 17))
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[mask], model(**other).logits[mask])


def saved_bytes_per_layer(model: LeanAlbertModel, inputs) -> list[int]:
    """Bytes first saved for backward during each block: activations only, each storage once."""
    model(**inputs)  # builds the rotary tables, constants every block reads (like the parameters)
    constants = [*model.parameters(), *model.encoder._rotary_cache[1:]]
    parameters = {t.untyped_storage().data_ptr() for t in constants}
    seen, per_layer, current = set(), [], [None]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in parameters:
            seen.add(key)
            if current[0] is not None:
                per_layer[current[0]] += t.untyped_storage().nbytes()
        return t

    def enter(module, args):
        per_layer.append(0)
        current[0] = len(per_layer) - 1

    def leave(module, args, output):
        current[0] = None

    for layer in model.encoder.layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return per_layer


def test_a_block_saves_at_most_6h_plus_2i_floats_per_token():
    config = small_config(hidden_size=32, intermediate_size=48, num_attention_heads=4)
    model = LeanAlbertModel(config, add_pooling_layer=False).train()
    inputs = batch(size=(4, 16))
    H, inter, tokens = config.hidden_size, config.intermediate_size, inputs["input_ids"].numel()
    per_layer = saved_bytes_per_layer(model, inputs)
    assert len(per_layer) == config.num_hidden_layers
    lean = (6 * H + 2 * inter) * tokens * 4
    softmax_stats = config.num_attention_heads * tokens * 4  # one float per head and token
    padding_mask = tokens * 4  # one additive mask for all blocks, first saved by block 0
    reference = (7 * H + 2 * inter) * tokens * 4  # RuLeanALBERT's own code
    assert lean + softmax_stats <= per_layer[0] <= lean + softmax_stats + padding_mask, (per_layer, lean)
    assert all(saved == lean + softmax_stats for saved in per_layer[1:]), (per_layer, lean)
    assert max(per_layer) < reference


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = LeanAlbertForPreTraining(small_config())
    checkpointed = LeanAlbertForPreTraining(small_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.albert.encoder.gradient_checkpointing and not plain.albert.encoder.gradient_checkpointing
    inputs = dict(batch(), labels=batch()["input_ids"], sentence_order_label=torch.tensor([0, 1, 1]))
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks in the SOP head
        model.train()(**inputs).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bf16_autocast_trains_with_fp32_residual_and_gradients():
    torch.manual_seed(0)
    model = LeanAlbertForPreTraining(small_config(adapter_dim=2))
    inputs = dict(batch(), labels=batch()["input_ids"], sentence_order_label=torch.tensor([0, 1, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.float32
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- heads and transformers plumbing -------------------------------------------------------------


def test_heads_compute_their_losses():
    torch.manual_seed(0)
    inputs = batch()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 1] = inputs["input_ids"][:, 1]
    pretraining = LeanAlbertForPreTraining(small_config())
    out = pretraining(**inputs, labels=labels, sentence_order_label=torch.tensor([0, 1, 0]))
    mlm_only = pretraining(**inputs, labels=labels).loss
    sop = F.cross_entropy(out.sop_logits, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(out.loss, mlm_only + sop)
    torch.testing.assert_close(mlm_only, F.cross_entropy(out.prediction_logits[:, 1], labels[:, 1]))
    assert out.prediction_logits.shape == (3, 10, 60) and out.sop_logits.shape == (3, 2)

    classifier = LeanAlbertForSequenceClassification(small_config(num_labels=3))
    out = classifier(**inputs, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss > 0
    out.loss.backward()
    assert classifier.albert.encoder.matrices[0].qkv.grad is not None


def test_resize_token_embeddings_keeps_the_decoder_tied_and_resizes_its_bias():
    model = LeanAlbertForMaskedLM(small_config())
    old_bias = model.predictions.bias.detach().clone()
    model.resize_token_embeddings(70)
    assert model.predictions.decoder.weight is model.albert.embeddings.word_embeddings.weight
    assert model.config.vocab_size == 70 and model.predictions.bias.shape == (70,)
    torch.testing.assert_close(model.predictions.bias[:60].detach(), old_bias)
    assert model(**batch(vocab=70)).logits.shape == (3, 10, 70)


def test_sandwich_norm_and_absolute_positions_train():
    model = LeanAlbertForPreTraining(small_config(sandwich_norm=True, position_embedding_type="absolute",
                                                  share_large_matrices=0, hidden_act_gated=False))
    layer = model.albert.encoder.layers[0]
    assert layer.attention_out_bias is None and layer.ffn_out_bias is None  # the sandwich norm has the bias
    assert model.albert.embeddings.position_embeddings.weight.shape == (32, 8)
    inputs = dict(batch(), labels=batch()["input_ids"], sentence_order_label=torch.tensor([0, 1, 1]))
    model(**inputs).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_save_pretrained_round_trip_keeps_logits_and_the_tied_decoder(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining

    torch.manual_seed(0)
    model = LeanAlbertForPreTraining(small_config(adapter_dim=2)).eval()
    model.save_pretrained(tmp_path)
    assert {"configuration_lean_albert.py", "modeling_lean_albert.py", "lean_ops.py"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "lean_albert" and saved["tie_word_embeddings"] is True
    assert saved["auto_map"]["AutoModelForMaskedLM"] == "modeling_lean_albert.LeanAlbertForMaskedLM"

    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is LeanAlbertForPreTraining and type(AutoConfig.from_pretrained(tmp_path)) is LeanAlbertConfig
    embeddings = loaded.albert.embeddings.word_embeddings.weight
    assert loaded.predictions.decoder.weight.data_ptr() == embeddings.data_ptr()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).prediction_logits
        torch.testing.assert_close(loaded(**inputs).prediction_logits, expected, rtol=0, atol=0)
        masked_lm = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
        assert masked_lm.predictions.decoder.weight is masked_lm.albert.embeddings.word_embeddings.weight
        torch.testing.assert_close(masked_lm(**inputs).logits, expected, rtol=0, atol=0)
        base = AutoModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.albert(**inputs).last_hidden_state)


REMOTE_LOAD = """
import json, sys
import torch
from transformers import AutoModelForMaskedLM, pipeline

folder = sys.argv[1]
model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.tensor(json.load(open(folder + "/probe.json")))
with torch.no_grad():
    logits = model(input_ids=ids).logits
fill = pipeline("fill-mask", model=folder, trust_remote_code=True)
predictions = fill("The [MASK] statement is used to define a function.")
print(json.dumps({
    "module": type(model).__module__,
    "tied": model.predictions.decoder.weight.data_ptr() == model.albert.embeddings.word_embeddings.weight.data_ptr(),
    "logits": logits.tolist(),
    "predictions": len(predictions),
    "convmodel_imported": any(name == "convmodel" or name.startswith("convmodel.") for name in sys.modules),
}))
"""


def test_exported_folder_loads_with_trust_remote_code_without_convmodel(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LeanAlbertForPreTraining(small_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    folder = tmp_path / "exported"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    probe = [[tokenizer.cls_token_id, 10, 11, tokenizer.mask_token_id, 12, tokenizer.sep_token_id]]
    (folder / "probe.json").write_text(json.dumps(probe))
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    # -I: isolated mode, neither the repository nor the current directory is on sys.path
    result = subprocess.run([sys.executable, "-I", str(script), str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["tied"] and report["predictions"] == 5
    assert not report["convmodel_imported"]
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor(probe)).prediction_logits
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert Path(folder / "lean_ops.py").read_text() == (
        Path(__file__).parents[1] / "convmodel" / "models" / "lean_albert" / "lean_ops.py").read_text()
