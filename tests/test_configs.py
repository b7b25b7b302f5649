"""Every shipped config parses (with --print_config, no data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmamba.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: qmamba.training.QMambaIQA" in printed


def test_task_configs_share_one_recipe():
    """The eight per-dataset configs differ only in their data section, logger name and crop counts."""
    import yaml

    tasks = sorted(CONFIG_DIR.glob("task/*.yaml"))
    assert {p.stem for p in tasks} == {"koniq10k", "livec", "kadid10k", "spaq", "flive", "tid2013", "live", "csiq"}
    loaded = [yaml.safe_load(p.read_text()) for p in tasks]
    for config in loaded:
        assert config["model"] == loaded[0]["model"]
        assert {k: v for k, v in config["trainer"].items() if k != "logger"} == {
            k: v for k, v in loaded[0]["trainer"].items() if k != "logger"}
