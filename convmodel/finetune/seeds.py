"""The seeds' protocol: the same fine-tuning under N seeds, summarised as mean ± std per metric.

Fine-tuning scores of small models move by points between seeds; one run's number says little.
`--num_seeds N` runs seeds s, s+1, ..., s+N-1 (s = seed_everything), each a full run with its own
log folder and exported model, and writes seeds.md (a markdown table) and seeds.json beside the
runs. std is the sample standard deviation (n - 1); with one seed it is 0.
"""

import json
import math
import os


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {metric: {mean, std, n}}} over the runs' scores (a metric some runs lack uses the others)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for split in dict.fromkeys(split for run in runs for split in run["scores"]):
        metrics = dict.fromkeys(m for run in runs for m in run["scores"].get(split, {}))
        summary[split] = {}
        for metric in metrics:
            values = [run["scores"][split][metric] for run in runs if metric in run["scores"].get(split, {})]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[split][metric] = {"mean": mean, "std": std, "n": len(values)}
    return summary


def markdown_table(summary: dict, seeds: list[int]) -> str:
    """One row per metric, one column per split: `mean ± std`."""
    splits = list(summary)
    metrics = list(dict.fromkeys(m for split in splits for m in summary[split]))
    lines = [f"Seeds {', '.join(map(str, seeds))} (mean ± sample std over {len(seeds)} runs)", "",
             "| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for metric in metrics:
        cells = [f"{summary[s][metric]['mean']:.4f} ± {summary[s][metric]['std']:.4f}" if metric in summary[s] else ""
                 for s in splits]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_seed_summary(folder: str, runs: list[dict], seeds: list[int]) -> tuple[str, str]:
    """seeds.md and seeds.json in `folder`; their paths."""
    summary = summarise(runs)
    os.makedirs(folder, exist_ok=True)
    md, js = os.path.join(folder, "seeds.md"), os.path.join(folder, "seeds.json")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown_table(summary, seeds))
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"seeds": seeds, "summary": summary, "runs": runs}, f, indent=2)
    return md, js
