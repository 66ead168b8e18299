"""README.md's commands, run as printed, in a fresh copy of the repository after `make demo`.

A newcomer runs `make demo`, then types the README's blocks top to bottom; a command that fails
there (a missing --overwrite, an option that was renamed, a path the demo does not make) is a bug
even when every unit test passes. This test copies the working tree (tracked and new files, as
a fresh clone would have them), runs `make demo` in it with this test's virtual environment, then
runs the pipeline block and the export block of README.md, in order, in one bash session (as
in one terminal: the pipeline block's `. .venv/bin/activate` holds for the export block).

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
def test_readme_pipeline_and_export_blocks_run_as_printed_after_make_demo(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to copy the working tree from")
    fresh = tmp_path / "convmodel"
    fresh.mkdir()
    fresh_copy(fresh)
    # the Makefile's venv is this test's: `-o` keeps make from reinstalling it (the copy's setup.py is newer)
    (fresh / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    demo = run_bash("make -o .venv/.installed demo", fresh, "make demo", timeout=3000)
    assert "== 7/7" in demo

    marker = "== README: the export block =="
    script = runnable(readme_block(BLOCKS[0])) + f"echo '{marker}'\n" + runnable(readme_block(BLOCKS[1]))
    pipeline, export = run_bash(script, fresh, "README's pipeline and export blocks", timeout=3000).split(marker)
    assert "fit finished at step 1200" in pipeline  # the fit replaced make demo's run and trained it all
    assert "test/loss" in pipeline
    assert "nothing to do; raise --trainer.max_steps" in pipeline  # the resume of a finished run says so
    assert "nats below the frequency-only baseline" in pipeline

    model = fresh / "runs/bert-tiny/model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(model))
    candidates = re.findall(r"^\s+\d\. '.*'\s+[01]\.\d{4}\s+Return the", export, re.M)
    assert len(candidates) == 5, export[-3000:]  # fill_mask's five ranked words
    assert "If the file does not exist," in export
