"""Print a causal LM's continuation of a prompt: a quick look at an exported GPT-2.

    python trainer/generate.py --model_dir runs/gpt2-tiny/model --prompt "The function returns" \
        [--max_new_tokens 40] [--temperature 0.8] [--top_k 40] [--seed 0]

See convmodel/generation.py.
"""

from convmodel.generation import generate_main

if __name__ == "__main__":
    generate_main()
