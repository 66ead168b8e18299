"""Every shipped configs/finetune/*.yaml parses through the real CLI, and --print_config round-trips."""

from pathlib import Path

import pytest
import yaml

from convmodel.finetune.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "finetune").glob("*.yaml"))


def print_config(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_parses_and_round_trips(config, tmp_path, capsys):
    printed = print_config(["--config", str(config), "--model.source", "runs/bert-tiny/model"], capsys)
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["source"] == "runs/bert-tiny/model"
    assert parsed["early_stopping"]["monitor"] == parsed["checkpoint"]["monitor"] == "val/score"
    assert (parsed["early_stopping"]["patience"], parsed["early_stopping"]["min_delta"]) == (3, 0.01)
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed, encoding="utf-8")
    assert yaml.safe_load(print_config(["--config", str(saved)], capsys)) == parsed


def test_configs_cover_every_task():
    tasks = {yaml.safe_load(c.read_text())["data"]["task"] for c in CONFIGS}
    assert tasks == {"token_classification", "sequence_classification", "regression"}
