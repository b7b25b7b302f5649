"""Transferable IQA protocol: adapt a trained source model to a target dataset with several methods, compare.

    qmamba transfer --source runs/transfer/source_koniq10k/checkpoints/best.ckpt \
        --config configs/recipe.yaml --config configs/task/livec.yaml --methods none,styleprompt,head,full

``none`` tests the source model on the target as it is (zero-shot); every other method fine-tunes it on the
target's training split with :class:`qmamba.training.PromptTuning` (``styleprompt``, ``static``, ``ssf``, ``head``,
``full``) and tests the validation-selected checkpoint. The target config supplies data, trainer and optimiser;
the model architecture comes from the source checkpoint. Results: one line per method (source, target, method,
trainable parameters, SRCC and PLCC, or for a target of comparisons the held-out pair accuracy and log-likelihood)
printed and written to ``<out>/results.csv``; finished methods are skipped.
Arguments after ``--`` go to every fit and test.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from qmamba.files.atomic import write_text_atomic
from qmamba.files.checkpoint import CheckpointError, read_checkpoint
from qmamba.files.config_files import check_config_args
from qmamba.inference.trained import read_architecture
from qmamba.models import build_backbone
from qmamba.models.prompts import PROMPT_METHODS, check_prompt_target
from qmamba.protocols.runs import config_args, fit_then_test, split_passthrough
from qmamba.training.cli import run_lightning_cli
from qmamba.training.prompt_tuning import TUNING_METHODS

__all__ = ["METHODS", "parse_methods", "run_transfer"]

METHODS = ("none", *TUNING_METHODS)  # zero-shot, then every PromptTuning method
# what a method's test reports: SRCC and PLCC on a scored target, pair metrics on a target of comparisons
METRICS = {"srcc": "SRCC", "plcc": "PLCC", "pair_accuracy": "pair accuracy", "log_likelihood": "log-likelihood"}


def _source_model_args(source: Path) -> dict[str, Any]:
    """The source run's architecture, with nothing to re-initialise (its weights come through PromptTuning)."""
    return {**read_architecture(source), "pretrained": None}


def _check_methods_apply(model_args: dict[str, Any], methods: Sequence[str]) -> None:
    """StylePrompt on a timm source, say, is one line before any method runs (the backbone built without memory)."""
    prompted = [m for m in methods if m in PROMPT_METHODS]
    if prompted:
        with torch.device("meta"):
            backbone = build_backbone(model_args["backbone"], **(model_args.get("backbone_args") or {}))
        for method in prompted:
            check_prompt_target(backbone, method)


def _overlay(source: Path, method: str, out: Path, model_args: dict[str, Any]) -> Path:
    """A config layered over the target's: the source architecture, the tuning callback, the run folder."""
    trainer: dict[str, Any] = {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                          "init_args": {"save_dir": str(out), "name": method, "version": ""}}}
    if method != "none":
        trainer["callbacks"] = [{"class_path": "qmamba.training.PromptTuning",
                                 "init_args": {"source": str(source), "method": method}}]
    config = {"trainer": trainer, "model": {"class_path": "qmamba.training.QMambaIQA", "init_args": model_args}}
    path = out / "configs" / f"{method}.yaml"
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _run_method(source: Path, configs: list[str], method: str, out: Path, model_args: dict[str, Any],
                extra: Sequence[str]) -> dict[str, Any]:
    run = out / method
    results = run / "test_results.json"
    if not results.is_file():
        layers = config_args([*configs, str(_overlay(source, method, out, model_args))])
        if method == "none":
            run_lightning_cli(["test", *layers, "--ckpt_path", str(source), *extra])
        else:
            fit_then_test(["fit", *layers, *extra], run)
    payload = json.loads(results.read_text())
    metrics = next(iter(payload["results"].values()))
    if method == "none":
        trainable, total = 0, None
    else:
        tuned = read_checkpoint(run / "tuned.pt")
        trainable, total = tuned["trainable_params"], tuned["total_params"]
    measured = {key: metrics[key] for key in METRICS if key in metrics}
    return {"method": method, "trainable_params": trainable, "total_params": total, **measured,
            "images": metrics.get("images")}


