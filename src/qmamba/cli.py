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

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query the package index on import

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

import qmamba  # noqa: E402
from qmamba.training.callbacks import AtomicCheckpointIO, RunCheckpoint  # noqa: E402

__all__ = ["QMambaCLI", "main", "run_lightning_cli"]

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


def _demo_data(argv: list[str]) -> None:
    from qmamba.data.demo import main as demo_main

    demo_main(argv)


def _benchmark(argv: list[str]) -> None:
    from qmamba.benchmark import main as benchmark_main

    benchmark_main(argv)


def _transfer(argv: list[str]) -> None:
    from qmamba.transfer import main as transfer_main

    transfer_main(argv)


def _score(argv: list[str]) -> None:
    from qmamba.scoring import main as score_main

    score_main(argv)


def _export(argv: list[str]) -> None:
    from qmamba.export import main as export_main

    export_main(argv)


EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "demo-data": _demo_data, "benchmark": _benchmark, "transfer": _transfer, "score": _score, "export": _export}


def main(args: ArgsType = None) -> None:
    """Entry point of the ``qmamba`` console script (``args`` lets tests call it in-process)."""
    argv = sys.argv[1:] if args is None else args
    from qmamba.checkpoint import CheckpointError
    from qmamba.data import DatasetError

    try:
        if isinstance(argv, list) and argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](list(argv[1:]))
        else:
            run_lightning_cli(args)
    except (DatasetError, CheckpointError) as err:  # user-fixable input problems: a message, not a traceback
        print(f"qmamba: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
