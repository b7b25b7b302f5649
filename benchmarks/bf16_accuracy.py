"""bf16 scoring against fp32 on a run's held-out test images: per test set, the largest and mean difference of the
scores on the unit scale, and each precision's test SRCC.

    python benchmarks/bf16_accuracy.py runs/demo          # make demo's run: its two demo test sets
    python benchmarks/bf16_accuracy.py runs/demo --batch-size 32

The run folder gives the checkpoint (``checkpoints/best.ckpt``), its datasets (``config.yaml``) and their test
images (``splits/<label>.csv``). Both precisions score through ``qmamba.load`` as ``qmamba score`` does, with the run's
evaluation crops. On a CPU without native bf16, where ``--precision bf16`` is refused, the bf16 scorer is prepared
the same way with the refusal skipped: emulated bf16 computes the same values, only slower, so this measures the
accuracy anywhere and the speed nowhere (``benchmarks/cpu_models.py`` does that). The table says which it was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

import qmamba
from qmamba.data import DatasetConfig
from qmamba.inference.precision import native_bf16
from qmamba.models.low_precision import prepare_bf16_inference


def test_images(run: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """{label: (test image paths, their labels)} for each dataset of the run."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    sets = {}
    for index, entry in enumerate(config["data"]["init_args"]["datasets"]):
        dataset = DatasetConfig.from_mapping(entry, index)
        if dataset.comparisons is not None:
            continue  # no scores to correlate with
        table, _ = dataset.labels()
        split = pd.read_csv(run / "splits" / f"{dataset.key}.csv")
        key = "name" if "name" in table else "path"
        test = table[table[key].isin(split.loc[split["split"] == "test", "name"])]
        sets[dataset.key] = (test["path"].astype(str).tolist(), test["score"].to_numpy())
    return sets


def bf16_scorer(fp32: qmamba.inference.scoring.Scorer, dataset: str) -> tuple[qmamba.inference.scoring.Scorer, str]:
    """The bf16 scorer of the same model and ``dataset``'s scale: ``qmamba.load``'s where the CPU has bf16, else
    prepared the same way."""
    if native_bf16(fp32.device):
        return qmamba.load(fp32.info["checkpoint"], device=fp32.device, dataset=dataset, batch_size=fp32.batch_size,
                           precision="bf16"), "native"
    model = prepare_bf16_inference(copy.deepcopy(fp32.model), fp32.device)
    return dataclasses.replace(fp32, model=model, precision="bf16", info={**fp32.info, "precision": "bf16"}), "emulated"


def srcc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(pd.Series(scores).corr(pd.Series(labels), method="spearman"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (qmamba fit's), e.g. runs/demo")
    parser.add_argument("--checkpoint", default="checkpoints/best.ckpt", help="inside the run folder")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    checkpoint = args.run / args.checkpoint
    if not checkpoint.is_file():
        sys.exit(f"no checkpoint {checkpoint}: train the run first (make demo trains runs/demo)")
    print(f"{checkpoint}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| test set | images | bf16 | max unit diff | mean unit diff | fp32 SRCC | bf16 SRCC | bf16 - fp32 SRCC |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, (paths, labels) in test_images(args.run).items():
        fp32 = qmamba.load(checkpoint, device="cpu", dataset=label, batch_size=args.batch_size)
        bf16, how = bf16_scorer(fp32, label)
        scores = {name: np.array(scorer.score(paths)) for name, scorer in (("fp32", fp32), ("bf16", bf16))}
        diff = np.abs(scores["bf16"] - scores["fp32"]) / (fp32.scale.high - fp32.scale.low)
        fp32_srcc, bf16_srcc = srcc(scores["fp32"], labels), srcc(scores["bf16"], labels)
        print(f"| {label} | {len(paths)} | {how} | {diff.max():.4f} | {diff.mean():.4f} | {fp32_srcc:.4f} | "
              f"{bf16_srcc:.4f} | {bf16_srcc - fp32_srcc:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
