"""The ``qmamba`` command: LightningCLI subcommands (fit, validate, test, predict) plus data and utility commands.

    qmamba fit --config configs/demo.yaml
    qmamba test --config runs/demo/config.yaml --ckpt_path runs/demo/checkpoints/best.ckpt
    qmamba test --config runs/demo/config.yaml --ckpt_path best        # alias resolved inside the run folder
    qmamba demo-data --out data/demo
    qmamba benchmark --config configs/task/livec.yaml --splits 10   # the N-split protocol (median SRCC/PLCC)
    qmamba score --ckpt_path runs/demo/checkpoints/best.ckpt photos/ -o scores.csv
    qmamba export --ckpt_path runs/demo/checkpoints/best.ckpt --output qmamba.onnx
    qmamba transfer --source runs/x/checkpoints/best.ckpt --config configs/task/livec.yaml --methods all
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query the package index on import

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

import qmamba  # noqa: E402
from qmamba.training.callbacks import AtomicCheckpointIO, PlainProgress, RunCheckpoint  # noqa: E402

__all__ = ["QMambaCLI", "fit_then_test", "main", "run_lightning_cli", "split_passthrough"]

log = logging.getLogger("qmamba")
CHECKPOINT_ALIASES = ("best", "last")


class QMambaCLI(LightningCLI):
    """LightningCLI with qmamba's defaults: fixed ``runs/<name>/checkpoints/{best,last}.ckpt``, a CPU fallback for
    mixed precision, atomic checkpoint writes, and ``best``/``last`` checkpoint aliases in a fresh process."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/srcc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.auto_insert_metric_name": False,  # metric names contain '/'
            "checkpoint.enable_version_counter": False,  # overwrite best.ckpt instead of best-v1.ckpt
        })

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") in CHECKPOINT_ALIASES:
            alias = self.config[subcommand]["ckpt_path"]
            path = run_dir(self.config[subcommand]) / "checkpoints" / f"{alias}.ckpt"
            if not path.is_file():
                self.parser.error(f"--ckpt_path {alias}: {path} does not exist; pass the checkpoint file instead")
            self.config[subcommand]["ckpt_path"] = str(path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        precision = str(config.trainer.precision)
        on_cpu = str(config.trainer.accelerator) == "cpu" or not torch.cuda.is_available()
        if "mixed" in precision and on_cpu:
            # CPU bf16 autocast gave no reliable speed-up for QMamba on the 2-core CI machine; fp32 is exact
            log.warning("precision %s is meant for GPUs; no GPU here, so running in 32-true on the CPU", precision)
            config.trainer.precision = "32-true"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        save_config = self.save_config_callback
        if self.subcommand != "fit":  # keep the run's config.yaml as the fit wrote it
            self.save_config_callback = None
        try:
            trainer = super().instantiate_trainer(**kwargs)
        finally:
            self.save_config_callback = save_config
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not sys.stderr.isatty():  # a log or CI: whole lines instead of the default bar's carriage returns
            trainer.callbacks[:] = [PlainProgress() if type(cb) is TQDMProgressBar else cb for cb in trainer.callbacks]
        return trainer


def run_dir(config: Any) -> Path:
    """``<save_dir>/<name>`` of the run's TensorBoard logger in a parsed subcommand config."""
    logger = config.trainer.logger
    init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
    save_dir = getattr(init, "save_dir", "runs") if init is not None else "runs"
    name = getattr(init, "name", "default") if init is not None else "default"
    return Path(save_dir) / str(name)


def run_lightning_cli(args: ArgsType) -> None:
    """One LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with qmamba's classes."""
    from qmamba.data import IQADataModule
    from qmamba.training import QMambaIQA

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    QMambaCLI(
        QMambaIQA,
        IQADataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={
            # the DataModule shards data itself (MultiDatasetBatchSampler, unpadded evaluation shards)
            "use_distributed_sampler": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "default", "version": ""}},
        },
        parser_kwargs={"version": f"qmamba {qmamba.__version__}"},
        args=args,
    )


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
        run_lightning_cli(fit)
        run_lightning_cli(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
        if not results.is_file():
            raise RuntimeError(f"testing {run} wrote no {results}")
    return json.loads(results.read_text())


# commands besides LightningCLI's: each module's main(argv), imported only when called
EXTRA_COMMANDS = {"demo-data": "qmamba.data.demo", "benchmark": "qmamba.benchmark", "transfer": "qmamba.transfer",
                  "score": "qmamba.scoring", "export": "qmamba.export"}


def main(args: ArgsType = None) -> None:
    """Entry point of the ``qmamba`` console script (``args`` lets tests call it in-process)."""
    argv = sys.argv[1:] if args is None else args
    from qmamba.checkpoint import CheckpointError
    from qmamba.data import DatasetError

    try:
        if isinstance(argv, list) and argv and argv[0] in EXTRA_COMMANDS:
            importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(list(argv[1:]))
        else:
            run_lightning_cli(args)
    except (DatasetError, CheckpointError) as err:  # user-fixable input problems: a message, not a traceback
        print(f"qmamba: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
