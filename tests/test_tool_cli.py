"""The fire-based tools check their flags before they work, and print --help plainly.

Each tool is run the way a user runs it, with real inputs where the tool would otherwise do its
work (and write its output) before fire complained about the misspelled flag.
"""

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from convmodel.data.prepare import main as prepare_main
from convmodel.export import fill_mask_main
from convmodel.export import main as export_main
from convmodel.run_summary import main as show_metrics_main
from convmodel.tokenization import main as tokenizer_main
from convmodel.tool_cli import check_arguments, help_text


def generate_main(argv: list[str]) -> None:
    from convmodel.generation import generate_main as main

    main(argv)


REPO = Path(__file__).resolve().parents[1]
# script -> (entry point, a parameter that must be described in --help)
TOOLS = {
    "export_model.py": (export_main, "dtype"),
    "fill_mask.py": (fill_mask_main, "top_k"),
    "generate.py": (generate_main, "max_new_tokens"),
    "prepare_train_data.py": (prepare_main, "max_seq_len"),
    "train_tokenizer.py": (tokenizer_main, "vocab_size"),
    "show_metrics.py": (show_metrics_main, "min_below_baseline"),
}


def call(main, argv: list[str], monkeypatch) -> int:
    """The tool's exit status (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", ["tool", *argv])  # what the entry points would read without argv
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_misspelled_flag_of_train_tokenizer_trains_nothing(text_corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tok"
    code = call(tokenizer_main, ["--input", text_corpus["valid"], "--output_dir", str(out), "--vocab_siz", "400"],
                monkeypatch)
    assert code == 2
    assert "unknown option --vocab_siz; did you mean --vocab_size?" in one_error_line(capsys)
    assert not out.exists()


def test_misspelled_flag_of_prepare_train_data_writes_no_shards(text_corpus, tokenizer_dir, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "shards"
    code = call(prepare_main, ["--input", text_corpus["valid"], "--tokenizer", tokenizer_dir, "--output_dir", str(out),
                               "--max-seq-length", "32", "--num_workers", "1"], monkeypatch)
    assert code == 2
    assert "unknown option --max-seq-length; did you mean --max_seq_len?" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("tool", "argv", "closest"), [
    ("export_model.py", ["--ckpt_path", "last.ckpt", "--output_dir", "OUT", "--dtyp", "float16"], "--dtype"),
    ("fill_mask.py", ["--model_dir", "OUT", "--text", "a [MASK].", "--topk", "3"], "--top_k"),
    ("generate.py", ["--model_dir", "OUT", "--prompt", "The", "--max_tokens", "3"], "--max_new_tokens"),
    ("show_metrics.py", ["--logdir", "OUT", "--min_dorp", "0.2"], "--min_drop"),
])
def test_misspelled_flag_names_the_closest_one(tool, argv, closest, tmp_path, monkeypatch, capsys):
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in argv]
    assert call(TOOLS[tool][0], argv, monkeypatch) == 2
    line = one_error_line(capsys)
    assert f"did you mean {closest}?" in line and f"{tool} --help" in line
    assert not (tmp_path / "out").exists()


def test_missing_and_surplus_arguments_are_one_line_each(monkeypatch, capsys):
    assert call(export_main, ["--output_dir", "x"], monkeypatch) == 2
    assert one_error_line(capsys).startswith("error: --ckpt_path is required: checkpoint written by trainer.py")
    assert call(fill_mask_main, ["DIR", "TEXT", "3", "false", "extra"], monkeypatch) == 2
    assert "unexpected argument 'extra'" in one_error_line(capsys)
    assert call(show_metrics_main, ["--logdir", "x", "--nomin_drop", "--zzz"], monkeypatch) == 2
    assert "unknown option --zzz; the options are --logdir, --tag" in one_error_line(capsys)


def test_fire_spellings_are_accepted():
    def tool(input: str, output_dir: str, lowercase: bool = False, seed: int = 0) -> None:
        """A tool."""

    for argv in (["--input", "a", "--output-dir", "b"], ["--input=a", "--output_dir=b", "--lowercase"],
                 ["a", "b", "--nolowercase", "--seed", "-1"], ["--lowercase", "--input", "a", "b"]):
        check_arguments(tool, argv, "tool.py")


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_lists_every_option_with_its_description(tool, monkeypatch, capsys):
    main, option = TOOLS[tool]
    assert call(main, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {tool}") and f"  --{option}" in out
    lines = out.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  --")]
    for index in options:  # every option has a description line under it
        assert lines[index + 1].startswith("      ") and lines[index + 1].strip(), lines[index]
    assert call(main, ["-h"], monkeypatch) == 0 and capsys.readouterr().out == out


def test_help_in_a_terminal_opens_no_pager(tmp_path):
    """fire's help opened $PAGER (less) when stdout is a terminal; ours is printed."""
    marker = tmp_path / "pager-ran"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAGER": f"touch {marker}; cat > /dev/null"}
    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "trainer/export_model.py", "--help"], cwd=REPO, env=env,
                               stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=60) == 0
    assert b"--dtype" in output and b"float32, float16 or bfloat16" in output
    assert not marker.exists()


def test_help_text_joins_continued_descriptions():
    def tool(path: str, size: int = 3) -> None:
        """Do it.

        Args:
            path: where the
                input is.
            size: how many.

        Returns:
            nothing.
        """

    text = help_text(tool, "tool.py")
    assert "      where the input is. (required)" in text and "      how many. (default: 3)" in text
    assert "nothing" not in text


def test_aux_peer_help_shows_its_own_options_briefly(capsys):
    from convmodel.collaborative.aux_peer import main as aux_peer_main

    with pytest.raises(SystemExit) as info:
        aux_peer_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: run_aux_peer.py --config")
    for option in ("--store_checkpoints", "--checkpoint_every", "--push_to_hub", "--assist_in_averaging",
                   "--logdir"):
        assert f"\n  {option}" in out
    assert "trainer.py fit --help" in out and "--trainer.max_steps" not in out
    assert len(out.splitlines()) < 60
