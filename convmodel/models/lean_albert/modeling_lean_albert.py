"""LeanALBERT as transformers models: the architecture behind RuLeanALBERT and CALM.

Differences from transformers' ALBERT (arXiv:1909.11942):
- only the large matrices (QKV, attention-out, FFN-in, FFN-out) are shared across blocks, in
  `share_large_matrices` sets; every block keeps its own LayerNorms and biases and may add a
  low-rank adapter to each shared matrix;
- pre-norm blocks with a final LayerNorm, a residual stream kept in the parameters' dtype (fp32
  under autocast), rotary positions, optional GEGLU feed-forward, optional sandwich norm;
- activation memory: attention runs in `scaled_dot_product_attention` (the probabilities are
  never stored) and the two lean autograd Functions of lean_ops.py recompute LayerNorms and the
  activation in backward, so a block saves 6H + 2I floats per token (H + 2I of them in the
  feed-forward); `gradient_checkpointing` recomputes whole blocks instead.

The shared matrices live once, in `encoder.matrices`; blocks receive their set as an argument,
so the state dict, the optimizer and `save_pretrained` all see each shared tensor once.

This file ships inside exported model folders (trust_remote_code loading): it imports only
torch, transformers and its sibling files.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

from .configuration_lean_albert import LeanAlbertConfig
from .lean_ops import lean_feed_forward, norm_qkv_rotary, rotary_tables

# ---- building blocks ------------------------------------------------------------------------------


class LeanAlbertEmbeddings(nn.Module):
    """Token (+ segment, + absolute position) embeddings of width E, LayerNorm, then E -> H."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        E = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size else None
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, E) if config.position_embedding_type == "absolute" else None
        )
        self.layer_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.projection = nn.Linear(E, config.hidden_size) if E != config.hidden_size else None

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, S, E)
        embeddings = inputs_embeds
        if self.token_type_embeddings is not None and token_type_ids is not None:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        elif self.token_type_embeddings is not None:  # all segment 0
            embeddings = embeddings + self.token_type_embeddings.weight[0]
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(embeddings.shape[1], device=embeddings.device)
            embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = self.dropout(self.layer_norm(embeddings))
        return self.projection(embeddings) if self.projection is not None else embeddings  # (B, S, H)


class LeanAlbertMatrices(nn.Module):
    """One set of the large matrices of a block; several blocks may use the same set."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        H, ffn_in = config.hidden_size, config.intermediate_size * (2 if config.hidden_act_gated else 1)
        self.qkv = nn.Parameter(torch.empty(3 * H, H))
        self.attention_out = nn.Parameter(torch.empty(H, H))
        self.ffn_in = nn.Parameter(torch.empty(ffn_in, H))
        self.ffn_out = nn.Parameter(torch.empty(H, config.intermediate_size))


class LowRankAdapter(nn.Module):
    """A block's own low-rank correction B A to a shared (out, in) matrix (LoRA, arXiv:2106.09685).

    A starts random (xavier) and B at zero, so a fresh adapter leaves the shared matrix unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.first = nn.Parameter(torch.empty(rank, in_features))  # A
        self.second = nn.Parameter(torch.empty(out_features, rank))  # B

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first, self.second


