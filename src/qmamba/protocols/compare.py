"""The paper's comparison for any dataset config: each backbone through the same recipe and benchmark protocol, then
one table of accuracy against cost, and a plot of it.

    qmamba compare --config configs/recipe.yaml --config configs/task/koniq10k.yaml --splits 10 \\
        --models qmamba_tiny lqmamba_tiny timm:swin_tiny_patch4_window7_224 timm:resnet50 [--out DIR] [-- ARGS]

Each model runs the N-split protocol (``qmamba benchmark``) into ``<out>/<model>/``, its backbone the only change
to the configs: a finished (model, split) is reused and an interrupted one resumes, so the command can simply be run
again. Then every model's speed is measured on this machine's device (steady state, each model in fresh processes,
models alternated over ``--rounds``), and the table goes to ``<out>/compare.csv``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from qmamba.errors import UsageError
from qmamba.files.atomic import write_bytes_atomic, write_text_atomic
from qmamba.files.config_files import check_config_args
from qmamba.inference.trained import ARCHITECTURE_ARGS, build_architecture
from qmamba.machine import device_description
from qmamba.models import check_model_name
from qmamba.models.flops import CONVENTION, count_flops
from qmamba.protocols.benchmark import run_benchmark
from qmamba.protocols.runs import split_passthrough
from qmamba.protocols.throughput import Throughput, measure_in_new_process

__all__ = ["compare", "main"]


def compare(configs: Sequence[str], models: Sequence[str], splits: int, out: str | Path, extra: Sequence[str] = (),
            size: int | None = None, batch: int | None = None, rounds: int = 3, block_seconds: float = 3.0
            ) -> pd.DataFrame:
    """Run (or complete) every model's benchmark, measure their cost, and write the table and its plot."""
    out = Path(out)
    summaries = {model: run_benchmark(configs, splits, out / _folder(model),
                                      [*extra, "--model.init_args.backbone", model]) for model in models}
    run_configs = {model: _run_config(out / _folder(model)) for model in models}
    data = run_configs[models[0]]["data"]["init_args"]
    size, batch = size or int(data.get("crop_size", 224)), batch or int(data.get("batch_size", 32))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speeds: dict[str, list[Throughput]] = {model: [] for model in models}
    for _ in range(rounds):  # models alternated, so that the machine's drift reaches every one alike
        for model in models:
            speeds[model].append(measure_in_new_process(_architecture(run_configs[model]), size, batch, device,
                                                        block_seconds))
    table = pd.DataFrame([_row(model, summaries[model], speeds[model], run_configs[model], size)
                          for model in models])
    context = {"size": size, "batch": batch, "device": device_description(device), "splits": splits,
               "configs": list(configs), "rounds": rounds}
    write_text_atomic(out / "compare.csv", table.to_csv(index=False))
    markdown = format_markdown(table, context)
    write_text_atomic(out / "compare.md", markdown)
    write_bytes_atomic(out / "compare.png", plot(table, context))
    print(f"\n{markdown}\n(written to {out}/compare.csv, compare.md and compare.png)", flush=True)
    return table


def _folder(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model)


def _run_config(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "split_00" / "config.yaml").read_text())  # qmamba's own file


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    init = config["model"]["init_args"]
    return {key: init[key] for key in ARCHITECTURE_ARGS if init.get(key) is not None}


def _row(model: str, summary: dict[str, Any], speeds: list[Throughput], config: dict[str, Any], size: int
         ) -> dict[str, Any]:
    with torch.random.fork_rng():
        network = build_architecture(**_architecture(config))
    row: dict[str, Any] = {"model": model, "params": network.num_params(include_head=False),
                           "gflops": round(count_flops(network, size).gflops, 4)}
    for key in ("inference", "training", "peak_mib"):
        values = [getattr(s, key) for s in speeds]
        row |= {f"{key}": statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}
    srcc, plcc = [], []
    for dataset, metrics in summary.items():
        for metric, values in (("srcc", srcc), ("plcc", plcc)):
            if metric in metrics:
                row[f"{dataset}_{metric}"] = metrics[metric]["median"]
                values.append(metrics[metric]["median"])
    row["avg_srcc"] = statistics.fmean(srcc) if srcc else float("nan")
    row["avg_plcc"] = statistics.fmean(plcc) if plcc else float("nan")
    return row


def _gflops_text(gflops: float) -> str:
    return f"{gflops:.2f}" if gflops >= 1 else f"{gflops:.3g}"


