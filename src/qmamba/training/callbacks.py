"""Callbacks and plugins: run checkpoints (best and last), prediction CSV writer, atomic checkpoint writes, plain
progress lines for logs."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import ModelSummary as LightningSummary

from qmamba.files.atomic import write_text_atomic
from qmamba.files.checkpoint import save_atomic
from qmamba.models.flops import CONVENTION, flop_counter

__all__ = ["AtomicCheckpointIO", "FlopsModelSummary", "PlainProgress", "PredictionWriter", "RunCheckpoint"]

log = logging.getLogger(__name__)


class PlainProgress(ProgressBar):
    """Progress as whole lines, for logs and CI where a progress bar's carriage returns pile up: a line every
    ``interval`` seconds within a training epoch and one at its end with the epoch's time and logged metrics."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval, self._enabled = interval, True
        self._start = self._last = time.monotonic()
        self._validated: int | None = None  # the epoch of the latest validation, whose metrics stay logged after it

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, trainer: L.Trainer, message: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._say(trainer, f"epoch {trainer.current_epoch}: step {batch_idx + 1}/{self.total_train_batches} "
                               f"({(batch_idx + 1) / (now - self._start):.1f} it/s)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The epoch's line; validation metrics of an earlier epoch (``check_val_every_n_epoch``) say which."""
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = [_shown({k: v for k, v in metrics.items() if not k.startswith("val/")})]
        validation = _shown({k: v for k, v in metrics.items() if k.startswith("val/")})
        if validation and self._validated is not None:  # none before the first validation (a sanity check's)
            stale = self._validated != trainer.current_epoch
            parts.append(validation + (f" (validated after epoch {self._validated})" if stale else ""))
        shown = "; ".join(part for part in parts if part)
        self._say(trainer, f"epoch {trainer.current_epoch} done in {time.monotonic() - self._start:.1f} s"
                           + (f": {shown}" if shown else ""))


def _shown(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a crash never leaves a truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        save_atomic(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state at the end of every training epoch.

    Since Lightning 2.6, ``save_last`` writes ``last.ckpt`` only together with a new top-k checkpoint: with
    ``save_top_k=1`` it is a copy of the best one, and resuming from it would silently repeat every epoch after the
    best. This restores "last means latest"; ``best.ckpt`` still follows the monitored metric. Epoch-end validation
    (and its top-k save) runs before ``on_train_epoch_end``, so the latest state includes it.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # skipped when this step is already saved (a new best writes last.ckpt too), in sanity checks and outside fit
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A fit stopped by SIGTERM says where it stopped and what resumes it: ``last.ckpt``, the end of the last
        whole epoch (the run's seeded draws make that resume end where the uninterrupted run would)."""
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        last = Path(self.dirpath or "") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        resume = (f"resume with --ckpt_path last (from {last}, the end of the last whole epoch)" if last.is_file()
                  else "no epoch had ended, so there is nothing to resume: rerun the fit with --overwrite true")
        print(f"qmamba fit: SIGTERM in epoch {trainer.current_epoch} (step {trainer.global_step}): stopped; {resume}",
              file=sys.stderr)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (dataset, path, score on the dataset's native scale) into the run folder.

    Args:
        output: file name or path; relative paths are resolved inside the trainer's log dir.
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        per_loader = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        rows = [(batch["dataset"], path, score) for loader in per_loader for batch in loader
                for path, score in zip(batch["path"], batch["score"], strict=True)]
        path = Path(self.output)
        if not path.is_absolute():
            path = Path(trainer.log_dir or ".") / path  # log_dir broadcasts under DDP: asked on every rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shards: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, rows)  # each rank predicted its own shard
            rows = sorted(row for shard in shards for row in shard)
        if not trainer.is_global_zero:
            return
        write_text_atomic(path, pd.DataFrame(rows, columns=["dataset", "path", "score"]).to_csv(index=False))


class _PaperFlopsSummary(LightningSummary):
    """Lightning's summary of a module, its FLOPs column counted by :data:`qmamba.models.flops.CONVENTION`
    (Lightning's own counter says two per multiply-add and 0 for qmamba's scan and for attention on the CPU)."""

    def summarize(self) -> dict[str, Any]:
        self._flop_counter = flop_counter(depth=self._max_depth + 1)
        return super().summarize()


class FlopsModelSummary(ModelSummary):
    """The model summary at the start of a fit, with the paper's FLOPs of one example crop
    (``example_input_array``, set from the data's crop size) and a line naming how they are counted."""

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> LightningSummary:
        return _PaperFlopsSummary(pl_module, max_depth=self._max_depth)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not (self._max_depth and trainer.is_global_zero):
            return
        example = pl_module.example_input_array
        if isinstance(example, torch.Tensor):
            log.info("Total Flops: one forward of a %s crop; %s", "x".join(map(str, example.shape)), CONVENTION)
        else:
            log.info("Total Flops: not counted for a compiled run (qmamba models BACKBONE --size CROP counts them)")
