"""The shipped configs: every run they describe parses, data files layer over one recipe, and the schedule length
follows the trainer's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qmamba.cli import main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPE, DEMO = CONFIG_DIR / "recipe.yaml", CONFIG_DIR / "demo.yaml"
TASKS = sorted(CONFIG_DIR.glob("task/*.yaml"))
RUNS = [(DEMO,), *((DEMO, p) for p in sorted(CONFIG_DIR.glob("demo/*.yaml"))), (RECIPE, CONFIG_DIR / "universal.yaml"),
        *((RECIPE, p) for p in TASKS)]


def _printed(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _layers(configs: tuple[Path, ...]) -> list[str]:
    return [arg for config in configs for arg in ("--config", str(config))]


def test_every_config_file_belongs_to_a_run():
    assert {p for run in RUNS for p in run} == set(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("configs", RUNS, ids=lambda run: "+".join(p.stem for p in run))
def test_run_config_parses(configs, capsys):
    config = _printed(capsys, *_layers(configs))
    assert config["model"]["class_path"] == "qmamba.training.QMambaIQA"
    datasets = config["data"]["init_args"]["datasets"]
    assert datasets and all(Path(d["root"]).parts[0] == "data" for d in datasets)
    run_name = config["trainer"]["logger"]["init_args"]["name"]
    assert run_name == ("demo" if configs == (DEMO,) else configs[-1].stem)  # each run writes its own folder


def test_task_files_hold_only_their_data_and_run_name():
    """The recipe is written once: a task file adds its datasets (and crop counts), never trainer or model settings."""
    assert {p.stem for p in TASKS} == {"koniq10k", "livec", "kadid10k", "spaq", "flive", "tid2013", "live", "csiq"}
    for path in TASKS:
        config = yaml.safe_load(path.read_text())
        assert set(config) == {"trainer", "data"}, path.name
        assert config["trainer"] == {"logger": {"init_args": {"name": path.stem}}}, path.name
        assert {d["name"] for d in config["data"]["init_args"]["datasets"]} == {path.stem}


def test_a_task_config_gets_the_recipe_and_overrides_only_data(capsys):
    recipe = _printed(capsys, "--config", str(RECIPE), "--data.init_args.datasets", "[{name: livec}]")
    livec = _printed(capsys, "--config", str(RECIPE), "--config", str(CONFIG_DIR / "task" / "livec.yaml"))
    assert livec["model"] == recipe["model"] and livec["seed_everything"] == recipe["seed_everything"]
    assert livec["trainer"]["max_epochs"] == 9 and livec["trainer"]["precision"] == "bf16-mixed"
    data = livec["data"]["init_args"]
    assert (data["batch_size"], data["train_repeats"], data["eval_crops"], data["crop_size"]) == (16, 10, 10, 224)


def test_schedule_length_follows_trainer_max_epochs(capsys):
    """One number sets the run length: the cosine schedule reaches its floor at the trainer's last epoch."""
    from qmamba.data import IQADataModule
    from qmamba.training import QMambaIQA
    from qmamba.training.cli import QMambaCLI

    cli = QMambaCLI(QMambaIQA, IQADataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                    auto_configure_optimizers=False,
                    args=["--config", str(DEMO), "--trainer.max_epochs", "7", "--trainer.logger", "false"])
    scheduler = cli.model.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](epoch) for epoch in range(9)]
    assert factors[7] == pytest.approx(0.01) and factors[6] > 0.01  # min_factor reached exactly at epoch 7
    assert factors[8] == factors[7]


def test_a_layered_dataset_list_replaces_the_base_list_whole(capsys, tmp_path):
    """jsonargparse merged a layer's list of dataclasses item by item into the base's: an entry without a root or a
    label inherited the base entry's (a table of one's own over the demo config read the demo's folder)."""
    layer = tmp_path / "mine.yaml"
    layer.write_text("data:\n  init_args:\n    datasets:\n      - {name: koniq10k, root: data/mine}\n")
    base = ("--config", str(DEMO), "--config", str(CONFIG_DIR / "demo" / "demo_kadid.yaml"))
    config = _printed(capsys, *base, "--config", str(layer))
    assert config["data"]["init_args"]["datasets"] == [{"name": "koniq10k", "root": "data/mine"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    datasets:\n      - {name: koniq10k, folder: data/mine}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "datasets[0]: unknown keys ['folder']; its keys are name, root, label" in capsys.readouterr().err
