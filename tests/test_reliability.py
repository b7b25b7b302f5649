"""Nothing lost, nothing silently wrong: each case of what can go wrong, and what qmamba does about it (the
scoring cases are tested in tests/test_scoring.py).

| case | what happens |
| --- | --- |
| fit into a folder that holds a finished run | refused on one line (resume, new name or --overwrite); files untouched |
| fit into a folder left by a run stopped before its first checkpoint | refused without offering a resume |
| fit --overwrite true into it | the earlier run's files are removed first; the saved config does not repeat the flag |
| fit into a folder another live run holds | refused, naming that process |
| a lock left by a killed run | taken over with a warning |
| temporary files left by a killed atomic write | removed when the next fit starts there |
| a KonIQ split file missing a row, or with an unknown set name, under protocol: auto | an error naming the rows |
| the same with protocol: random | the seeded random split, as asked |
| the README's GPU command on a machine without a GPU | one line: run on a GPU, or --trainer.accelerator cpu |
| batch_size, crop_size, eval_crops or train_repeats below 1 | one line naming the key, exit 2, before any image |
| an unknown backbone or dataset name | one line listing the names there are |
| qmamba test with a missing, empty, truncated, random-bytes or plain-state-dict checkpoint | one line saying which |
| qmamba predict without a prediction writer | writes predictions.csv into the run folder and says so |
| a run killed (SIGKILL) at any point, resumed with --ckpt_path last | the uninterrupted run's weights, bit for bit |
| SIGTERM to a fit | exit 143, a line naming the epoch and step and the checkpoint that resumes it |
| a YAML-bomb config, one nested 5,000 deep, one of 2 MB (fit, data check, benchmark, transfer) | one line, exit 2 |
| a label file in Latin-1, empty, or with a header only | one line naming the file and the fix |
| a label file in UTF-16 with its byte-order mark | read (the encoding is unambiguous) |
| an image above Pillow's decompression-bomb limit | reported with every other image problem, not a stop |
| a label far off the dataset's scale (47 or -3 on KADID's 1-5) | an error naming the file and value |
| a label slightly off it (5.3; LIVE's realigned DMOS by design) | kept, with a warning |
| relabelled data on another scale | score_range: [low, high] declares it, and training normalises with it |
| KonIQ's raw MOS (options: {score: MOS}) | trained on 1-5, not squeezed into 0.01-0.05 of the 0-100 scale |
| qmamba score -o to a folder or a path under a file; --crops 0, --batch-size 0 | refused before any image |
| names with commas on stdout; symlinked folders, link loops, dangling links | quoted CSV; followed once; reported |
| predictions outside the training scale | flagged in the output, or clipped with --clip |
| SIGINT / SIGTERM while scoring | the batch finishes; <output>.partial keeps every score; exit 130 / 143 |
| export from a fresh process | works (scan tables are built before tracing): tests/test_scoring.py |
| trainer.devices 0, a negative lr, a batch_size larger than the training set | one line naming the option, exit 2 |
| a fused optimizer with mixed precision and gradient_clip_val (GPU) | one line before the run: unfuse or don't clip |
| a run whose loss or predictions become NaN (lr 1e6); testing NaN weights | one line: where, and the fix |
| resuming a checkpoint with a smaller --trainer.max_epochs | one line: raise it, or test the checkpoint |
| test / fit --ckpt_path with a checkpoint of another architecture | one line naming both backbones and a key |
| export into a folder that cannot be written | one line before the export runs |
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from iqa_fixtures import make_kadid, make_koniq

from qmamba.cli import main
from qmamba.data import DatasetConfig, DatasetError, IQADataModule, load_dataset


@pytest.fixture
def finished(workdir):
    """A finished tiny run in runs/tiny (cwd = the work folder) and its config."""
    tmp_path, config = workdir
    main(["fit", "--config", str(config)])
    return tmp_path / "runs" / "tiny", config


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qmamba: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_fit_refuses_a_folder_that_holds_a_finished_run(finished, capsys):
    run, config = finished
    before = {p.name: _digest(p) for p in (run / "checkpoints").glob("*.ckpt")}
    saved_config = _digest(run / "config.yaml")
    for args in (["--config", str(config)], ["--config", str(run / "config.yaml")]):  # README's resume, minus ckpt
        message = _refused(capsys, "fit", *args)
        assert "already holds a run" in message and "--ckpt_path last" in message and "--overwrite true" in message
    assert {p.name: _digest(p) for p in (run / "checkpoints").glob("*.ckpt")} == before
    assert _digest(run / "config.yaml") == saved_config
    assert not (run / ".qmamba.lock").exists()  # the refused fit released its lock


def test_a_run_stopped_before_its_first_checkpoint_is_not_offered_a_resume(workdir, capsys):
    tmp_path, config = workdir
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.read_text())  # what a fit killed in its first epoch leaves
    message = _refused(capsys, "fit", "--config", str(config))
    assert "it has no checkpoints/last.ckpt to resume from (it stopped before its first epoch ended)" in message
    assert "--ckpt_path last" not in message and message.endswith("or replace it with --overwrite true")
    main(["fit", "--config", str(config), "--overwrite", "true"])  # what the message offers works
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_overwrite_replaces_the_run_and_is_not_saved(finished, capsys):
    run, config = finished
    stale_event = next(run.glob("events.out.tfevents.*"))
    main(["fit", "--config", str(config), "--overwrite", "true"])
    assert not stale_event.exists() and (run / "checkpoints" / "best.ckpt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["overwrite"] is False
    _refused(capsys, "fit", "--config", str(run / "config.yaml"))  # reusing the saved config does not overwrite


def test_sigterm_stops_a_fit_with_143_saying_where_and_last_resumes_it(workdir, monkeypatch, capsys, request):
    """SIGTERM to qmamba fit exited 0; the only trace was Lightning's "Received SIGTERM: 15"."""
    from qmamba.training import QMambaIQA

    tmp_path, config = workdir
    start_batch = QMambaIQA.on_train_batch_start

    def terminated_in_epoch_one(self, batch, batch_idx):  # noqa: ANN001, ANN202
        if self.current_epoch == 1 and batch_idx == 0:
            # Lightning's handler, or the test would end the test process itself
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return start_batch(self, batch, batch_idx)

    monkeypatch.setattr(QMambaIQA, "on_train_batch_start", terminated_in_epoch_one)
    # as in a new process: an in-process Ray test leaves ray.init's SIGTERM handler (sys.exit(15)), which Lightning
    # would call after its own
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    with pytest.raises(SystemExit) as exit_info:  # validating every second epoch: see the epoch lines below
        main(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2"])
    assert exit_info.value.code == 143
    last = Path("runs/tiny/checkpoints/last.ckpt")
    err = capsys.readouterr().err
    assert re.search(r"qmamba fit: SIGTERM in epoch 1 \(step \d+\): stopped; resume with --ckpt_path last \(from "
                     r"\S*runs/tiny/checkpoints/last.ckpt, the end of the last whole epoch\)", err), err
    assert torch.load(last)["epoch"] == 0
    monkeypatch.setattr(QMambaIQA, "on_train_batch_start", start_batch)
    main(["fit", "--config", "runs/tiny/config.yaml", "--ckpt_path", "last",  # what the message offers works
          "--trainer.enable_progress_bar", "true"])  # a log's progress: whole lines
    assert torch.load(last)["epoch"] == 2
    # the epoch lines say when the validation metrics they repeat were measured (they read as this epoch's)
    lines = [line for line in capsys.readouterr().err.splitlines() if " done in " in line]
    assert lines[0].startswith("epoch 1 done in ") and "val/srcc=" in lines[0] and "validated after" not in lines[0]
    assert lines[1].startswith("epoch 2 done in ") and re.search(r"val/srcc=.*\(validated after epoch 1\)$", lines[1])


@pytest.mark.slow  # 18 s under make test on 2 cores of a Zen 3 EPYC (twelve commands in-process)
def test_yaml_bombs_deep_and_huge_configs_are_one_line_before_any_parsing(tmp_path, monkeypatch, capsys):
    """Anchors expanding to 10^9 nodes in a benchmark or transfer config grew past 4 GB with no message."""
    monkeypatch.chdir(tmp_path)
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    configs = {"bomb.yaml": (laughs, "its aliases (*name) expand to 4.9e+08 values"),
               "deep.yaml": ("[" * 5000 + "]" * 5000, "nests its values too deep for a config"),
               "huge.yaml": ("# padding\n" * 200_000, "holds 2000000 bytes, more than the 1 MB a config can")}
    for name, (text, message) in configs.items():
        Path(name).write_text(text)
        for command in (["fit", "--config", name], ["data", "check", "--config", name],
                        ["benchmark", "--config", "configs.yaml", "--splits", "1", "--", f"--data={name}"],
                        ["transfer", "--source", "best.ckpt", "--config", name]):
            with pytest.raises(SystemExit) as exit_info:
                main(command)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, (command, err)
    assert not Path("runs").exists()


def test_resume_is_allowed_into_its_own_folder(finished):
    run, _ = finished
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(workdir, capsys, caplog):
    tmp_path, config = workdir
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".qmamba.lock").write_text(f"{other.pid} {socket.gethostname()}")
        message = _refused(capsys, "fit", "--config", str(config))
        assert f"in use by another qmamba run (pid {other.pid}" in message
    finally:
        other.kill()
        other.wait()
    (run / "checkpoints").mkdir()
    leftover = run / "checkpoints" / ".best.ckpt.k3j2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    main(["fit", "--config", str(config)])  # the lock's process is gone now: stale
    assert "taking over a stale lock" in caplog.text
    assert not leftover.exists() and (run / "checkpoints" / "best.ckpt").is_file()
    assert not (run / ".qmamba.lock").exists()


