"""The benchmark scripts run end to end (tiny sizes: they check the scripts, not the speed), each as a process
forked from a warm interpreter (tests/forked.py): most of a script's few seconds at these sizes were its imports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from score_runs import ray_cluster

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(forked_qmamba, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    """`python benchmarks/NAME.py ARGS`, its output captured."""
    return forked_qmamba("benchmarks").run(list(args), script=BENCHMARKS / f"{name}.py", timeout=timeout)


def _median(cell: str) -> float:
    """A table cell's median, from "median (min-max)"."""
    return float(cell.split("(")[0])


def test_cpu_models_benchmark_prints_its_table(forked_qmamba):
    """Steady-state blocks at a tiny size: a median and a spread per figure and per ratio, under a header naming the
    CPU's vector ISA class."""
    from qmamba.machine import cpu_isa

    result = run_benchmark(forked_qmamba, "cpu_models", "--models", "qmamba_test:cpu", "qmamba_test:torch",
                           "qmamba_test:cpu@bf16", "--size", "32", "--rounds", "2", "--block-seconds", "0",
                           "--infer-batch", "2", "--no-scan")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f", {cpu_isa()}, " in result.stdout and "median (min-max) of 2 blocks" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| qmamba_test")]
    assert [row[0].strip() for row in rows] == ["qmamba_test:cpu", "qmamba_test:torch", "qmamba_test:cpu@bf16"]
    for row in rows:
        for cell in (row[2], row[4]):
            low, high = (float(x) for x in cell.split("(")[1].rstrip(") ").split("-"))
            assert 0 < low <= _median(cell) <= high
        assert row[3].strip() == row[5].strip() == "-"  # no Swin-T in this run: no ratio


def test_downsample_conv_benchmark_times_both_and_names_the_pick(forked_qmamba):
    """Per downsampling, batch and mode: both computations' times with their spread, their ratio per block, and the
    computation the layer picks (here the product only for the wider map's weight at batch 1)."""
    modes = ["train-bf16", "infer-fp32"]  # each of autograd and autocast on and off
    result = run_benchmark(forked_qmamba, "downsample_conv", "--shape", "8", "6", "--shape", "64", "4",
                           "--batches", "1", "4", "--modes", *modes, "--blocks", "2", "--block-seconds", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "median (min-max) of 2 blocks" in result.stdout
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines() if line.startswith("|")]
    rows = [row for row in cells if row[1].isdigit()]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (shape, batch, positions, mode) for shape, side in (("8 -> 16, 6", 3), ("64 -> 128, 4", 2))
        for batch in ("1", "4") for positions in (str(int(batch) * side * side),) for mode in modes]
    assert [r[7] for r in rows[::2]] == ["convolution", "convolution", "product", "convolution"]
    for row in rows:
        for cell in row[4:7]:
            low, high = (float(x) for x in cell.split("(")[1].rstrip(") ").split("-"))
            assert 0 < low <= _median(cell) <= high


