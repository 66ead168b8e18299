"""Fitting the trained module and the run's tokenizer for transformers (special ids, dtype, inputs)."""


def prepare_model(module, hf_tokenizer, dtype: str):
    """`module.to_hf()` in eval mode and `dtype`, with the tokenizer's special ids in its config."""
    import torch

    model = module.to_hf().eval()
    config = model.config
    ids = {"pad_token_id": hf_tokenizer.pad_token_id}
    if module.objective == "clm":  # documents are separated by end-of-text, which also starts generation
        ids |= {"bos_token_id": hf_tokenizer.eos_token_id, "eos_token_id": hf_tokenizer.eos_token_id}
    else:
        ids |= {"cls_token_id": hf_tokenizer.cls_token_id, "sep_token_id": hf_tokenizer.sep_token_id,
                "mask_token_id": hf_tokenizer.mask_token_id}
    for name, value in ids.items():
        if getattr(config, name, None) is None and value is not None:
            setattr(config, name, value)
    from convmodel.tokenization import TOKENIZER_CLASS

    config.tokenizer_class = TOKENIZER_CLASS
    return model.to(getattr(torch, dtype))


def fit_tokenizer(hf_tokenizer, module) -> None:
    """Make the run's tokenizer encode text the way the model saw it in training.

    The tokenizer adds [CLS] ... [SEP] and token_type_ids, as BERT wants. A causal LM was
    trained on plain token runs: it gets no special tokens and no token_type_ids (GPT-2's
    forward takes them and would add a segment embedding it never learnt).
    """
    from tokenizers import processors

    if module.objective == "clm":
        hf_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        hf_tokenizer.model_input_names = ["input_ids", "attention_mask"]
        if hf_tokenizer.bos_token is None:
            hf_tokenizer.bos_token = hf_tokenizer.eos_token
    hf_tokenizer.model_max_length = max_positions(module)


def max_positions(module) -> int:
    """Longest input the model takes; for position-free models (rotary) the configured length."""
    positions = module.max_positions
    if positions >= 2**31 - 1:
        positions = getattr(module.to_hf().config, "max_position_embeddings", positions)
    return int(positions)
