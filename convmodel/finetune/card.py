"""The model card (README.md) of a fine-tuned model: task, labels, dev/test scores, how to use it.

The front matter follows the pretraining card's (convmodel.export.card): library, pipeline tag
and tags for the Hub; the scores are the best checkpoint's, as finetune() measured them.
"""

import os
from typing import Any

PIPELINE_TAGS = {"token_classification": "token-classification", "sequence_classification": "text-classification",
                 "regression": "text-classification"}


def finetune_card(model, task: str, source: str, scores: dict[str, dict[str, float]], config: dict,
                  name: str, metadata: dict[str, Any] | None = None) -> str:
    """README.md text for the exported folder `name`."""
    import yaml

    tag = PIPELINE_TAGS[task]
    front = yaml.safe_dump({**(metadata or {}), "library_name": "transformers", "pipeline_tag": tag,
                            "tags": ["convmodel", model.config.model_type, task]}, sort_keys=False,
                           allow_unicode=True)
    labels = ", ".join(f"`{v}`" for _, v in sorted(model.config.id2label.items())) if task != "regression" \
        else "one number (regression)"
    rows = sorted({metric for split in scores.values() for metric in split})
    table = "| metric | " + " | ".join(scores) + " |\n|---|" + "---|" * len(scores) + "\n"
    for metric in rows:
        table += f"| {metric} | " + " | ".join(
            f"{split[metric]:.4f}" if metric in split else "" for split in scores.values()) + " |\n"
    example = ('"Ada Lovelace lived in London."' if task == "token_classification" else '"A great little film."')
    config_yaml = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    return f"""---
{front}---

# {os.path.basename(os.path.normpath(name))}

A {type(model).__name__} ({model.num_parameters():,} parameters) fine-tuned with convmodel for
{task.replace('_', ' ')}, starting from `{source}`.

Labels: {labels}.

## Scores (the best checkpoint by the dev metric)

{table}
## How to use

```python
from transformers import pipeline

classify = pipeline("{tag}", model="{name}")
print(classify({example}))
```

## Fine-tuning config

```yaml
{config_yaml}```
"""
