"""LightningCLI for qmamba's fit, validate, test and predict: run folders, checkpoint aliases, CPU precision.

    qmamba fit --config configs/recipe.yaml --config configs/task/koniq10k.yaml
    qmamba test --config runs/koniq10k/config.yaml --ckpt_path best        # alias resolved inside the run folder
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query the package index on import

import torch  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, TQDMProgressBar  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

import qmamba  # noqa: E402
from qmamba.data import IQADataModule  # noqa: E402
from qmamba.errors import QMambaError, UsageError, is_disk_full  # noqa: E402
from qmamba.files.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from qmamba.files.config_files import check_config_args  # noqa: E402
from qmamba.files.run_folder import RunLock, prepare_fit_folder  # noqa: E402
from qmamba.files.weights import ensure_pretrained  # noqa: E402
from qmamba.models.timm_backbone import ensure_timm_pretrained, is_timm_name  # noqa: E402
from qmamba.redaction import log_to_stderr  # noqa: E402
from qmamba.training.callbacks import (  # noqa: E402
    AtomicCheckpointIO,
    FlopsModelSummary,
    PlainProgress,
    PredictionWriter,
    RunCheckpoint,
)
from qmamba.training.module import QMambaIQA  # noqa: E402
from qmamba.training.prompt_tuning import PromptTuning  # noqa: E402

__all__ = ["QMambaCLI", "main", "refuse_unclippable_optimizer", "run_dir", "run_lightning_cli"]

log = logging.getLogger("qmamba")
CHECKPOINT_ALIASES = ("best", "last")
_HELD_LOCKS: list[RunLock] = []  # run-folder locks of the fits this process runs, released when each ends


class QMambaArgumentParser(LightningArgumentParser):
    """Parse errors as one line that names the key and the problem, instead of the full usage and jsonargparse's
    dump of every type it tried (``QMAMBA_DEBUG=1`` shows the original)."""

    NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type",
             "Expected a <class 'NoneType'>")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if os.environ.get("QMAMBA_DEBUG") or not self.exit_on_error:
            super().error(message, ex)
        lines = [line.strip(" -") for line in message.splitlines()]
        text = " ".join(line for line in lines if line and not line.startswith(self.NOISE) and "NestedArg(" not in line)
        words = self.prog.replace(" [options]", "").split()  # "<program> fit", whatever started Python
        command = " ".join(["qmamba", *words[1:]])
        sys.stderr.write(f"qmamba: error: {text} (`{command} --help` lists the options)\n")
        raise SystemExit(2)


class QMambaCLI(LightningCLI):
    """LightningCLI with qmamba's defaults: fixed ``runs/<name>/checkpoints/{best,last}.ckpt``, a CPU fallback for
    mixed precision, atomic checkpoint writes, ``best``/``last`` checkpoint aliases in a fresh process, and the
    scheduler's ``max_epochs`` linked to the trainer's."""

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
        # a schedule that needs the run length (WarmupCosine) gets the trainer's: one number to change, not two
        parser.link_arguments("trainer.max_epochs", "model.init_args.scheduler.init_args.max_epochs", apply_on="parse")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: replace the run already in the run folder (otherwise fit refuses it)")

    def before_test(self) -> None:
        """qmamba's table (one row per dataset, :meth:`QMambaIQA._report_test`) is the test's; Lightning's own put
        every dataset's metrics under every dataloader's column, a second table that said less."""
        self.config_init["test"]["verbose"] = False

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") in CHECKPOINT_ALIASES:
            alias = self.config[subcommand]["ckpt_path"]
            path = run_dir(self.config[subcommand]) / "checkpoints" / f"{alias}.ckpt"
            if not path.is_file():
                self.parser.error(f"--ckpt_path {alias}: {path} does not exist; pass the checkpoint file instead")
            self.config[subcommand]["ckpt_path"] = str(path)

    def _parse_ckpt_path(self) -> None:
        """Keep the config as given when a checkpoint path is passed. LightningCLI would re-parse the checkpoint's
        hyper-parameters into the model's arguments, which resets those they lack (the optimizer and the scheduler,
        which are not saved) to their defaults: a resumed run would silently train with another learning rate and
        no schedule. A qmamba run's config.yaml already holds every argument."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        accelerator = str(config.trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise UsageError(f"the config asks for trainer.accelerator: {accelerator} and no CUDA GPU is visible here; "
                             "run it on a GPU machine, or add --trainer.accelerator cpu (slow for the paper recipes)")
        if config.get("ckpt_path"):  # Lightning's own loading would end in a traceback for a bad file
            checkpoint = read_checkpoint(config.ckpt_path, trusted=config.get("weights_only") is False, lazy=True)
            if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                raise CheckpointError(f"{config.ckpt_path} is not a checkpoint written by qmamba training (a plain "
                                      "state dict?); pass a runs/<name>/checkpoints/*.ckpt file")
            epochs, max_epochs = checkpoint.get("epoch"), config.trainer.max_epochs
            if self.subcommand == "fit" and isinstance(epochs, int) and max_epochs not in (None, -1) \
                    and epochs > max_epochs:
                raise UsageError(f"--ckpt_path {config.ckpt_path} has trained past --trainer.max_epochs {max_epochs} "
                                 f"(its epoch counter is {epochs}): a resumed run can only go on; raise "
                                 "--trainer.max_epochs, or evaluate the checkpoint with qmamba test")
        model = config.model.init_args
        if self.subcommand == "fit" and model.get("pretrained") and not config.ckpt_path:
            # download or fail now, not after loading the data
            (ensure_timm_pretrained if is_timm_name(model.backbone) else ensure_pretrained)(model.backbone,
                                                                                             model.pretrained)
        precision = str(config.trainer.precision)
        on_cpu = accelerator == "cpu" or not torch.cuda.is_available()
        if "mixed" in precision and on_cpu:
            # CPU bf16 autocast gave no reliable speed-up for QMamba on the 2-core CI machine; fp32 is exact
            log.warning("precision %s is meant for GPUs; no GPU here, so running in 32-true on the CPU", precision)
            config.trainer.precision = "32-true"

    def instantiate_classes(self) -> None:
        """Instantiate, then claim the run folder: what Lightning refuses (``--trainer.devices 0``) and what torch
        refuses (``lr -1``) is refused before the folder exists, so a corrected rerun is not blocked by it."""
        super().instantiate_classes()
        if self.subcommand != "fit":
            return
        optimizer, _ = self.model.build_optimizer()  # discarded: the fit builds its own
        refuse_unclippable_optimizer(self.trainer, optimizer)
        for callback in self.trainer.callbacks:
            if isinstance(callback, PromptTuning):
                callback.check(self.model.model)
        if isinstance(self.datamodule, IQADataModule):
            self.datamodule.prepare()  # every label, image and split problem, before the run folder exists
            self._monitor_comparisons(self.datamodule)
        config = self.config[self.subcommand]
        if rank_zero_only.rank == 0:  # DDP's other ranks join the folder rank 0 holds
            _HELD_LOCKS.append(prepare_fit_folder(run_dir(config), resuming=bool(config.ckpt_path),
                                                  overwrite=config.overwrite))
            config.overwrite = False  # the saved config.yaml must not replace the run again when reused

    def _monitor_comparisons(self, datamodule: IQADataModule) -> None:
        """A run on comparisons alone has no SRCC: its best checkpoint follows the held-out pairwise accuracy."""
        if all(c.comparisons is not None for c in datamodule.configs):
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, RunCheckpoint) and callback.monitor == "val/srcc":
                    callback.monitor = "val/pair_accuracy"
                    log.info("checkpoint.monitor: val/pair_accuracy (the run's datasets are comparisons, which have "
                             "no SRCC; --checkpoint.monitor sets another)")

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
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
            trainer.callbacks.append(PredictionWriter())  # predictions nobody keeps would be computed for nothing
            log.info("predict: writing predictions.csv into the run folder (add a prediction writer to change it)")
        trainer.callbacks[:] = [FlopsModelSummary(max_depth=cb._max_depth) if type(cb) is ModelSummary else cb
                                for cb in trainer.callbacks]  # Lightning's default summary, with the paper's FLOPs
        if not sys.stderr.isatty():  # a log or CI: whole lines instead of the default bar's carriage returns
            trainer.callbacks[:] = [PlainProgress() if type(cb) is TQDMProgressBar else cb for cb in trainer.callbacks]
        return trainer


