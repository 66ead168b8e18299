"""Writing the fine-tuned model as a Hugging Face folder, through convmodel.export's folder writer.

The folder is staged and renamed (convmodel.export.folder), holds config.json with
id2label/label2id, the weights, the tokenizer and a card with the dev/test scores, and loads in
`transformers.pipeline` without convmodel.
"""

from convmodel.export.folder import save_folder, write_folder
from convmodel.finetune.card import finetune_card


def export_finetuned(module, tokenizer, output_dir: str, overwrite: bool, scores: dict[str, dict[str, float]],
                     config: dict, metadata: dict | None = None) -> str:
    """Save `module.model` (the weights it holds now) and `tokenizer` to output_dir; output_dir."""
    model = module.model.eval()
    card = finetune_card(model, module.task, str(module.hparams.source), scores, config, output_dir, metadata)
    write_folder(output_dir, overwrite, lambda folder: save_folder(folder, model, tokenizer, card))
    return output_dir
