"""Transferable IQA: tune a trained QMamba on a new dataset with StylePrompt (or a baseline) as a Lightning callback.

    trainer:
      callbacks:
        - class_path: qmamba.training.PromptTuning
          init_args: {source: runs/source/checkpoints/best.ckpt, method: styleprompt}

The callback loads the source weights, attaches the prompts, freezes everything else (and keeps frozen modules in
eval mode, so drop-path stays off), and at the end writes ``tuned.pt``: only the tuned parameters plus what is needed
to rebuild them, a few percent of a full checkpoint. :func:`load_tuned` puts them back on top of the source model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from qmamba.files.checkpoint import CheckpointError, model_state, read_checkpoint, save_atomic
from qmamba.models.prompts import PROMPT_METHODS, PromptMethod, attach_prompts, check_prompt_target, has_prompts

__all__ = ["TUNING_METHODS", "PromptTuning", "load_tuned", "tuned_state"]

log = logging.getLogger(__name__)

TuningMethod = Literal[PromptMethod, "head", "full"]  # the prompt methods, a linear probe, full fine-tuning
TUNING_METHODS: tuple[str, ...] = get_args(TuningMethod)


def _model_state(path: str | Path, trusted: bool) -> dict[str, torch.Tensor]:
    """The QMamba weights of a qmamba Lightning checkpoint (``model.*`` keys) or of a plain model state dict."""
    return model_state(read_checkpoint(path, trusted=trusted))


class PromptTuning(BaseFinetuning):
    """Freeze a source model and train prompts (or a baseline's parameters) on the target dataset.

    Args:
        source: checkpoint of the source model (a qmamba ``.ckpt``); ignored when resuming a tuning run.
        method: ``styleprompt`` (ICML form), ``static`` (v1 mean/variance prompts), ``ssf`` (scale-shift after
            every norm/linear/conv), ``head`` (linear probe) or ``full`` (full fine-tuning).
        where: StylePrompt after every block of a stage (``block``) or after each stage (``stage``).
        num_prompts, reduction: StylePrompt's bank size and hidden-width divisor.
        train_head: also train the quality head (default; the paper's budget includes it).
        trust_checkpoint: allow a pickled (non weights-only) source checkpoint.
        output: file name of the tuned-parameters checkpoint, written in the run folder.
    """

    def __init__(
        self,
        source: str | None = None,
        method: TuningMethod = "styleprompt",
        where: Literal["block", "stage"] = "block",
        num_prompts: int = 8,
        reduction: int = 4,
        train_head: bool = True,
        trust_checkpoint: bool = False,
        output: str = "tuned.pt",
    ) -> None:
        super().__init__()
        if method not in TUNING_METHODS:
            raise ValueError(f"unknown tuning method {method!r}; choose from {TUNING_METHODS}")
        self.source, self.method, self.where = source, method, where
        self.num_prompts, self.reduction, self.train_head = num_prompts, reduction, train_head
        self.trust_checkpoint, self.output = trust_checkpoint, output
        self.counts = (0, 0)

    @property
    def prompt_config(self) -> dict[str, Any]:
        return {"method": self.method, "where": self.where, "num_prompts": self.num_prompts,
                "reduction": self.reduction}

    def check(self, model: nn.Module) -> None:
        """One line when the method cannot tune ``model`` (StylePrompt on a timm backbone), before a run starts."""
        if self.method in PROMPT_METHODS:
            check_prompt_target(model.backbone, self.method)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        resuming = stage == "fit" and trainer.ckpt_path is not None
        if stage == "fit" and not resuming:
            if not self.source:
                raise CheckpointError("PromptTuning needs 'source': the checkpoint of the model to transfer")
            model.load_state_dict(_model_state(self.source, self.trust_checkpoint))
            log.info("transfer: source weights from %s", self.source)
        if self.method in PROMPT_METHODS and not has_prompts(model):
            attach_prompts(model, **self.prompt_config)
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        if self.method != "full":
            self.freeze(model.backbone)
            if not (self.train_head or self.method == "head"):
                self.freeze(model.head)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.counts = (trainable, sum(p.numel() for p in model.parameters()))
        log.info("transfer (%s): training %d of %d parameters (%.2f%%)", self.method, *self.counts,
                 100 * self.counts[0] / self.counts[1])

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Nothing is unfrozen later: the tuned set is fixed for the whole run."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.method != "full":  # Lightning puts the whole module in train mode each epoch; frozen parts stay eval
            for module in pl_module.model.backbone.modules():
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"transfer/trainable_params": self.counts[0],
                                            "transfer/total_params": self.counts[1]})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the prompt layout, so the checkpoint alone rebuilds the tuned model (``qmamba score``)."""
        if self.method in PROMPT_METHODS:
            checkpoint.setdefault("qmamba", {})["prompts"] = self.prompt_config

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the tuned parameters of the best checkpoint (or of the final weights) to ``<run>/tuned.pt``."""
        log_dir = trainer.log_dir  # a broadcast under DDP: asked on every rank
        if not trainer.is_global_zero or not log_dir:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        state = _model_state(best, trusted=False) if best else pl_module.model.state_dict()
        payload = tuned_state(pl_module.model, state, self.prompt_config, self.source, self.counts)
        save_atomic(payload, Path(log_dir) / self.output)
        log.info("transfer: tuned parameters (%s) written to %s", best or "final weights", Path(log_dir) / self.output)


def tuned_state(model: nn.Module, state: dict[str, torch.Tensor], prompt_config: dict[str, Any], source: str | None,
                counts: tuple[int, int]) -> dict[str, Any]:
    """The tuned subset of ``state`` (the entries of ``model``'s trainable parameters) with its rebuild recipe."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {
        "format": "qmamba-tuned-v1",
        "prompts": prompt_config,
        "source": source,
        "trainable_params": counts[0],
        "total_params": counts[1],
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items() if k in trainable},
    }


def load_tuned(model: nn.Module, tuned: str | Path | dict[str, Any]) -> nn.Module:
    """Put tuned parameters (from ``tuned.pt``) on a model that already holds the source weights: attaches the
    prompts the file describes, then loads its tensors (every one must match)."""
    payload = tuned if isinstance(tuned, dict) else read_checkpoint(tuned)
    if payload.get("format") != "qmamba-tuned-v1":
        raise CheckpointError(f"{tuned} is not a qmamba tuned-parameters file (tuned.pt written by PromptTuning)")
    config = payload["prompts"]
    if config["method"] in PROMPT_METHODS and not has_prompts(model):
        attach_prompts(model, **config)
    own = model.state_dict()
    unknown = sorted(set(payload["state_dict"]) - set(own))
    if unknown:
        raise CheckpointError(f"tuned parameters do not fit this model (different source preset?): {unknown[:5]}")
    own.update(payload["state_dict"])
    model.load_state_dict(own)
    return model