def refuse_unclippable_optimizer(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Lightning's mixed precision cannot clip the gradients of an optimizer that unscales them itself (torch's fused
    ones, ``_step_supports_amp_scaling``): it raises a RuntimeError at the first step, after the data has loaded and
    the run folder exists. Refuse the pair before, in one line."""
    clip = trainer.gradient_clip_val
    if isinstance(trainer.precision_plugin, MixedPrecision) and clip and \
            getattr(optimizer, "_step_supports_amp_scaling", False):
        raise UsageError(f"model.init_args.optimizer: a fused {type(optimizer).__name__} unscales its own gradients, "
                         f"which Lightning cannot clip under trainer.precision {trainer.precision} with "
                         f"trainer.gradient_clip_val {clip}; set --model.init_args.optimizer.init_args.fused false, or "
                         "--trainer.gradient_clip_val 0")


def run_dir(config: Any) -> Path:
    """``<save_dir>/<name>`` of the run's TensorBoard logger in a parsed subcommand config."""
    logger = config.trainer.logger
    init = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
    save_dir = getattr(init, "save_dir", "runs") if init is not None else "runs"
    name = getattr(init, "name", "default") if init is not None else "default"
    return Path(save_dir) / str(name)


def run_lightning_cli(args: ArgsType) -> None:
    """One LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) with qmamba's classes."""
    log_to_stderr()
    torch.set_float32_matmul_precision("high")
    try:
        _run_cli(args)
    except SIGTERMException:  # Lightning's graceful stop exits 0, as if the run had finished (RunCheckpoint says where)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:  # jsonargparse wraps errors raised while instantiating classes: unwrap the user's one
        cause = _user_error(err, args)
        if cause is None:
            raise
        raise cause from None
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()


