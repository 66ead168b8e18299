"""LeanALBERT pretraining: masked LM, optionally with sentence-order prediction (SOP).

The transformers model lives in convmodel/models/lean_albert/ (and ships with exports); this
module only builds it from YAML and turns a batch into a loss. As in bert.py, the vocabulary
projection runs on the masked positions only: at hidden 4096 it is small, at CPU-test sizes it
costs more than the encoder.
"""

import torch

from convmodel.errors import UserError
from convmodel.models.base import Losses, PretrainingModule, make_hf_config


class LeanAlbertPretraining(PretrainingModule):
    """LeanALBERT trained with masked LM (`mlm`) or masked LM plus sentence-order prediction (`sop`).

    `mlm` trains LeanAlbertForMaskedLM (no pooler); `sop` trains LeanAlbertForPreTraining, whose
    tanh pooler on [CLS] feeds a two-way classifier: segments in order (0) or swapped (1). Either
    exports as a folder that loads with `trust_remote_code=True`.

    Args:
        tokenizer: Tokenizer folder; vocabulary size and special ids come from it (linked from data.tokenizer).
        config: LeanAlbertConfig keys (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, embedding_size, hidden_act_gated, share_large_matrices, adapter_dim, position_embedding_type, gradient_checkpointing, ...); keys left out take LeanAlbertConfig's defaults (the released RuLeanALBERT shape); null gives a small 256/4/4 model.
        objective: mlm or sop (linked from data.objective).
    """

    def __init__(self, tokenizer: str, config: dict | None = None, objective: str = "mlm", **kwargs):
        super().__init__(tokenizer=tokenizer, objective=objective, **kwargs)
        self.save_hyperparameters()
        if objective not in ("mlm", "sop"):
            raise UserError(f"data.objective: LeanAlbertPretraining trains mlm or sop, not {objective!r}; "
                            "use convmodel.models.Gpt2Pretraining for clm")
        from convmodel.models.lean_albert import (
            LeanAlbertConfig,
            LeanAlbertForMaskedLM,
            LeanAlbertForPreTraining,
        )

        ids = self.special_ids
        fixed = {"vocab_size": ids.vocab_size, "pad_token_id": ids.pad, "bos_token_id": ids.cls,
                 "eos_token_id": ids.sep}
        try:
            hf_config = make_hf_config(LeanAlbertConfig, SMALL_LEAN_ALBERT if config is None else config, fixed)
        except ValueError as error:  # LeanAlbertConfig's own consistency checks
            raise UserError(f"model.init_args.config: {error}") from None
        model_class = LeanAlbertForMaskedLM if objective == "mlm" else LeanAlbertForPreTraining
        self.model = model_class(hf_config)

    @property
    def max_positions(self) -> int:
        config = self.model.config
        if config.position_embedding_type == "rotary":  # no position table to run out of
            return 2**31 - 1
        return config.max_position_embeddings

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> Losses:
        out = self.model.albert(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
        )
        return self.masked_lm_losses(out.last_hidden_state, batch, self.model.predictions,
                                     lambda: self.model.sop_classifier(out.pooler_output))


# A small default for smoke runs; real configs (configs/lean-albert-xlarge.yaml) spell every size out.
SMALL_LEAN_ALBERT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "embedding_size": 128,
    "hidden_act_gated": True,
    "share_large_matrices": 1,
}
