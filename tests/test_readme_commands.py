"""README.md's commands and `make demo`, run as printed, in a fresh copy of the repository.

A newcomer runs `make demo`, then types the README's blocks top to bottom; a command that fails
there (a missing --overwrite, an option that was renamed, a path the demo does not make) is a bug
even when every unit test passes. This test copies the working tree (tracked and new files, as
a fresh clone would have them) and, with this test's virtual environment, runs README's pipeline
block, then the rest of the demo (`make demo-gpt2 demo-export`), then the export block. The
pipeline block is the demo's first half typed by hand (demo-text and demo-bert: the same corpus,
tokenizer, shards and BERT fit), so together they are the whole `make demo` with BERT trained once
(it was trained twice: half of this test's 7-14 minutes). The pipeline block must leave BERT as
far below the frequency-only baseline as demo-bert demands.

Only `tensorboard --logdir ...` lines are left out: they start a server that runs until Ctrl-C.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = ("## The pipeline, step by step", "## Export to Hugging Face")
SERVER = re.compile(r"^\s*tensorboard\s")


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"README.md has no bash block after {heading!r}"
    return match.group(1)


def runnable(block: str) -> str:
    """The block as a bash script that stops at the first failing command, servers left out."""
    lines = [line for line in block.splitlines() if not SERVER.match(line)]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def fresh_copy(destination: Path) -> None:
    """The repository's files as a clone of the working tree would have them (no runs/, work/, .venv)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_bash(script: str, cwd: Path, what: str, timeout: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("VIRTUAL_ENV", None)
    # one stream, in the order a terminal shows it (the trainer writes its notes to stderr)
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stdout[-6000:]}"
    return result.stdout


@pytest.mark.timeout(3600)  # a hang guard: ~10 minutes on 2 idle cores
def test_readme_pipeline_block_the_rest_of_make_demo_and_the_export_block_run_as_printed(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy the working tree from")
    fresh = tmp_path / "convmodel"
    fresh.mkdir()
    fresh_copy(fresh)
    (fresh / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    pipeline = run_bash(runnable(readme_block(BLOCKS[0])), fresh, "README's pipeline block", timeout=3000)
    assert "fit finished at step 1200" in pipeline
    assert "test/loss" in pipeline
    assert "nothing to do; raise --trainer.max_steps" in pipeline  # the resume of a finished run says so
    below = re.search(r"([\d.]+) nats below the frequency-only baseline", pipeline)
    assert below and float(below.group(1)) >= 0.5, pipeline[-3000:]  # demo-bert's --min_below_baseline
    # the makefile's venv is this test's: `-o` keeps make from reinstalling it (the copy's setup.py is newer)
    demo = run_bash("make -o .venv/.installed demo-gpt2 demo-export", fresh, "the rest of make demo", timeout=3000)
    assert "== 5/7" in demo and "== 7/7" in demo
    export = run_bash(". .venv/bin/activate\n" + runnable(readme_block(BLOCKS[1])), fresh, "README's export block",
                      timeout=600)

    model = fresh / "runs/bert-tiny/model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(model))
    candidates = re.findall(r"^\s+\d\. '.*'\s+[01]\.\d{4}\s+Return the", export, re.M)
    assert len(candidates) == 5, export[-3000:]  # fill_mask's five ranked words
    assert "If the file does not exist," in export
