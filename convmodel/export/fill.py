"""fill_mask.py's quick look at an exported masked LM (a causal LM is pointed to generate.py)."""

import os

from convmodel.errors import UserError


def fill_mask(model_dir: str, text: str, top_k: int = 5, trust_remote_code: bool = False) -> list[dict]:
    """The top_k predictions of transformers' fill-mask pipeline for the [MASK] in `text`."""
    import json

    model_dir = str(model_dir)
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"--model_dir {model_dir} has no config.json; give a folder written by export_model.py")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if is_causal_lm(config):
        raise UserError(f"--model_dir {model_dir} holds a causal language model "
                        f"({', '.join(config.get('architectures') or [config.get('model_type', '?')])}), which has "
                        f"no [MASK] to fill; continue a prompt instead: trainer/generate.py --model_dir {model_dir} "
                        "--prompt 'The function returns'")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(f"--model_dir {model_dir} ships its own model code (modeling_*.py); read it, then add "
                        "--trust_remote_code to run it")
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model_dir, trust_remote_code=trust_remote_code)
    mask = fill.tokenizer.mask_token
    if text.count(mask) != 1:
        raise UserError(f"--text must contain the mask token {mask} exactly once, e.g. "
                        f"--text 'The {mask} statement defines a function.'")
    return fill(text, top_k=top_k)


def is_causal_lm(config: dict) -> bool:
    """Whether a config.json describes a causal (left-to-right) LM: its class, is_decoder or a GPT-2."""
    architectures = config.get("architectures") or []
    return (bool(config.get("is_decoder")) or config.get("model_type") == "gpt2"
            or any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures))
