"""The `qmamba` command end to end: fit, then test and predict from the saved checkpoint in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid

import qmamba
from qmamba.cli import COMMANDS, main

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


def _qmamba(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "qmamba", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_fit_fast_dev_run_trains_one_step_and_logs_plain_progress_lines(workdir, capsys):
    """Outside a terminal (here pytest's capture, or a CI log) progress comes as whole lines, not bar redraws."""
    root, config = workdir
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "true"])
    err = capsys.readouterr().err
    assert "epoch 0 done in" in err and "train/loss=" in err
    assert "\r" not in err
    assert not (root / "runs" / "tiny" / "checkpoints").exists()  # fast_dev_run writes no checkpoint


@pytest.mark.slow
def test_fit_then_test_and_predict_in_fresh_processes(workdir):
    root, config = workdir
    main(["fit", "--config", str(config), "--trainer.max_epochs", "2"])
    run = root / "runs" / "tiny"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    splits = pd.read_csv(run / "splits" / "tiny_kadid.csv")
    refs = splits.assign(ref=splits["name"].str[:3]).groupby("ref")["split"].nunique()
    assert (refs == 1).all()  # content-disjoint: every reference in exactly one split

    result = _qmamba("test", "--config", str(run / "config.yaml"), "--ckpt_path",
                     str(run / "checkpoints" / "best.ckpt"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SRCC" in result.stdout and "tiny_kadid" in result.stdout
    assert "DataLoader 0" not in result.stdout  # qmamba's table alone, not Lightning's as well
    results = json.loads((run / "test_results.json").read_text())["results"]["tiny_kadid"]
    assert {"srcc", "plcc", "krcc", "rmse", "plcc_logistic"} <= set(results)

    result = _qmamba("predict", "--config", str(run / "config.yaml"), "--ckpt_path", "last", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "writing predictions.csv into the run folder" in result.stderr  # a writer by default, and said so
    predictions = pd.read_csv(run / "predictions.csv")
    assert len(predictions) == results["images"] and predictions["score"].between(-5, 10).all()


def test_config_error_is_a_message_not_a_traceback(workdir, capsys):
    _, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.init_args.batchsize", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qmamba: error: Parser key \"data\": Problem with given class_path 'qmamba.data.IQADataModule': "
                   "Option 'batchsize' is not accepted (`qmamba fit --help` lists the options)"]


def test_missing_dataset_folder_is_reported(workdir, capsys):
    root, config = workdir
    config.write_text(config.read_text().replace(str(root / "kadid"), str(root / "nowhere")))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "data/README.md" in err


def test_checkpoint_alias_without_a_run_is_reported(workdir, capsys):
    _, config = workdir
    with pytest.raises(SystemExit):
        main(["test", "--config", str(config), "--ckpt_path", "best"])
    assert "best.ckpt does not exist" in capsys.readouterr().err


def test_tensorboard_has_metrics_and_scatter(workdir):
    root, config = workdir
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "runs" / "tiny"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"val/tiny_kadid/srcc", "val/tiny_kadid/plcc", "val/srcc", "train/loss"} <= set(tags["scalars"])
    assert "val/tiny_kadid/scatter" in tags["images"]


def test_help_lists_every_command_and_version_is_the_package_version():
    """``python -m qmamba`` is the console script; --help names each command of the table, and neither imports
    Lightning (they must answer instantly)."""
    code = ("import sys; from qmamba.cli import main\n"
            "for args in (['--help'], ['--version']):\n"
            "    try: main(args)\n"
            "    except SystemExit as e: assert e.code == 0, e.code\n"
            "assert 'lightning' not in sys.modules and 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(f"  {name} " in result.stdout for name in COMMANDS), result.stdout
    assert result.stdout.strip().endswith(f"qmamba {qmamba.__version__}")
    module = subprocess.run([sys.executable, "-m", "qmamba", "--version"], capture_output=True, text=True, timeout=120)
    assert module.returncode == 0 and module.stdout.strip() == f"qmamba {qmamba.__version__}"


def test_unknown_command_and_no_command_name_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian", "--config", "x.yaml"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown command 'trian'" in err and "  fit " in err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "commands:" in capsys.readouterr().out


def test_no_module_imports_the_command_table_back():
    """Commands are leaves of ``qmamba.cli``: a module importing it back would make a hidden import cycle."""
    package = Path(qmamba.__file__).parent
    entry_points = {package / "cli.py", package / "__main__.py"}
    importers = [str(path.relative_to(package)) for path in package.rglob("*.py") if path not in entry_points
                 and any(f in path.read_text() for f in ("qmamba.cli import", "import qmamba.cli"))]
    assert importers == []


def test_fit_resumes_from_last_checkpoint(workdir):
    root, config = workdir
    main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    last = root / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)["global_step"]
    assert first > 0
    main(["fit", "--config", str(root / "runs" / "tiny" / "config.yaml"), "--trainer.max_epochs", "2",
          "--ckpt_path", str(last)])
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 2 * first  # one more epoch on top of the restored one, not a restart
    assert "qmamba" in resumed and resumed["qmamba"]["datasets"] == ["tiny_kadid"]


@pytest.mark.parametrize("val_every", [1, 2])
def test_last_checkpoint_follows_every_epoch_not_only_the_best(workdir, val_every):
    """Lightning >= 2.6 writes save_last's last.ckpt only with a new best; a resume would then lose every epoch after
    the best one. With lr 0 the validation SRCC never improves after its first value, yet last.ckpt must be the
    final epoch, also when validation runs every other epoch."""
    root, config = workdir
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch",
          str(val_every), "--model.init_args.optimizer.init_args.lr", "0.0"])
    checkpoints = root / "runs" / "tiny" / "checkpoints"
    best = torch.load(checkpoints / "best.ckpt", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert best["epoch"] == val_every - 1  # the first validation
    assert last["epoch"] == 2 and last["global_step"] == 3 * best["global_step"] // val_every


@pytest.mark.slow
def test_benchmark_runs_n_splits_summarises_and_skips_finished_ones(workdir, capsys):
    root, config = workdir
    main(["benchmark", "--config", str(config), "--splits", "2", "--out", "bench", "--", "--trainer.max_epochs", "1"])
    out = root / "bench"
    rows = pd.read_csv(out / "results.csv")
    assert rows["split"].tolist() == [0, 1] and (rows["dataset"] == "tiny_kadid").all()
    split_files = [pd.read_csv(out / f"split_0{i}" / "splits" / "tiny_kadid.csv") for i in (0, 1)]
    tests = [set(s.loc[s["split"] == "test", "name"]) for s in split_files]
    assert tests[0] != tests[1]  # split_seed follows the split index
    summary = json.loads((out / "summary.json").read_text())["summary"]["tiny_kadid"]
    assert summary["srcc"]["splits"] == 2
    assert summary["srcc"]["median"] == pytest.approx(rows["srcc"].median())
    assert "median" in capsys.readouterr().out

    (out / "split_01" / "test_results.json").unlink()  # as if split 1 was interrupted after training
    stamp = (out / "split_00" / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    main(["benchmark", "--config", str(config), "--splits", "2", "--out", "bench", "--", "--trainer.max_epochs", "1"])
    assert (out / "split_00" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == stamp  # finished split skipped
    assert (out / "split_01" / "test_results.json").is_file()
    assert len(pd.read_csv(out / "results.csv")) == 2


@pytest.mark.slow
def test_two_process_ddp_universal_fit_then_test(tmp_path):
    """A real 2-process DDP run (gloo, CPU) over two datasets through the CLI; every test image scored once."""
    from iqa_fixtures import make_koniq

    make_kadid(tmp_path / "kadid")
    make_koniq(tmp_path / "koniq", n=30)
    config = tmp_path / "universal.yaml"
    config.write_text(CONF.read_text().replace(
        "      - {name: kadid10k, root: KADID_ROOT, label: tiny_kadid}\n",
        f"      - {{name: kadid10k, root: {tmp_path / 'kadid'}, label: tiny_kadid}}\n"
        f"      - {{name: koniq10k, root: {tmp_path / 'koniq'}, label: tiny_koniq}}\n"))
    result = _qmamba("fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.max_epochs", "2", "--data.init_args.sampling", "balanced",
                     "--model.init_args.backbone_args", "{scan_backend: cpu}", cwd=tmp_path)  # the fused CPU kernel
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert "selective scan on cpu: cpu (qmamba's fused numba kernel)" in result.stdout + result.stderr
    run = tmp_path / "runs" / "tiny"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    tags = set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"val/tiny_kadid/srcc", "val/tiny_koniq/srcc", "val/srcc"} <= tags

    result = _qmamba("test", "--config", str(run / "config.yaml"), "--ckpt_path", "best", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "test_results.json").read_text())["results"]
    splits = {name: pd.read_csv(run / "splits" / f"{name}.csv") for name in ("tiny_kadid", "tiny_koniq")}
    for name, table in splits.items():  # sharded without padding: the gathered count is the test split's size
        assert results[name]["images"] == (table["split"] == "test").sum()


def test_without_ray_the_ray_engine_is_one_line_naming_the_extra(trained, tmp_path, monkeypatch, capsys):
    """Ray is an extra: without it, --engine ray says how to install it."""
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds where Ray is not installed: ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--engine", "ray", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"),
              str(trained[0] / "kadid" / "images"), "-o", str(tmp_path / "scores")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == 'qmamba: error: the Ray engine needs Ray Data: pip install "qmamba[ray]"'
    assert not (tmp_path / "scores").exists()