def _subcommand(args: ArgsType) -> str:
    words = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []
    return next((w for w in words if w in ("fit", "validate", "test", "predict")), "fit")


def _user_error(err: BaseException | None, args: ArgsType) -> QMambaError | None:
    """The first :class:`QMambaError` in an exception's chain of causes; Lightning's refusal of a trainer option
    (``devices 0``, ...) as a usage error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, QMambaError):
            return err
        if is_disk_full(err):
            return QMambaError(f"no space left on the device while writing "
                               f"{getattr(err, 'filename', None) or 'the run folder'}: "
                               "free space, then rerun (with --ckpt_path last to resume from the last complete "
                               "checkpoint, which a failed write never replaces)")
        if isinstance(err, MisconfigurationException):
            return UsageError(f"{str(err).strip()} (`qmamba {_subcommand(args)} --help` lists the trainer options)")
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _run_cli(args: ArgsType, cli: type[QMambaCLI] = QMambaCLI, run: bool = True) -> QMambaCLI:
    if args is None or isinstance(args, list):  # bounded before jsonargparse expands them
        check_config_args(sys.argv[1:] if args is None else args)
    return cli(
        QMambaIQA,
        IQADataModule,
        parser_class=QMambaArgumentParser,
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
        run=run,
    )


def main(argv: list[str] | None) -> None:
    """``qmamba fit|validate|test|predict ...``: LightningCLI parses the subcommand itself (``None``: sys.argv)."""
    run_lightning_cli(argv)
