"""Callbacks and plugins: run checkpoints (best and last), prediction CSV writer, atomic checkpoint writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qmamba.atomic import write_text_atomic
from qmamba.checkpoint import save_atomic

__all__ = ["AtomicCheckpointIO", "PredictionWriter", "RunCheckpoint"]


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