@pytest.mark.slow  # compiles the floor kernels for both dtypes (cached after the first run)
def test_scan_floor_benchmark_prints_the_scan_against_both_floors(forked_qmamba):
    result = run_benchmark(forked_qmamba, "scan_floor", "--shape", "5", "16", "2", "--shape", "3", "32", "20",
                           "--blocks", "2", "--block-seconds", "0", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| 5, 16, 2") or line.startswith("| 3, 32, 20")]
    # rank 20 takes the backward's matrix-product path, rank 2 the kernel's chain rule
    assert [(r[0], r[1], r[2]) for r in rows] == [(shape, dtype, kind) for shape in ("5, 16, 2", "3, 32, 20")
                                                  for dtype in ("fp32", "bf16") for kind in ("forward", "backward")]
    for row in rows:
        scan, memory, arithmetic = (_median(cell) for cell in row[3:6])
        assert min(scan, memory, arithmetic) > 0
        assert float(row[6]) == pytest.approx(scan / max(memory, arithmetic), rel=0.03)


@ray_cluster
@pytest.mark.slow  # starts a Ray cluster for the Ray engine's rows
def test_score_benchmark_prints_floor_and_scoring_rows(trained, tmp_path, forked_qmamba):
    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    result = run_benchmark(forked_qmamba, "score", str(ckpt), "--images", "6", "--workers", "0", "1",
                           "--shards", "2", "--workdir", str(tmp_path), "--ray")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| qmamba_test")]
    local, engines = rows[:4], rows[4:]
    assert [(r[1], r[4], int(r[5])) for r in local] == [("fp32", "loose", 0), ("fp32", "loose", 1),
                                                        ("fp32", "2 shards", 0), ("fp32", "2 shards", 1)]
    assert all(float(r[6]) > 0 and float(r[7]) > 0 for r in local)
    # the Ray engine's rows: img/s of both engines and their ratio
    assert [(r[0], r[1]) for r in engines] == [("qmamba_test fp32", "loose"), ("qmamba_test fp32", "2 shards")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in engines)
    assert "`qmamba score --help`" in result.stdout


@pytest.mark.slow
def test_bf16_accuracy_benchmark_prints_a_row_per_test_set(trained, tmp_path, forked_qmamba):
    """The run's test images scored in both precisions (bf16 emulated where the CPU lacks it): the fp32 SRCC is the
    one ``qmamba test`` reports for the same crops, bf16's within the documented bounds."""
    import json

    import pandas as pd
    import torch

    from qmamba.cli import main
    from qmamba.inference.precision import native_bf16

    run = trained[1]
    result = run_benchmark(forked_qmamba, "bf16_accuracy", str(run), "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    split = pd.read_csv(next((run / "splits").glob("*.csv")))
    assert len(rows) == 1 and int(rows[0][1]) == (split["split"] == "test").sum() > 0
    label, _, how, max_diff, mean_diff, fp32_srcc, bf16_srcc, _ = rows[0]
    assert how == ("native" if native_bf16(torch.device("cpu")) else "emulated")
    assert 0 < float(mean_diff) <= float(max_diff) < 0.01 and abs(float(bf16_srcc) - float(fp32_srcc)) < 0.05
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
          "--trainer.logger.init_args.save_dir", str(tmp_path)])  # its results there, not in the shared run
    tested = json.loads((tmp_path / run.name / "test_results.json").read_text())["results"][label]
    assert float(fp32_srcc) == pytest.approx(tested["srcc"], abs=1e-4)


@pytest.mark.slow
def test_serve_benchmark_prints_a_row_per_client_count(trained, tmp_path, forked_qmamba):
    root, run = trained
    result = run_benchmark(forked_qmamba, "serve", str(run / "checkpoints" / "best.ckpt"), "--images",
                           str(root / "kadid" / "images"), "--count", "4", "--requests", "8", "--clients", "1", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("|") and "---" not in line]
    assert [int(r[0]) for r in rows[1:]] == [1, 2] and all(float(r[1]) > 0 for r in rows[1:])
    assert "qmamba score's loop" in result.stdout


@pytest.mark.slow
def test_ordered_scan_benchmark_prints_a_row_per_stage_and_backend(forked_qmamba):
    result = run_benchmark(forked_qmamba, "ordered_scan", "--device", "cpu", "--batch", "1", "--stages", "3",
                           "--repeats", "1", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 3:")]
    assert [r[1].strip() for r in rows] == ["cpu", "torch"] and all(float(r[3]) > 0 for r in rows)


@pytest.mark.slow
def test_profile_step_prints_the_layout_share_and_the_largest_operations(forked_qmamba):
    result = run_benchmark(forked_qmamba, "profile_step", "--models", "qmamba_test", "--size", "32", "--rows", "40",
                           "--train-only")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = next(line for line in result.stdout.splitlines() if "training step" in line)
    assert "aten::copy_" in summary and "aten::fill_" in summary
    assert "qmamba::cpu_scan_backward" in result.stdout  # the fused scan ran, and backward through it
    # the forward kernel has an event of its own: not the self time of its autograd node
    assert "qmamba::cpu_scan_kernel" in result.stdout


@pytest.mark.slow
def test_profile_step_in_bf16_profiles_inference_as_the_scorer_runs_it(forked_qmamba):
    """bf16 inference on a prepared copy (the scan's output in bf16, SS2D's out_norm inside the scan's op: no
    LayerNorm on an fp32 copy of it, no casts around it), then the training step on the model's own fp32 weights."""
    result = run_benchmark(forked_qmamba, "profile_step", "--models", "qmamba_test", "--size", "32", "--rows", "60",
                           "--precision", "bf16", "--inference-batch", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    inference, training = result.stdout.split("training step")
    assert "inference (bf16)" in inference and "qmamba::cpu_scan_normalized " in inference
    assert "qmamba::cpu_scan_backward" in training


@pytest.mark.slow
def test_gpu_check_model_table_runs_on_the_cpu(forked_qmamba):
    result = run_benchmark(forked_qmamba, "gpu_check", "models", "--device", "cpu", "--batches", "2", "--size",
                           "32", "--steps", "1", "--models", "qmamba_test", "--backends", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| qmamba_test")]
    assert len(rows) == 1 and float(rows[0][2]) > 0 and float(rows[0][4]) > 0
