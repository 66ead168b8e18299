"""BERT pretraining: masked LM, optionally with sentence-order prediction (SOP).

A thin layer over transformers' BertForMaskedLM / BertForPreTraining. The loss is computed
here rather than by the transformers model so that the vocabulary projection runs only on
the ~15% masked positions: with a small hidden size and an 8k vocabulary that projection
costs more than the encoder itself.
"""

import torch

from convmodel.errors import UserError
from convmodel.models.base import Losses, PretrainingModule, make_hf_config


class BertPretraining(PretrainingModule):
    """BERT trained with masked LM (`mlm`) or masked LM plus sentence-order prediction (`sop`).

    For `sop` the next-sentence head of BertForPreTraining predicts whether the two
    segments were swapped (label 1) or in order (label 0), as in ALBERT.

    Args:
        tokenizer: Tokenizer folder; vocabulary size and special ids come from it (linked from data.tokenizer).
        config: BertConfig keys (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings, ...); keys left out take transformers' defaults (BERT-base); null gives a small 256/4/4 model.
        objective: mlm or sop (linked from data.objective).
    """

    def __init__(self, tokenizer: str, config: dict | None = None, objective: str = "mlm", **kwargs):
        super().__init__(tokenizer=tokenizer, objective=objective, **kwargs)
        self.save_hyperparameters()
        if objective not in ("mlm", "sop"):
            raise UserError(f"data.objective: BertPretraining trains mlm or sop, not {objective!r}; "
                            "use convmodel.models.Gpt2Pretraining for clm")
        from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

        ids = self.special_ids
        hf_config = make_hf_config(
            BertConfig,
            SMALL_BERT if config is None else config,
            {"vocab_size": ids.vocab_size, "pad_token_id": ids.pad},
        )
        self.model = BertForMaskedLM(hf_config) if objective == "mlm" else BertForPreTraining(hf_config)

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> Losses:
        out = self.model.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
        )
        # for sop, the next-sentence head on the pooled [CLS] predicts the order: (B, 2)
        return self.masked_lm_losses(out[0], batch, self.model.cls.predictions,
                                     lambda: self.model.cls.seq_relationship(out[1]))


# A small default for smoke runs; real configs (configs/bert-base.yaml) spell every size out.
SMALL_BERT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 512,
}
