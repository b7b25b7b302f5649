"""Helpers of the commands that run whole fits (``qmamba benchmark``, ``qmamba transfer``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qmamba.training.cli import run_lightning_cli

__all__ = ["config_args", "fit_then_test", "split_passthrough"]


def config_args(configs: str | Sequence[str]) -> list[str]:
    """``--config`` arguments for one config file or several layered ones (later files override earlier ones)."""
    return [arg for config in ([configs] if isinstance(configs, str) else configs) for arg in ("--config", config)]


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own arguments, arguments after --)``: commands that run fits pass the latter on to every fit/test."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def fit_then_test(fit: list[str], run: Path) -> dict[str, Any]:
    """Fit a run (resuming from its ``last.ckpt`` when an earlier attempt stopped), test its ``best.ckpt`` and return
    its ``test_results.json``; a run that already has results is not touched. ``run`` is the fit's run folder."""
    results = run / "test_results.json"
    if not results.is_file():
        if (run / "checkpoints" / "last.ckpt").is_file():
            fit = [*fit, "--ckpt_path", "last"]
        elif (run / "config.yaml").is_file():  # an attempt that stopped before its first checkpoint: nothing to keep
            fit = [*fit, "--overwrite", "true"]
        run_lightning_cli(fit)
        run_lightning_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
        if not results.is_file():
            raise RuntimeError(f"testing {run} wrote no {results}")
    return json.loads(results.read_text())
