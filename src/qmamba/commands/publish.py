"""``qmamba publish``: a checkpoint or a run folder as a model folder that travels (weights, config, model card).

    qmamba publish runs/koniq10k -o models/qmamba-t-koniq        # the run's best checkpoint and its test results
    qmamba publish runs/koniq10k/checkpoints/last.ckpt -o models/qmamba-t-koniq --license cc-by-nc-4.0
    huggingface-cli upload my-org/qmamba-t-koniq models/qmamba-t-koniq   # then: qmamba.load("hf://my-org/...")

The folder (:mod:`qmamba.files.model_folder`) holds the inference weights only (no optimizer state, no pickle), the
config that rebuilds the model and says what its scores mean, and a model card in the Hugging Face Hub's conventions
filled from the run: its datasets, their scales and directions, its test metrics, how to load it, and the data terms
it inherits. Nothing in it needs Lightning or pickle to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

import qmamba
from qmamba.errors import UsageError
from qmamba.files.model_folder import write_model_folder
from qmamba.files.weights import file_sha256
from qmamba.inference.trained import TrainedModel, load_trained

__all__ = ["main", "model_card", "publish"]

CHECKPOINT_IN_RUN = Path("checkpoints") / "best.ckpt"
METRICS = (("srcc", "SRCC"), ("plcc", "PLCC"), ("krcc", "KRCC"), ("rmse", "RMSE"),
           ("pair_accuracy", "pair accuracy"), ("log_likelihood", "log-likelihood"))


def publish(source: str | Path, output: str | Path, license: str = "other",  # noqa: A002 - the card's field
            trusted: bool = False) -> Path:
    """Write the model folder of ``source`` (a ``.ckpt`` file or a run folder) to ``output``; returns it."""
    source = Path(source)
    checkpoint = source / CHECKPOINT_IN_RUN if source.is_dir() else source
    if not checkpoint.is_file():
        raise UsageError(f"{source}: expected a checkpoint file or a run folder holding {CHECKPOINT_IN_RUN}")
    run = checkpoint.parent.parent  # runs/<name>/checkpoints/<file>.ckpt
    trained = load_trained(checkpoint, trusted=trusted)
    results = _test_results(run)
    datasets = _dataset_entries(run)
    config = {
        "architecture": trained.architecture,
        "prompts": trained.prompts,
        **trained.spec.to_meta(),
        "training": trained.training or {"qmamba_version": "not recorded (a checkpoint of an older qmamba)"},
        "published_with": {"qmamba_version": qmamba.__version__, "checkpoint": checkpoint.name,
                           "checkpoint_sha256": file_sha256(checkpoint)},
        "test_results": results,
    }
    card = model_card(Path(output).name, trained, results, datasets, license)
    write_model_folder(output, trained.model.state_dict(), config, card)
    return Path(output)


def _test_results(run: Path) -> dict[str, dict[str, float]]:
    """The run's ``test_results.json`` metrics per dataset ({} when the run was never tested)."""
    path = run / "test_results.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    return {name: {k: float(v) for k, v in metrics.items()} for name, metrics in results.items()}


def _dataset_entries(run: Path) -> dict[str, dict[str, Any]]:
    """The run config's dataset entries by label: a registered dataset's name, or a table of one's own."""
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    entries = (((config.get("data") or {}).get("init_args") or {}).get("datasets")) or []
    return {str(e.get("label") or e.get("name")): e for e in entries if isinstance(e, dict)}


def model_card(name: str, trained: TrainedModel, results: dict[str, dict[str, float]],
               datasets: dict[str, dict[str, Any]], license: str) -> str:  # noqa: A002
    """README.md of a model folder: YAML front matter in the Hub's conventions, then what the score means, the test
    metrics, how to load the model and the data terms it inherits."""
    spec = trained.spec
    front = {
        "library_name": "qmamba",
        "license": license,
        "tags": ["image-quality-assessment", "no-reference-iqa", "mamba", "qmamba", trained.architecture["backbone"]],
        "datasets": list(spec.datasets),
        "metrics": ["srcc", "plcc"],
    }
    if results:
        front["model-index"] = [{"name": name, "results": [
            {"task": {"type": "image-quality-assessment", "name": "No-reference image quality assessment"},
             "dataset": {"name": dataset, "type": dataset},
             "metrics": [{"type": key, "name": label, "value": round(metrics[key], 4)}
                         for key, label in METRICS if key in metrics]}
            for dataset, metrics in results.items()]}]
    parameters = sum(p.numel() for p in trained.model.parameters())
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"A no-reference image quality model: QMamba with the `{trained.architecture['backbone']}` backbone "
             f"({parameters / 1e6:.2f} M parameters), trained with qmamba "
             f"on {', '.join(spec.datasets)}. Crops of {spec.preprocessing.crop_size} px, "
             f"{spec.preprocessing.eval_crops} per image, averaged.", "",
             "## What the score means", "",
             "| dataset | scale |", "| --- | --- |"]
    lines += [f"| {d} | {s.describe()} |" for d, s in zip(spec.datasets, spec.scales, strict=True)]
    lines += ["", f"Scores are on the first dataset's scale ({spec.datasets[0]}) unless another is asked for "
              "(`dataset=` in Python, `--dataset` on the command line). A score outside the scale is possible for "
              "images unlike the training data; `qmamba score` flags it.", "", "## Test results", ""]
    if results:
        shown = [(key, label) for key, label in METRICS if any(key in m for m in results.values())]
        lines += ["| dataset | images | " + " | ".join(label for _, label in shown) + " |",
                  "| --- | --- |" + " --- |" * len(shown)]
        lines += [f"| {d} | {int(m.get('images', 0))} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-"
                                                                        for k, _ in shown) + " |"
                  for d, m in results.items()]
        lines += ["", "On each dataset's held-out test split of the run (`qmamba test`)."]
    else:
        lines += ["The run was not tested (no `test_results.json` next to its checkpoint)."]
    lines += ["", "## How to load it", "", "```python", "import qmamba", "",
              f'scorer = qmamba.load("{name}")  # this folder; or "hf://ORG/{name}", "s3://bucket/models/{name}/"',
              'print(scorer.score("photo.jpg"))', "```", "", "```bash",
              f"qmamba score --model {name} photos/ -o scores.csv", f"qmamba serve --model {name}", "```", "",
              "## Data terms", "",
              "A model inherits the terms of the data it was trained on. The qmamba code is MIT-licensed; the datasets "
              "are not:", ""]
    for dataset in spec.datasets:
        entry = datasets.get(dataset)
        if entry is None:
            lines.append(f"- {dataset}: not recorded with the checkpoint; check the terms of the data it names.")
        elif entry.get("table"):
            lines.append(f"- {dataset}: the publisher's own ratings; its terms are the publisher's to state.")
        else:
            lines.append(f"- {dataset}: the `{entry.get('name')}` release, licensed by its authors, usually for "
                         "research (often non-commercial) use only; see qmamba's data/README.md, Terms of use, before "
                         "any commercial use of this model.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint (.ckpt) or a run folder (its checkpoints/best.ckpt)")
    parser.add_argument("-o", "--output", required=True, help="the model folder to write (new or empty)")
    parser.add_argument("--license", default="other",
                        help="the card's license field (default: other; the training data's terms apply too)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint with pickled Python objects (they can run code: trusted files only)")
    args = parser.parse_args(argv)
    folder = publish(args.source, args.output, args.license, args.trust_checkpoint)
    print(f"wrote {folder}/ (model.safetensors, config.json, README.md)")