def run_transfer(
    source: str | Path, config: str | Sequence[str], methods: Sequence[str], out: str | Path,
    src_name: str | None = None, dst_name: str | None = None, extra: Sequence[str] = (),
) -> pd.DataFrame:
    """Run each method (skipping finished ones), print the result lines and write ``<out>/results.csv``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown transfer methods {unknown}; choose from {', '.join(METHODS)}")
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise CheckpointError(f"source checkpoint {source} does not exist; train the source model first "
                              "(make transfer does it for you)")
    configs = [config] if isinstance(config, str) else list(config)
    model_args = _source_model_args(source)
    _check_methods_apply(model_args, methods)
    src = src_name or source.parent.parent.name
    dst = dst_name or Path(configs[-1]).stem
    rows = [{"source": src, "target": dst, **_run_method(source, configs, m, out, model_args, extra)}
            for m in methods]
    seen, said = _seen_in_training(source, out / methods[0] / "splits")
    for row in rows:
        row["test_images_seen_in_source_training"] = seen
    table = pd.DataFrame(rows)
    write_text_atomic(out / "results.csv", table.to_csv(index=False))
    print(f"\ntransfer {src} -> {dst} ({out}):")
    if said:
        print(said)
    for row in rows:
        share = f" ({100 * row['trainable_params'] / row['total_params']:.1f}%)" if row["total_params"] else ""
        measured = "  ".join(f"{label} {row[key]:.4f}" for key, label in METRICS.items() if key in row)
        print(f"{row['source']} -> {row['target']}  {row['method']:<12} trainable {row['trainable_params']:>11,}"
              f"{share:<9} {measured}")
    print(flush=True)
    return table


def _seen_in_training(source: Path, target_splits: Path) -> tuple[int | None, str]:
    """How many of the target's test images the source model trained on (its run's ``splits/``, next to its
    ``checkpoints/``), and a line saying so: a target made of the source's own training images scores high for that
    reason alone. ``None`` and a line saying why where the runs do not record the paths."""
    trained, tested = _split_paths(source.parent.parent / "splits", "train"), _split_paths(target_splits, "test")
    if trained is None or tested is None:
        return None, (f"transfer: cannot tell whether the target's test images are among the source's training "
                      f"images: {source.parent.parent / 'splits'} does not record the images' paths (a run of an "
                      "older qmamba, or a checkpoint moved out of its run folder)")
    seen = len(tested & trained)
    if not seen:
        return 0, ""
    return seen, (f"transfer: {seen} of the target's {len(tested)} test images are in the source model's training "
                  "split: their scores are not of images it never saw")


def _split_paths(folder: Path, split: str) -> set[str] | None:
    """The image paths of ``split`` in a run's ``splits/*.csv``; None without them."""
    files = sorted(folder.glob("*.csv"))
    tables = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files]
    if not tables or any("path" not in t for t in tables):
        return None
    return {p for t in tables for p in t.loc[t["split"] == split, "path"]}


def parse_methods(text: str) -> tuple[str, ...]:
    """``--methods``: a comma-separated list of :data:`METHODS`, or ``all`` for every one of them."""
    return METHODS if text == "all" else tuple(m.strip() for m in text.split(",") if m.strip())


def main(argv: list[str]) -> None:
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(prog="qmamba transfer", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every fit/test, e.g. -- --trainer.max_epochs 5")
    parser.add_argument("--source", required=True, help="checkpoint of the source model (a qmamba fit's best.ckpt)")
    parser.add_argument("--config", required=True, action="append",
                        help="the target's config; repeat to layer files: configs/recipe.yaml configs/task/livec.yaml")
    parser.add_argument("--methods", default="none,styleprompt",
                        help=f"comma-separated, from {','.join(METHODS)}, or 'all' (default none,styleprompt)")
    parser.add_argument("--out", help="results folder (default runs/transfer/<source>_to_<target>)")
    parser.add_argument("--src-name", help="name of the source in the result lines (default: its run folder)")
    parser.add_argument("--dst-name", help="name of the target in the result lines (default: the config's name)")
    args = parser.parse_args(argv)
    check_config_args([*args.config, *extra])  # each fit would check them: before the results folder exists
    methods = parse_methods(args.methods)
    src = args.src_name or Path(args.source).parent.parent.name
    dst = args.dst_name or Path(args.config[-1]).stem
    run_transfer(args.source, args.config, methods, args.out or Path("runs/transfer") / f"{src}_to_{dst}", src, dst,
                 extra)