class LeanAlbertLayer(nn.Module):
    """A pre-norm block: x + Attention(LN(x)), then x + FFN(LN(x)); large matrices come from outside."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        H, inter = config.hidden_size, config.intermediate_size
        ffn_in = inter * (2 if config.hidden_act_gated else 1)
        out_bias = not config.sandwich_norm  # a sandwich norm brings its own bias
        eps = config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.eps = eps
        self.attention_norm = nn.LayerNorm(H, eps=eps)
        self.qkv_bias = nn.Parameter(torch.empty(3 * H))
        self.attention_out_bias = nn.Parameter(torch.empty(H)) if out_bias else None
        self.attention_sandwich_norm = nn.LayerNorm(H, eps=eps) if config.sandwich_norm else None
        self.ffn_norm = nn.LayerNorm(H, eps=eps)
        self.ffn_in_bias = nn.Parameter(torch.empty(ffn_in))
        self.ffn_out_bias = nn.Parameter(torch.empty(H)) if out_bias else None
        self.ffn_sandwich_norm = nn.LayerNorm(H, eps=eps) if config.sandwich_norm else None
        r = config.adapter_dim
        self.adapters = nn.ModuleDict({
            "qkv": LowRankAdapter(H, 3 * H, r),
            "attention_out": LowRankAdapter(H, H, r),
            "ffn_in": LowRankAdapter(H, ffn_in, r),
            "ffn_out": LowRankAdapter(inter, H, r),
        }) if r else None
        self.activation = ACT2FN[config.hidden_act]
        self.gated = config.hidden_act_gated
        self.dropout = config.hidden_dropout_prob
        self.attention_dropout = config.attention_probs_dropout_prob

    def _adapter(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.adapters[name].pair() if self.adapters is not None else (None, None)

    def forward(self, hidden, matrices: LeanAlbertMatrices, attention_mask=None, cos=None, sin=None):
        B, S, H = hidden.shape
        qkv = norm_qkv_rotary(
            hidden, self.attention_norm.weight, self.attention_norm.bias, matrices.qkv, self.qkv_bias,
            *self._adapter("qkv"), cos, sin, self.num_heads, self.eps,
        )  # (B, S, 3H)
        # views into qkv, (B, nh, S, d); SDPA keeps this one tensor and no probabilities for backward
        query, key, value = (t.transpose(1, 2) for t in qkv.view(B, S, 3, self.num_heads, -1).unbind(2))
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, nh, S, d), laid out as (B, S, nh, d) when the inputs are, so the reshape is a view
        attended = attended.transpose(1, 2).reshape(B, S, H)
        out = F.linear(attended, matrices.attention_out, self.attention_out_bias)
        if self.adapters is not None:
            first, second = self._adapter("attention_out")
            out = out + F.linear(F.linear(attended, first), second)
        hidden = hidden + self._finish(out, self.attention_sandwich_norm).to(hidden.dtype)

        out = lean_feed_forward(
            hidden, self.ffn_norm.weight, self.ffn_norm.bias, matrices.ffn_in, self.ffn_in_bias,
            matrices.ffn_out, self.ffn_out_bias, self.activation, self.gated, self.eps,
            self._adapter("ffn_in"), self._adapter("ffn_out"),
        )
        return hidden + self._finish(out, self.ffn_sandwich_norm).to(hidden.dtype)

    def _finish(self, out, sandwich_norm):
        if sandwich_norm is not None:
            out = sandwich_norm(out)
        return F.dropout(out, self.dropout, self.training) if self.dropout else out


class LeanAlbertEncoder(nn.Module):
    """The blocks, the sets of large matrices they share, and the final LayerNorm."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.config = config
        self.matrices = nn.ModuleList(LeanAlbertMatrices(config) for _ in range(config.num_matrix_sets))
        self.layers = nn.ModuleList(LeanAlbertLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # switched by PreTrainedModel.activation_checkpointing_enable
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self._rotary_cache: tuple | None = None

    def _rotary(self, seq_len: int, device, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos and sin tables (seq_len, head_dim), cached: every block reads the same two tensors."""
        if self.config.position_embedding_type != "rotary":
            return None, None
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cache = self._rotary_cache
        if cache is None or cache[0] < seq_len or cache[1].device != device or cache[1].dtype != dtype:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            cos, sin = rotary_tables(max(seq_len, 128), head_dim, self.config.rotary_embedding_base, device, dtype)
            self._rotary_cache = cache = (cos.shape[0], cos, sin)
        return cache[1][:seq_len], cache[2][:seq_len]

    def forward(self, hidden, attention_mask=None, output_hidden_states: bool = False):
        """hidden (B, S, H); attention_mask (B, S) bool, True for real tokens, or None for no padding."""
        hidden = hidden.to(self.final_norm.weight.dtype)  # residual stream in fp32 under autocast
        cos, sin = self._rotary(hidden.shape[1], hidden.device, hidden.dtype)
        if attention_mask is not None:
            # additive mask (B, 1, 1, S) in the dtype the queries will have, built once for all blocks
            device_type = hidden.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=hidden.device).masked_fill_(
                ~attention_mask, torch.finfo(dtype).min)[:, None, None, :]
        all_hidden = [hidden] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            matrices = self.matrices[self.config.matrix_set_of_layer(index)]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, matrices, attention_mask, cos, sin)
            else:
                hidden = layer(hidden, matrices, attention_mask, cos, sin)
            if all_hidden is not None:
                all_hidden.append(hidden)
        return self.final_norm(hidden), (tuple(all_hidden) if all_hidden is not None else None)


class LeanAlbertMLMHead(nn.Module):
    """H -> E, activation, LayerNorm(E), then the decoder E -> vocab (tied to the word embeddings)."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        E = config.embedding_size
        self.dense = nn.Linear(config.hidden_size, E)
        self.activation = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(E, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))  # kept apart: tying never touches it

    def forward(self, hidden):
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden)))) + self.bias

    def resize_bias(self, vocab_size: int) -> None:
        """Follow a resized vocabulary: keep the old tokens' biases, new tokens start at 0."""
        old = self.bias
        if old.shape[0] != vocab_size:
            new = torch.zeros(vocab_size, dtype=old.dtype, device=old.device)
            kept = min(vocab_size, old.shape[0])
            new[:kept] = old.detach()[:kept]
            self.bias = nn.Parameter(new)


