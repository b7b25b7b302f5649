"""The IQA benchmark protocol: train and test one config on N seeded splits, report median and mean SRCC/PLCC.

    qmamba benchmark --config configs/recipe.yaml --config configs/task/livec.yaml --splits 10 [--out DIR] [-- ARGS]

Split ``i`` trains with ``data.init_args.split_seed = i`` into ``<out>/split_<i>/`` and is tested with its
``best.ckpt``. Finished splits are skipped and an interrupted one resumes from its ``last.ckpt``, so the command
can simply be run again. Per-split metrics go to ``<out>/results.csv``, the summary to ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from qmamba.files.atomic import write_text_atomic
from qmamba.files.config_files import check_config_args
from qmamba.protocols.runs import config_args, fit_then_test, split_passthrough

__all__ = ["PAPER_RESULTS", "run_benchmark", "summarise"]

# QMamba's task-specific results (SRCC, PLCC; 10-split medians) as cited in the CMPA paper (Table 1, "QMamba (30M)")
PAPER_RESULTS: dict[str, tuple[float, float]] = {
    "live": (0.959, 0.958),
    "csiq": (0.950, 0.952),
    "tid2013": (0.896, 0.913),
    "kadid10k": (0.923, 0.938),
    "koniq10k": (0.928, 0.943),
    "livec": (0.863, 0.903),
    "spaq": (0.927, 0.933),
    "flive": (0.574, 0.672),
}
METRICS = ("srcc", "plcc", "krcc", "rmse", "plcc_logistic", "pair_accuracy", "log_likelihood")


def _split_run(out: Path, split: int, configs: Sequence[str], extra: Sequence[str]) -> dict:
    """Fit (or resume) and test one split; returns its ``test_results.json`` payload."""
    run = out / f"split_{split:02d}"
    fit = ["fit", *config_args(configs), "--data.init_args.split_seed", str(split),
           "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", run.name, *extra]
    return fit_then_test(fit, run)


def summarise(rows: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per dataset and metric: median, mean, std (sample; 0 for one split), min, max and the split count."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for dataset, group in rows.groupby("dataset", sort=False):
        summary[str(dataset)] = {}
        for metric in METRICS:
            values = group[metric].dropna().tolist()
            if values:
                summary[str(dataset)][metric] = {
                    "median": statistics.median(values), "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "splits": len(values),
                }
    return summary


def format_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    header = f"{'dataset':<14} {'metric':<6} {'splits':>6} {'median':>7} {'mean':>7} {'std':>6} {'min':>7} " \
             f"{'max':>7} {'QMamba paper':>12}"
    lines = [header, "-" * len(header)]
    for dataset, metrics in summary.items():
        paper = PAPER_RESULTS.get(dataset)
        for i, (metric, label) in enumerate((("srcc", "SRCC"), ("plcc", "PLCC"), ("pair_accuracy", "PAIRS"))):
            s = metrics.get(metric)  # a comparisons dataset has its pairwise accuracy, no SRCC / PLCC
            if s is None:
                continue
            reference = f"{paper[i]:.3f}" if paper and i < len(paper) else "-"
            lines.append(f"{dataset:<14} {label:<6} {s['splits']:>6d} {s['median']:>7.4f} {s['mean']:>7.4f} "
                         f"{s['std']:>6.4f} {s['min']:>7.4f} {s['max']:>7.4f} {reference:>12}")
    return "\n".join(lines)


def run_benchmark(
    config: str | Sequence[str], splits: int, out: str | Path, extra: Sequence[str] = ()
) -> dict[str, dict[str, dict[str, float]]]:
    """Run (or complete) the N-split protocol and write ``results.csv`` and ``summary.json`` under ``out``."""
    if splits < 1:
        raise ValueError(f"--splits must be >= 1, got {splits}")
    out, configs = Path(out), [config] if isinstance(config, str) else list(config)
    rows = []
    for split in range(splits):
        payload = _split_run(out, split, configs, extra)
        for dataset, metrics in payload["results"].items():
            rows.append({"split": split, "dataset": dataset, **{k: metrics.get(k) for k in ("images", *METRICS)}})
        table = pd.DataFrame(rows)
        write_text_atomic(out / "results.csv", table.to_csv(index=False))  # after every split: survives a crash
    summary = summarise(table)
    write_text_atomic(out / "summary.json", json.dumps(
        {"config": configs, "splits": splits, "extra_args": list(extra), "summary": summary,
         "paper": {d: dict(zip(("srcc", "plcc"), PAPER_RESULTS[d], strict=True))
                   for d in summary if d in PAPER_RESULTS}}, indent=2) + "\n")
    print(f"\n{splits}-split benchmark of {' + '.join(configs)} ({out}):\n{format_table(summary)}\n", flush=True)
    return summary


def main(argv: list[str]) -> None:
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(prog="qmamba benchmark", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every 'qmamba fit', e.g. -- --trainer.devices 2")
    parser.add_argument("--config", required=True, action="append",
                        help="a fit config; repeat to layer files, e.g. configs/recipe.yaml configs/task/livec.yaml")
    parser.add_argument("--splits", type=int, default=10, help="number of seeded splits (default 10)")
    parser.add_argument("--out", help="results folder (default runs/benchmark/<config name>)")
    args = parser.parse_args(argv)
    check_config_args([*args.config, *extra])  # each fit would check them: before the results folder exists
    run_benchmark(args.config, args.splits, args.out or Path("runs/benchmark") / Path(args.config[-1]).stem, extra)