@pytest.mark.parametrize("damage", ["missing row", "renamed set"])
def test_a_damaged_official_split_is_an_error_not_a_random_split(tmp_path, damage):
    make_koniq(tmp_path, n=20)
    sets_file = tmp_path / "koniq10k_distributions_sets.csv"
    sets = pd.read_csv(sets_file)
    if damage == "missing row":
        sets = sets.drop(index=3)
    else:
        sets["set"] = sets["set"].replace("training", "train")
    sets.to_csv(sets_file, index=False)

    def data(protocol: str) -> IQADataModule:
        return IQADataModule([DatasetConfig("koniq10k", str(tmp_path), protocol=protocol)], batch_size=4,
                             crop_size=32, eval_crops=1, num_workers=0, check_images="off")

    with pytest.raises(DatasetError, match="koniq10k: the official split does not label") as error:
        data("auto").setup()
    assert ("1003.jpg: no entry" if damage == "missing row" else "1002.jpg: unknown set 'train'") in str(error.value)
    assert "protocol: random" in str(error.value)
    random = data("random")
    random.setup()
    assert sum(len(d) for name in ("train", "val", "test") for d in random.split(name)) == 20


@pytest.mark.parametrize("bad, far", [(47.0, True), (-3.0, True), (5.3, False)])
def test_labels_off_the_dataset_scale_are_named(tmp_path, bad, far, caplog):
    """KADID's scale is 1-5: 47 or -3 is a broken label file, 5.3 a rounding artefact worth a warning."""
    make_kadid(tmp_path, refs=2)
    labels = pd.read_csv(tmp_path / "dmos.csv")
    labels.loc[4, "dmos"] = bad
    labels.to_csv(tmp_path / "dmos.csv", index=False)
    if far:
        with pytest.raises(DatasetError, match=f"1 of 10 scores lie far outside its 1-5 scale.*{bad:g}\\)"):
            load_dataset("kadid10k", tmp_path)
        table = load_dataset("kadid10k", tmp_path, score_range=(-5.0, 50.0))  # relabelled data: declared scale
        assert table.attrs["score_range"] == (-5.0, 50.0)
    else:
        load_dataset("kadid10k", tmp_path)
        assert "1 scores lie slightly outside its 1-5 scale" in caplog.text


