"""GPT-2 pretraining with the causal LM objective (next-token prediction)."""

import torch
import torch.nn.functional as F

from convmodel.errors import UserError
from convmodel.models.base import Losses, PretrainingModule, make_hf_config


class Gpt2Pretraining(PretrainingModule):
    """GPT-2 (transformers' GPT2LMHeadModel) trained to predict the next token.

    Documents in the shards are separated by the tokenizer's end-of-text token, which is
    also the model's bos/eos id.

    Args:
        tokenizer: Tokenizer folder; vocabulary size and special ids come from it (linked from data.tokenizer).
        config: GPT2Config keys (n_embd, n_layer, n_head, n_positions, n_inner, ...); keys left out take transformers' defaults (GPT-2 small); null gives a small 256/4/4 model.
        objective: Must be clm (linked from data.objective).
    """

    max_positions_option = "model.init_args.config.n_positions"

    def __init__(self, tokenizer: str, config: dict | None = None, objective: str = "clm", **kwargs):
        super().__init__(tokenizer=tokenizer, objective=objective, **kwargs)
        self.save_hyperparameters()
        if objective != "clm":
            raise UserError(f"data.objective: Gpt2Pretraining trains clm, not {objective!r}; "
                            "use convmodel.models.BertPretraining for mlm or sop")
        from transformers import GPT2Config, GPT2LMHeadModel

        ids = self.special_ids
        if ids.eos is None:
            raise UserError(f"tokenizer {tokenizer} has no end-of-text (eos) token, which GPT-2 needs "
                            "between documents; train it with train_tokenizer.py")
        fixed = {"vocab_size": ids.vocab_size, "bos_token_id": ids.eos, "eos_token_id": ids.eos,
                 "pad_token_id": ids.pad}
        self.model = GPT2LMHeadModel(make_hf_config(GPT2Config, SMALL_GPT2 if config is None else config, fixed))

    @property
    def max_positions(self) -> int:
        return self.model.config.n_positions

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> Losses:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        # position t predicts token t + 1: shift the (B, T) labels left and ignore the last
        # position, rather than slicing the (B, T, V) logits, which would copy them
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B*T, V), a view
        return Losses(loss, loss, (targets != -100).sum())


# A small default for smoke runs; real configs (configs/gpt2-small.yaml) spell every size out.
SMALL_GPT2 = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512}
