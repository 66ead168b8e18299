"""From a training checkpoint to a Hugging Face model folder a user can load and publish.

    python trainer/export_model.py --ckpt_path runs/bert-tiny/checkpoints/last.ckpt --output_dir out/model

One code path for every model family: the checkpoint names its LightningModule, Lightning
rebuilds it from the saved hyperparameters, and `module.to_hf()` gives the transformers model,
saved with `save_pretrained` (safetensors; for LeanALBERT also its code files, so the folder
loads with `trust_remote_code=True`). Beside it go the tokenizer the run trained on, fitted to
the model (a causal LM gets no [CLS]/[SEP] and no token_type_ids), and a model card.

The folder is written to a temporary sibling and renamed at the end, so a failed export never
leaves half a model behind, and `--push_to_hub` uploads only a complete folder; a failed upload
leaves it in place.

The package: checkpoint.py reads the checkpoint, fitting.py fits model and tokenizer for
transformers, card.py writes the model card, folder.py writes the folder, hub.py uploads it,
fill.py is fill_mask.py's quick look; this module ties them together and holds the entry points.
"""

from convmodel.errors import UserError
from convmodel.export.card import card_metadata, model_card, training_summary
from convmodel.export.checkpoint import (
    find_module_class,
    find_tokenizer,
    load_matching_tokenizer,
    load_module,
    read_checkpoint,
    read_run_config,
)
from convmodel.export.fill import fill_mask, is_causal_lm
from convmodel.export.fitting import fit_tokenizer, prepare_model
from convmodel.export.folder import check_not_inside, check_output_dir, save_folder, write_folder
from convmodel.export.hub import PushError, check_repo_id, push_folder

__all__ = ["PushError", "check_repo_id", "export_model", "fill_mask", "fill_mask_main", "is_causal_lm", "main",
           "run_tool"]

DTYPES = ("float32", "float16", "bfloat16")


def export_model(
    ckpt_path: str,
    output_dir: str,
    config: str | None = None,
    tokenizer: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    language: str | list[str] | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
) -> str:
    """Export a convmodel checkpoint as a Hugging Face model folder, optionally pushed to the Hub.

    Args:
        ckpt_path: checkpoint written by trainer.py (e.g. runs/bert-tiny/checkpoints/last.ckpt).
        output_dir: folder to write: config.json, model.safetensors, the tokenizer, README.md.
        config: the run's YAML; used for model.class_path and data.tokenizer when the checkpoint
            lacks them, and for the trainer section of the model card.
        tokenizer: tokenizer folder to ship instead of the one recorded in the checkpoint (when
            that one has moved); it must have the same vocabulary.
        push_to_hub: upload the folder to this Hub repository (NAME or ORG/NAME), created if missing;
            the token comes from HF_TOKEN or `hf auth login`.
        private: create the Hub repository as private.
        commit_message: commit message of the upload.
        dtype: float32, float16 or bfloat16: the precision of the saved weights.
        overwrite: replace output_dir if it exists and is not empty.
        language: the model card's `language` metadata: ISO 639-1 codes of the training text
            (en, or a comma-separated list); left out of the card when not given.
        license: the model card's `license` metadata, a Hub license id (e.g. apache-2.0, mit);
            left out when not given: only the model's owner can choose it.
        datasets: the model card's `datasets` metadata: Hub dataset ids the model was trained on
            (comma-separated); left out when not given.

    Returns:
        output_dir.
    """
    ckpt_path, output_dir = str(ckpt_path), str(output_dir)
    dtype = str(dtype)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if push_to_hub is not None:
        push_to_hub = check_repo_id(str(push_to_hub))
    metadata = card_metadata(language, license, datasets)
    check_output_dir(output_dir, overwrite)
    checkpoint = read_checkpoint(ckpt_path)
    run_config = read_run_config(config) if config is not None else {}
    module_class = find_module_class(checkpoint, ckpt_path, run_config, config)
    tokenizer_path = find_tokenizer(checkpoint, ckpt_path, run_config, tokenizer)
    check_not_inside(output_dir, overwrite, {"--ckpt_path": ckpt_path, "the tokenizer": tokenizer_path})
    hf_tokenizer = load_matching_tokenizer(tokenizer_path, checkpoint, tokenizer is not None)

    module = load_module(module_class, ckpt_path, tokenizer_path, checkpoint)
    model = prepare_model(module, hf_tokenizer, dtype)
    fit_tokenizer(hf_tokenizer, module)
    summary = training_summary(checkpoint, run_config, f"{module_class.__module__}.{module_class.__name__}")
    print(f"Loaded {type(module).__name__} from {ckpt_path} (step {summary['global_step']}); "
          f"exporting {type(model).__name__} ({dtype})")

    write_folder(output_dir, overwrite, lambda folder: save_folder(
        folder, model, hf_tokenizer, model_card(model, module, summary, push_to_hub or output_dir, metadata)))
    print(f"Saved the model to {output_dir}")
    if push_to_hub is not None:
        message = commit_message or f"Export {type(model).__name__} at step {summary['global_step']} with convmodel"
        url = push_folder(output_dir, push_to_hub, private, str(message))
        print(f"Uploaded {output_dir} to {url}")
    return output_dir


# ---- entry points ----------------------------------------------------------------------------


def run_tool(function, argv: list[str] | None, name: str):
    """convmodel.tool_cli.run_tool with a failed upload (PushError) ending in exit 1."""
    from convmodel.tool_cli import run_tool as run_checked

    return run_checked(function, argv, name, failures={PushError: 1})


def main(argv: list[str] | None = None) -> None:
    """`export_model.py --ckpt_path P --output_dir DIR [...]` (see export_model)."""
    run_tool(export_model, argv, "export_model.py")


def fill_mask_main(argv: list[str] | None = None) -> None:
    """`fill_mask.py --model_dir DIR --text '... [MASK] ...' [--top_k 5] [--trust_remote_code]`: prints predictions."""

    def run(model_dir: str, text: str, top_k: int = 5, trust_remote_code: bool = False) -> None:
        """Print the model's top predictions for the [MASK] in text.

        Args:
            model_dir: folder written by export_model.py.
            text: a sentence with one [MASK].
            top_k: how many predictions to print.
            trust_remote_code: allow the folder's own model code (LeanALBERT exports).
        """
        predictions = fill_mask(model_dir, str(text), int(top_k), bool(trust_remote_code))
        print(text)
        for rank, prediction in enumerate(predictions, start=1):
            print(f"{rank:>3}. {prediction['token_str']!r:<16} {prediction['score']:.4f}  {prediction['sequence']}")

    run_tool(run, argv, "fill_mask.py")