def test_koniq_raw_mos_option_trains_on_its_own_1_to_5_scale(tmp_path):
    make_koniq(tmp_path, n=10)
    data = IQADataModule([DatasetConfig("koniq10k", str(tmp_path), options={"score": "MOS"})], batch_size=4,
                         crop_size=32, eval_crops=1, num_workers=0, check_images="off")
    data.setup()
    scale = data.spec.scales[0]
    assert (scale.low, scale.high) == (1.0, 5.0)
    targets = [t for d in data.split("train") for t in d.targets]
    assert min(targets) >= 0.0 and max(targets) > 0.5  # unit targets span the range, not 0.01-0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_gpu_recipe_on_a_machine_without_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(configs / "recipe.yaml"), "--config", str(configs / "universal.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("qmamba: error: the config asks for trainer.accelerator: gpu") and "cpu" in err[-1]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def _fit_args(config: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--trainer.max_epochs", "4", "--trainer.logger.init_args.name", name,
            "--data.init_args.train_repeats", "6", "--model.init_args.head_dropout", "0.3",
            "--model.init_args.backbone_args", "{drop_path_rate: 0.2}",
            "--model.init_args.scheduler", "qmamba.training.WarmupCosine", *extra]


@pytest.mark.slow
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_weights(workdir, forked_qmamba):
    """Crops, flips, dropout and drop-path come from (seed, epoch, position): SIGKILL anywhere + --ckpt_path last
    ends bit-identical to a run that was never interrupted (CPU, deterministic kernels). The uninterrupted run is a
    new `qmamba` process; the killed and resumed ones are forked from one that has imported Lightning
    (tests/forked.py), as each would spend ~9 s importing it, so they must also end on a new process's weights."""
    tmp_path, config = workdir
    whole = subprocess.run([sys.executable, "-m", "qmamba", *_fit_args(config, "whole")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = torch.load(tmp_path / "runs" / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    qmamba = forked_qmamba("fit")
    for attempt, delay in enumerate((0.0, 0.4, 0.9)):
        name = f"killed{attempt}"
        process = qmamba.popen(_fit_args(config, name), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        last = tmp_path / "runs" / name / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        stopped_at = torch.load(last, weights_only=True)["epoch"]
        assert stopped_at < 3, "the run finished before it could be killed; make its epochs longer"
        resumed = qmamba.run(_fit_args(config, name, "--ckpt_path", "last"), cwd=tmp_path, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        final = torch.load(last, weights_only=True)
        assert final["epoch"] == expected["epoch"] and final["global_step"] == expected["global_step"]
        for key, value in expected["state_dict"].items():
            assert torch.equal(final["state_dict"][key], value), (delay, stopped_at, key)


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", "0", "must be >= 1, got 0"), ("eval_crops", "0", "must be >= 1, got 0"),
    ("crop_size", "-32", "must be >= 1, got -32"),
    ("num_workers", "-1", "must be >= 0 (0 loads in the main process), got -1"),
    ("val_fraction", "1.5", "must be in [0, 1), got 1.5"),
    ("test_fraction", "-0.1", "must be in [0, 1), got -0.1"),
])
def test_impossible_data_options_are_one_line(workdir, capsys, key, value, message):
    _, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), f"--data.init_args.{key}", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"qmamba: error: data.init_args.{key} {message}"


def test_fractions_that_leave_nothing_to_train_on_are_one_line(workdir, capsys):
    _, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.init_args.test_fraction", "0.6",
              "--data.init_args.val_fraction", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert "must be below 1 (something must be left to train on), got 0.6 + 0.5" in err[-1]


@pytest.mark.parametrize("damage, message", [
    ("latin-1", "is not UTF-8 text"), ("empty", "is empty"), ("header only", "has a header but no label rows")])
def test_label_files_that_cannot_be_read_are_named(tmp_path, damage, message):
    make_kadid(tmp_path, refs=2)
    labels = tmp_path / "dmos.csv"
    text = labels.read_text()
    if damage == "latin-1":
        labels.write_bytes(text.replace("I01_01_01.png", "I01_01_01_café.png").encode("latin-1"))
    else:
        labels.write_text("" if damage == "empty" else text.splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset("kadid10k", tmp_path)


def test_utf16_label_files_are_read(tmp_path):
    make_kadid(tmp_path, refs=2)
    labels = tmp_path / "dmos.csv"
    expected = load_dataset("kadid10k", tmp_path)
    labels.write_bytes(labels.read_text().encode("utf-16"))  # with its byte-order mark: unambiguous
    pd.testing.assert_frame_equal(load_dataset("kadid10k", tmp_path), expected)


def test_a_decompression_bomb_is_reported_with_the_other_image_problems(tmp_path, monkeypatch):
    from PIL import Image

    make_kadid(tmp_path, refs=2)
    (tmp_path / "images" / "I02_01_03.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the 48x40 fixture images now count as bombs
    data = IQADataModule([DatasetConfig("kadid10k", str(tmp_path))], batch_size=4, crop_size=32, eval_crops=1,
                         num_workers=0)
    with pytest.raises(DatasetError) as error:
        data.setup()
    report = str(error.value)
    assert "decompression bomb" in report and "MAX_IMAGE_PIXELS" in report
    assert "I02_01_03.png" in report  # the missing file is in the same report


@pytest.mark.parametrize("flag, value, message", [
    ("--model.init_args.backbone", "qmamba_tiny_typo", "unknown model 'qmamba_tiny_typo'; available: "),
    ("--data.init_args.datasets", "[{name: koniq}]", "unknown dataset 'koniq'; available: "),
])
def test_unknown_names_are_one_line(workdir, capsys, flag, value, message):
    _, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code in (1, 2) and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"qmamba: error: {message}")


@pytest.mark.parametrize("damage, message", [
    ("empty", "is empty (0 bytes)"), ("random bytes", "is not a PyTorch checkpoint"),
    ("truncated", "is damaged or truncated"), ("plain state dict", "is not a checkpoint written by qmamba training"),
    ("missing", "checkpoint file not found"),
])
def test_qmamba_test_with_a_bad_checkpoint_is_one_line(finished, capsys, damage, message):
    run, _ = finished
    good = run / "checkpoints" / "best.ckpt"
    bad = run.parent / "bad.ckpt"
    if damage == "plain state dict":
        torch.save(torch.load(good, weights_only=True)["state_dict"], bad)
    elif damage != "missing":
        contents = {"empty": b"", "random bytes": bytes(range(7, 250)), "truncated": good.read_bytes()[:5000]}
        bad.write_bytes(contents[damage])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and message in err[-1] and err[-1].startswith("qmamba: error:")
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("flag, value, message", [
    ("--trainer.devices", "0", "`Trainer(devices='0')` value is not a valid input using cpu accelerator. "
                               "(`qmamba fit --help` lists the trainer options)"),
    ("--model.init_args.optimizer.init_args.lr", "-1", "model.init_args.optimizer: Invalid learning rate: -1.0; fix "
                                                       "it in the config or with "
                                                       "--model.init_args.optimizer.init_args.<name>"),
    ("--data.init_args.batch_size", "64", "an epoch of 15 training images holds no batch of 64 on each of 1 rank(s): "
                                          "lower data.init_args.batch_size to at most 15 or raise "
                                          "data.init_args.epoch_samples"),
])
def test_trainer_optimizer_and_batch_options_that_cannot_work_are_one_line(workdir, capsys, flag, value, message):
    tmp_path, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"qmamba: error: {message}"
    if "batch_size" not in flag:  # refused before the run folder exists: it once blocked the corrected rerun
        assert not (tmp_path / "runs" / "tiny").exists()


def test_a_fused_optimizer_that_mixed_precision_cannot_clip_is_refused_before_the_run(tmp_path):
    """Lightning raises a RuntimeError at a run's first clipped step when a fused optimizer trains in mixed precision;
    the fit refuses the pair when it builds its optimizer. Mixed precision is for GPUs (the CLI trains it in fp32 on
    the CPU), so the rule is checked on the trainer itself: Lightning gives bf16-mixed the same plugin on the CPU."""
    from lightning.pytorch import Trainer

    from qmamba.errors import UsageError
    from qmamba.training.cli import refuse_unclippable_optimizer

    def trainer(precision: str, clip: float | None) -> Trainer:
        return Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)

    params = [torch.nn.Parameter(torch.zeros(3))]
    fused, mixed = torch.optim.AdamW(params, fused=True), trainer("bf16-mixed", 5.0)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):  # what the run's first step meets
        mixed.precision_plugin.clip_gradients(fused, 5.0)
    with pytest.raises(UsageError, match="^" + re.escape(
            "model.init_args.optimizer: a fused AdamW unscales its own gradients, which Lightning cannot clip under "
            "trainer.precision bf16-mixed with trainer.gradient_clip_val 5.0; set "
            "--model.init_args.optimizer.init_args.fused false, or --trainer.gradient_clip_val 0") + "$"):
        refuse_unclippable_optimizer(mixed, fused)
    refuse_unclippable_optimizer(mixed, torch.optim.AdamW(params))  # unfused: Lightning unscales, then clips
    refuse_unclippable_optimizer(trainer("bf16-mixed", None), fused)  # nothing to clip
    refuse_unclippable_optimizer(trainer("32-true", 5.0), fused)  # no scaler: clipping works


def test_a_diverging_run_says_where_its_loss_stopped_being_finite(workdir, capsys):
    _, config = workdir
    line = _refused(capsys, "fit", "--config", str(config), "--data.init_args.batch_size", "4",
                    "--model.init_args.optimizer.init_args.lr", "1e6")
    assert line.startswith("qmamba: error: the training loss became nan at epoch 0, step ")
    assert "the run diverged (learning rate 1e+06); lower model.init_args.optimizer.init_args.lr" in line


def test_testing_a_checkpoint_with_nan_weights_is_one_line_not_metrics_without_those_images(finished, capsys):
    run, _ = finished
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["state_dict"]["model.head.regressor.1.bias"].fill_(float("nan"))
    torch.save(checkpoint, run.parent / "nan.ckpt")
    line = _refused(capsys, "test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run.parent / "nan.ckpt"))
    assert "the model predicted NaN or inf for 10 of 10 test images of tiny_kadid at epoch 0" in line


def test_resuming_with_a_smaller_max_epochs_is_one_line(workdir, capsys):
    tmp_path, config = workdir
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3"])
    run = tmp_path / "runs" / "tiny"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert "has trained past --trainer.max_epochs 1 (its epoch counter is 2): a resumed run can only go on" in err[-1]


@pytest.mark.parametrize("command", ["test", "fit"])
def test_a_checkpoint_of_another_architecture_is_one_line(finished, capsys, command):
    run, _ = finished
    line = _refused(capsys, command, "--config", str(run / "config.yaml"), "--ckpt_path",
                    str(run / "checkpoints" / "last.ckpt"), "--model.init_args.backbone", "lqmamba_test",
                    *(["--trainer.max_epochs", "2"] if command == "fit" else []))
    assert "does not fit the model the config builds (checkpoint: qmamba_test, config: lqmamba_test; 24 weights " \
           "missing, 0 unknown, 0 of another shape, e.g. model.backbone.layers.0.blocks.0.op.fusion" in line
    assert line.endswith("use the config.yaml of the run the checkpoint comes from")


def test_export_into_a_folder_that_cannot_be_written_is_one_line(trained, tmp_path, capsys):
    unwritable = Path("/sys") if not os.access("/sys", os.W_OK) or _cannot_create_in("/sys") else None
    if unwritable is None:
        pytest.skip("no folder here refuses writes (root on a machine whose /sys accepts files)")
    _, run = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), "-o", str(unwritable / "q.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"qmamba: error: cannot write --output {unwritable / 'q.onnx'}: Permission denied; pick a " \
                      "folder you can write"


def _cannot_create_in(folder: str) -> bool:
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return False
    except OSError:
        return True


def test_a_full_disk_during_fit_is_one_line(workdir, capsys, small_disk):
    _, config = workdir
    line = _refused(capsys, "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(small_disk))
    assert line.startswith("qmamba: error: no space left on the device while writing ")
    assert "then rerun (with --ckpt_path last to resume from the last complete checkpoint" in line
