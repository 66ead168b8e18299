"""Continue a prompt with an exported causal LM: the quick look at a GPT-2 that fill-mask is for BERT.

Sampling, not greedy decoding: a small model decoded greedily repeats its most frequent phrase,
which hides what it learned. The seed is fixed so that `make demo` prints the same text twice.
"""

import os

from convmodel.errors import UserError


def generate(model_dir: str, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, trust_remote_code: bool = False) -> str:
    """`prompt` continued by the model in `model_dir` (top-k sampling at `temperature`)."""
    model_dir = str(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model_dir {model_dir} has no config.json; give a folder written by export_model.py")
    if not prompt.strip():
        raise UserError("--prompt is empty; give the beginning of a sentence, e.g. --prompt 'The function returns'")
    if max_new_tokens <= 0 or temperature <= 0 or top_k <= 0:
        raise UserError("--max_new_tokens, --temperature and --top_k must be > 0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # a masked LM folder: no causal LM class for its config
        raise UserError(f"--model_dir {model_dir} is not a causal language model ({exc}); fill_mask.py "
                        "is the quick look at masked LMs") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the prompt alone, no end-of-text after it: that would start a new document
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def generate_main(argv: list[str] | None = None) -> None:
    """`generate.py --model_dir DIR --prompt 'The function' [--max_new_tokens 40] [--seed 0]`: prints a continuation."""
    from convmodel.export import run_tool

    def run(model_dir: str, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8, top_k: int = 40,
            seed: int = 0, trust_remote_code: bool = False) -> None:
        """Print the prompt continued by the model.

        Args:
            model_dir: folder written by export_model.py from a GPT-2 checkpoint.
            prompt: the beginning of a text.
            max_new_tokens: how many tokens to add.
            temperature: sampling temperature (lower: safer, more repetitive).
            top_k: sample among this many most likely tokens.
            seed: random seed of the sampling.
            trust_remote_code: allow the folder's own model code.
        """
        print(generate(model_dir, str(prompt), int(max_new_tokens), float(temperature), int(top_k), int(seed),
                       bool(trust_remote_code)))

    run_tool(run, argv, "generate.py")