def format_markdown(table: pd.DataFrame, context: dict[str, Any]) -> str:
    datasets = [c.removesuffix("_srcc") for c in table.columns if c.endswith("_srcc") and c != "avg_srcc"]
    header = ["model", "params (M)", "GFLOPs", "inference img/s", "training img/s", "peak MiB",
              *[f"{d} {m}" for d in datasets for m in ("SRCC", "PLCC")], "avg SRCC", "avg PLCC"]
    lines = [f"{context['size']}x{context['size']} images, batch {context['batch']}, {context['device']}; speed: "
             f"median (min-max) over {context['rounds']} rounds of steady-state blocks; accuracy: median over "
             f"{context['splits']} split(s) of {' + '.join(context['configs'])}; GFLOPs: {CONVENTION}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def spread(row: pd.Series, key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f} ({row[key + '_min']:.{digits}f}-{row[key + '_max']:.{digits}f})"

    for _, row in table.iterrows():
        cells = [f"`{row['model']}`", f"{row['params'] / 1e6:.2f}", _gflops_text(row["gflops"]),
                 spread(row, "inference", 1), spread(row, "training", 1), f"{row['peak_mib']:.0f}",
                 *[f"{row.get(f'{d}_{m}', float('nan')):.3f}" for d in datasets for m in ("srcc", "plcc")],
                 f"{row['avg_srcc']:.3f}", f"{row['avg_plcc']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, context: dict[str, Any]) -> bytes:
    """Average SRCC against GFLOPs and against inference throughput, each model a labelled point (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for axis, key, label in ((axes[0], "gflops", f"GFLOPs ({context['size']}x{context['size']})"),
                             (axes[1], "inference", f"inference images/s ({context['device']})")):
        axis.scatter(table[key], table["avg_srcc"], s=60, color="tab:blue", zorder=3)
        for _, row in table.iterrows():
            axis.annotate(row["model"], (row[key], row["avg_srcc"]), textcoords="offset points", xytext=(6, 4),
                          fontsize=9)
        axis.margins(x=0.25, y=0.2)  # room for the labels
        axis.set_xlabel(label)
        axis.set_ylabel(f"SRCC (median over {context['splits']} split(s), mean over datasets)")
        axis.grid(alpha=0.3)
    figure.suptitle("accuracy against cost: " + " + ".join(Path(c).stem for c in context["configs"]))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def check_models(models: Sequence[str]) -> None:
    """Every name builds: a preset or a known timm model (one line otherwise), before any run starts."""
    if not models:
        raise UsageError("--models: name at least one backbone (a preset or timm:<model>)")
    if len(set(models)) != len(models):
        raise UsageError(f"--models names a backbone twice: {' '.join(models)}")
    for model in models:
        try:
            check_model_name(model)
        except UsageError as err:
            raise UsageError(f"--models: {err}") from None


def main(argv: list[str]) -> None:
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(prog="qmamba compare", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every 'qmamba fit', e.g. -- "
                                            "--trainer.max_epochs 5")
    parser.add_argument("--config", required=True, action="append",
                        help="a fit config; repeat to layer files, e.g. configs/recipe.yaml configs/task/livec.yaml")
    parser.add_argument("--models", required=True, nargs="+", metavar="MODEL",
                        help="backbones: presets (qmamba_tiny) and timm:<model> names")
    parser.add_argument("--splits", type=int, default=10, help="seeded splits per model (default 10)")
    parser.add_argument("--out", help="results folder (default runs/compare/<config name>)")
    parser.add_argument("--size", type=int, help="image side for GFLOPs and speed (default: the runs' crop size)")
    parser.add_argument("--batch", type=int, help="batch size for speed (default: the runs' batch size)")
    parser.add_argument("--rounds", type=int, default=3, help="speed measurements per model, alternated (default 3)")
    parser.add_argument("--block-seconds", type=float, default=3.0,
                        help="each speed measurement's least duration in seconds (default 3)")
    args = parser.parse_args(argv)
    if args.splits < 1 or args.rounds < 1 or (args.size is not None and args.size < 16) or \
            (args.batch is not None and args.batch < 1):
        raise UsageError("--splits, --rounds and --batch must be at least 1 and --size at least 16")
    check_models(args.models)
    check_config_args([*args.config, *extra])
    compare(args.config, args.models, args.splits, args.out or Path("runs/compare") / Path(args.config[-1]).stem,
            extra, args.size, args.batch, args.rounds, args.block_seconds)
