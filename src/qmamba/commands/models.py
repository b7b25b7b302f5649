"""``qmamba models``: the catalogue of backbones, each with its parameters and GFLOPs as the paper counts them.

    qmamba models                                   # every preset and the paper's baselines, at 224x224
    qmamba models qmamba_tiny timm:resnet50 --size 384
    qmamba models --json                            # [{"name", "params", "gflops", "size", "published_gflops"}]

Parameters are the backbone's alone (the paper's counts: no quality head); GFLOPs are of one image through the whole
model by :data:`qmamba.models.flops.CONVENTION`. ``published`` is the number the QMamba paper (models) or timm
(baselines) gives at 224x224, for checking.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from qmamba.errors import UsageError
from qmamba.models import build_model, list_models
from qmamba.models.flops import CONVENTION, count_flops

__all__ = ["BASELINES", "PUBLISHED_GFLOPS", "catalogue", "main"]

# The paper's baselines (method.md §8.2-8.3), as timm names them
BASELINES = ("timm:swin_tiny_patch4_window7_224", "timm:swin_base_patch4_window7_224", "timm:vit_base_patch16_224",
             "timm:resnet50")
# At 224x224: QMamba's paper (Tables 1-2, method.md §3.2) and timm's model cards (GMACs, fvcore's count)
PUBLISHED_GFLOPS = {
    "qmamba_tiny": 4.47, "qmamba_small": 8.71, "qmamba_base": 15.35,
    "lqmamba_tiny": 4.44, "lqmamba_small": 8.66, "lqmamba_base": 15.30,
    "timm:swin_tiny_patch4_window7_224": 4.51, "timm:swin_base_patch4_window7_224": 15.47,
    "timm:vit_base_patch16_224": 17.58, "timm:resnet50": 4.11,
}


def catalogue(names: list[str], size: int = 224) -> list[dict[str, Any]]:
    """One row per model: backbone parameters and GFLOPs of one ``size`` x ``size`` image."""
    rows = []
    for name in names:
        with torch.random.fork_rng():  # the weights' values do not matter to a count; the caller's RNG does
            model = build_model(name)
        rows.append({"name": name, "params": model.num_params(include_head=False),
                     "gflops": round(count_flops(model, size).gflops, 4), "size": size,
                     "published_gflops": PUBLISHED_GFLOPS.get(name) if size == 224 else None})
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="presets or timm:<model> names (default: every preset and the paper's baselines)")
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels (default 224)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    args = parser.parse_args(argv)
    if args.size < 16:
        raise UsageError(f"--size {args.size} is smaller than any model's patch stem; give 16 or more")
    names = args.names or [*list_models(), *_available_baselines()]
    rows = catalogue(names, args.size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    width = max(len(row["name"]) for row in rows)
    print(f"GFLOPs of one {args.size}x{args.size} image: {CONVENTION}; params: the backbone's (no head)")
    print(f"{'model':<{width}}  {'params (M)':>10}  {'GFLOPs':>8}  {'published':>9}")
    for row in rows:
        published = "" if row["published_gflops"] is None else f"{row['published_gflops']:.2f}"
        print(f"{row['name']:<{width}}  {row['params'] / 1e6:>10.2f}  {row['gflops']:>8.2f}  {published:>9}")


def _available_baselines() -> list[str]:
    """The baselines when timm is installed; otherwise a line saying how to add them."""
    try:
        import timm  # noqa: F401
    except ImportError:
        print('(the paper\'s Swin, ViT and ResNet baselines need timm: pip install "qmamba[timm]")', file=sys.stderr)
        return []
    return list(BASELINES)