class LeanAlbertSOPHead(nn.Module):
    """Sentence-order prediction from the pooled [CLS]: in order (0) or swapped (1)."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled):
        return self.classifier(self.dropout(pooled))


# ---- transformers models --------------------------------------------------------------------------


class LeanAlbertPreTrainedModel(PreTrainedModel):
    """Weight init and the transformers plumbing shared by the LeanALBERT models."""

    config_class = LeanAlbertConfig
    base_model_prefix = "albert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LeanAlbertEncoder"]  # blocks read matrices held by the encoder

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # torch.nn.init is looked up at call time: transformers guards it so loaded weights stay
        init = torch.nn.init
        std = self.config.initializer_range
        if isinstance(module, LeanAlbertMatrices):
            for matrix in module.parameters(recurse=False):
                init.normal_(matrix, mean=0.0, std=std)
        elif isinstance(module, LowRankAdapter):
            init.xavier_normal_(module.first)
            init.zeros_(module.second)
        elif isinstance(module, LeanAlbertLayer):
            for bias in (module.qkv_bias, module.attention_out_bias, module.ffn_in_bias, module.ffn_out_bias):
                if bias is not None:
                    init.zeros_(bias)
        elif isinstance(module, LeanAlbertMLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class LeanAlbertModel(LeanAlbertPreTrainedModel):
    """The LeanALBERT encoder: embeddings, blocks, final LayerNorm and an optional tanh pooler on [CLS]."""

    def __init__(self, config: LeanAlbertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = LeanAlbertEmbeddings(config)
        self.encoder = LeanAlbertEncoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LeanAlbertModel: give exactly one of input_ids or inputs_embeds")
        if output_attentions:
            raise ValueError("LeanAlbertModel never materialises attention probabilities "
                             "(scaled_dot_product_attention); output_attentions is not supported")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        embedded = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, S, H)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()  # (B, S): True = a real token, attended to
        sequence, all_hidden = self.encoder(embedded, mask, bool(output_hidden_states))
        pooled = torch.tanh(self.pooler(sequence[:, 0])) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled,
                                            hidden_states=all_hidden)
        return output if return_dict else output.to_tuple()


@dataclass
class LeanAlbertForPreTrainingOutput(ModelOutput):
    """Loss (MLM, plus SOP when sentence_order_label is given), MLM logits (B, S, V), SOP logits (B, 2)."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    sop_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class _MaskedLMHeadMixin:
    """The MLM decoder as transformers' output embeddings, tied to the word embeddings (a dict in v5)."""

    _tied_weights_keys = {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight"}

    def get_output_embeddings(self) -> nn.Linear:
        return self.predictions.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.predictions.decoder = value

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.predictions.resize_bias(embeddings.num_embeddings)  # the bias is not part of the decoder
        return embeddings


def _mlm_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class LeanAlbertForPreTraining(_MaskedLMHeadMixin, LeanAlbertPreTrainedModel):
    """Pretraining heads: masked LM (decoder tied to the word embeddings) and sentence-order prediction."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.albert = LeanAlbertModel(config)
        self.predictions = LeanAlbertMLMHead(config)
        self.sop_classifier = LeanAlbertSOPHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        sentence_order_label: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LeanAlbertForPreTrainingOutput | tuple:
        """labels: (B, S) token ids, -100 where no prediction is scored; sentence_order_label: (B,) 0 or 1."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        logits = self.predictions(outputs.last_hidden_state)  # (B, S, V)
        sop_logits = self.sop_classifier(outputs.pooler_output)  # (B, 2)
        loss = None
        if labels is not None:
            loss = _mlm_loss(logits, labels)
            if sentence_order_label is not None:
                loss = loss + F.cross_entropy(sop_logits.float(), sentence_order_label.reshape(-1))
        output = LeanAlbertForPreTrainingOutput(loss=loss, prediction_logits=logits, sop_logits=sop_logits,
                                                hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class LeanAlbertForMaskedLM(_MaskedLMHeadMixin, LeanAlbertPreTrainedModel):
    """Masked LM head on the encoder (no pooler); what `pipeline("fill-mask")` loads."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.albert = LeanAlbertModel(config, add_pooling_layer=False)
        self.predictions = LeanAlbertMLMHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """labels: (B, S) token ids, -100 where no prediction is scored."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        logits = self.predictions(outputs.last_hidden_state)  # (B, S, V)
        loss = _mlm_loss(logits, labels) if labels is not None else None
        output = MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class LeanAlbertForSequenceClassification(LeanAlbertPreTrainedModel):
    """Pooled [CLS] -> dropout -> linear to config.num_labels (regression when num_labels is 1)."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = LeanAlbertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        """labels: (B,) class ids, or (B,) floats for regression, or (B, num_labels) multi-label targets."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                scores = logits.squeeze(-1) if self.num_labels == 1 else logits
                loss = F.mse_loss(scores.float(), labels.float().reshape(scores.shape))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.reshape(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class LeanAlbertForTokenClassification(LeanAlbertPreTrainedModel):
    """Each token's final hidden state -> dropout -> linear to config.num_labels (NER, POS tagging)."""

    def __init__(self, config: LeanAlbertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.albert = LeanAlbertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        """labels: (B, S) class ids, -100 where a token has no label (padding, later sub-tokens)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        output = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()
