"""The IQA LightningModule: QMamba regression (or learning from comparisons) with per-dataset metrics, multi-crop
evaluation and scatter plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import CatMetric

import qmamba
from qmamba.data import IQADataModule
from qmamba.errors import QMambaError, UsageError
from qmamba.files.atomic import write_text_atomic
from qmamba.files.checkpoint import CheckpointError
from qmamba.inference.scale import ScoreScale
from qmamba.inference.trained import DataSpec, build_architecture
from qmamba.models import load_pretrained
from qmamba.models.compiling import compile_model, run_compiled
from qmamba.ops.selective_scan import BACKEND_DESCRIPTIONS, resolve_backend
from qmamba.training.losses import LOGISTIC_SPREAD, IQALoss, Link
from qmamba.training.metrics import iqa_metrics, pair_metrics
from qmamba.training.optimizers import fused_on_cpu
from qmamba.training.plots import scatter_figure

__all__ = ["QMambaIQA"]

log = logging.getLogger(__name__)
COMPILE_OPTION = "--model.compile true"


class QMambaIQA(L.LightningModule):
    """No-reference IQA with a QMamba regressor trained on unit-scale scores (higher = better), on comparisons, or
    on both (:mod:`qmamba.training.losses`).

    Args:
        backbone: registered backbone (``qmamba_tiny``, ``lqmamba_small``, ``qmamba_test``, ...).
        pretrained: ``imagenet`` (the backbone's official VMamba ImageNet checkpoint, downloaded and cached on first
            use) or the path of such a file, loaded into the backbone when a fit starts (not when it resumes).
        trust_checkpoint: allow full unpickling of ``pretrained`` (only for files you trust).
        backbone_args: preset overrides, e.g. ``{drop_path_rate: 0.1, scan_backend: torch, dim: 24}``.
        head_features: backbone features pooled by the head (``pooled``; ``stage2`` etc. for multi-scale).
        head_hidden: hidden width of an optional MLP head.
        head_dropout: dropout before the regressor.
        loss: loss on unit-scale scores: a regression loss, or ``fidelity`` over the in-batch pairs of each
            dataset alone (scale-free: SRCC and the logistic-fitted PLCC stay meaningful, RMSE does not).
        smoothl1_beta: transition point of the smooth-L1 loss (scores lie in [0, 1]).
        plcc_weight: weight of an added (1 - PLCC) / 2 batch loss.
        rank_weight: weight of an added pairwise margin-ranking loss.
        fidelity_weight: weight of an added fidelity loss over the in-batch pairs of each dataset (LIQE's scheme).
        pair_link: ``thurstone`` (normal noise, probit) or ``bradley_terry`` (logistic) preference model, for
            comparisons datasets and the in-batch pairs.
        pair_sigma: each image's noise (standard deviation) in the preference model, in model-output units (the
            unit scale of scores); the ratings' own standard deviations replace it where a table gives them.
        optimizer: optimizer factory, called with parameter groups (no weight decay on norms, biases, A_logs, Ds).
        scheduler: optional epoch-wise LR scheduler factory.
        scatter_points: at most this many points per predicted-vs-MOS scatter figure.
        compile: run the regressor through ``torch.compile`` as one graph (:mod:`qmamba.models.compiling`); checkpoints
            are unchanged.
    """

    def __init__(
        self,
        backbone: str = "qmamba_tiny",
        pretrained: str | None = None,
        trust_checkpoint: bool = False,
        backbone_args: dict[str, Any] | None = None,
        head_features: tuple[str, ...] = ("pooled",),
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
        loss: Literal["smoothl1", "l1", "mse", "fidelity"] = "smoothl1",
        smoothl1_beta: float = 0.1,
        plcc_weight: float = 0.0,
        rank_weight: float = 0.0,
        fidelity_weight: float = 0.0,
        pair_link: Link = "thurstone",
        pair_sigma: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scatter_points: int = 2000,
        compile: bool = False,  # noqa: A002  (the option's name everywhere: --compile, compile: true)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model = build_architecture(backbone, backbone_args, head_features, head_hidden, head_dropout)
        try:
            self.criterion = IQALoss(loss, smoothl1_beta, plcc_weight, rank_weight, fidelity_weight=fidelity_weight,
                                     pair_link=pair_link, pair_sigma=pair_sigma)
        except ValueError as err:
            raise UsageError(f"model.init_args: {err}") from None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.spec = DataSpec()  # the datasets' names, scales and preprocessing: from the DataModule or a checkpoint
        self.pretrained_source: dict[str, Any] | None = None  # the weights the run started from: name, URL, SHA-256
        self.eval_stores = nn.ModuleDict()
        self._base_seed = 0

    def forward(self, images: Tensor) -> Tensor:
        """Unit-scale quality scores (B,) of a (B, 3, H, W) batch."""
        if self.hparams.compile:
            return run_compiled(self.model, images, COMPILE_OPTION)
        return self.model(images)

    # -------------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        self._base_seed = torch.initial_seed()  # seed_everything's: the same in a run and in its resumption
        if isinstance(self._datamodule(), IQADataModule):
            self._keep_fitted_scales(self.spec, self._datamodule().spec)  # a test after the fit, in one process
            if not self.hparams.compile:  # the summary's forward would compile an eval graph more
                size = self._datamodule().crop_size
                self.example_input_array = torch.zeros(1, 3, size, size)  # the model summary's FLOPs of one crop
        for split in ("val", "test"):
            for i in range(len(self.spec.datasets)):
                # NaN predictions are kept (and refused in _epoch_metrics), never dropped from the metrics
                self.eval_stores[f"{split}_{i}"] = nn.ModuleDict({
                    key: CatMetric(nan_strategy="disable") for key in ("preds", "target", "index")})
        if self.hparams.compile:
            compile_model(self.model, self.trainer.strategy.root_device, COMPILE_OPTION)

    def _datamodule(self) -> L.LightningDataModule | None:
        return self.trainer.datamodule if self._trainer is not None else None

    def _scan_backends(self) -> dict[str, str]:
        """``{requested: the backend it runs as on this device}`` for every selective scan of the model."""
        requested = sorted({m.scan_backend for m in self.model.modules() if hasattr(m, "scan_backend")})
        return {r: resolve_backend(r, self.device) for r in requested}

    def _log_scan_backend(self) -> None:
        """Say once per run which selective scan runs, so that a slow fallback is never silent."""
        for requested, resolved in self._scan_backends().items():
            log.info("selective scan on %s: %s%s", self.device, BACKEND_DESCRIPTIONS[resolved],
                     "" if requested == resolved else f", from scan_backend: {requested}")

    def on_fit_start(self) -> None:
        """Start from the pretrained backbone, unless the fit resumes (its checkpoint, restored before this hook,
        holds the weights and the record of where they started)."""
        if self.hparams.pretrained and not self.trainer.ckpt_path:
            self.pretrained_source, loaded = load_pretrained(self.model.backbone, self.hparams.backbone,
                                                             self.hparams.pretrained,
                                                             trusted=self.hparams.trust_checkpoint)
            log.info("backbone initialised from %s", loaded)
            if self.logger is not None:  # hparams.yaml and TensorBoard's HPARAMS tab; not the model's arguments
                self.logger.log_hyperparams({"pretrained_weights": self.pretrained_source})
        self._log_scan_backend()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Every epoch's random stream (dropout, drop-path) comes from (seed, epoch, rank) alone, so an epoch
        resumed from ``last.ckpt`` draws what the uninterrupted run drew. Seeded at the epoch's first step, not at
        its start: Lightning creates the epoch's loader (which draws from the stream) at different moments in a
        fresh and in a resumed run."""
        if batch_idx == 0:
            seed = np.random.SeedSequence([self._base_seed, self.current_epoch, self.global_rank]).generate_state(1)
            torch.manual_seed(int(seed[0]))

    def on_test_start(self) -> None:
        self._log_scan_backend()

    def on_predict_start(self) -> None:
        self._log_scan_backend()

    def configure_optimizers(self) -> Any:
        # fused on the CPU in fp32 (qmamba.training.optimizers); mixed precision cannot clip a fused step's gradients
        mixed = self._trainer is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimizer, scheduler = self.build_optimizer(prefer_fused=not mixed)
        decay, no_decay = ([p.numel() for p in group["params"]] for group in optimizer.param_groups[:2])
        fused = optimizer.defaults.get("fused") and self.device.type == "cpu"
        log.info("optimising %d of %d parameters (%d without weight decay)%s", sum(decay) + sum(no_decay),
                 sum(p.numel() for p in self.parameters()), sum(no_decay),
                 f" with {type(optimizer).__name__}'s fused CPU step" if fused else "")
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def build_optimizer(self, prefer_fused: bool = False) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer over the trainable parameters (weight decay off for norms, biases and marked parameters)
        and its scheduler, if any; ``prefer_fused``: a fused step on the CPU where the config leaves the choice to
        torch (:func:`~qmamba.training.optimizers.fused_on_cpu`). Options torch refuses (a negative lr or weight
        decay, betas outside [0, 1)) are one :class:`UsageError`; ``qmamba fit`` calls this before it creates the
        run folder."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False)
                (no_decay if skip else decay).append(param)

        def groups() -> list[dict[str, Any]]:
            return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

        try:
            build = self.optimizer_factory
            optimizer = fused_on_cpu(build, groups) if prefer_fused else build(groups())
            scheduler = None if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        except ValueError as err:  # torch's own checks
            raise UsageError(f"model.init_args.optimizer: {err}; fix it in the config or with "
                             "--model.init_args.optimizer.init_args.<name>") from None
        return optimizer, scheduler

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if "judged" in batch:  # comparisons: (B, 2, 3, h, w), both images of each pair in one forward
            scores = self.model(batch["image"].flatten(0, 1)).float().view(-1, 2)
            preds = scores[:, 0]
            loss = self.criterion.comparisons(scores[:, 0], scores[:, 1], batch["judged"].float(),
                                              batch["weight"].float())
        else:
            preds = self.model(batch["image"]).float()
            loss = self.criterion(preds, batch["target"].float(), batch["dataset"], batch["std"].float())
        if not torch.isfinite(loss):  # one scalar read per step; a NaN would otherwise end in an unrelated error
            lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else float("nan")
            raise QMambaError(f"the training loss became {loss.item()} at epoch {self.current_epoch}, step "
                              f"{self.global_step}: the run diverged (learning rate {lr:g}); lower "
                              "model.init_args.optimizer.init_args.lr or check the labels. last.ckpt keeps the last "
                              "finished epoch")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(preds))
        return loss

    # ------------------------------------------------------------------------------------- evaluation (crops)
    def _image_scores(self, images: Tensor) -> Tensor:
        """(B, n, 3, h, w) crops -> (B,) scores, each the mean over its image's crops (fp32)."""
        if images.dim() == 4:
            return self.model(images).float()
        batch, crops = images.shape[:2]
        return self.model(images.flatten(0, 1)).float().view(batch, crops).mean(1)

    def _store(self, split: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        store = self.eval_stores[f"{split}_{dataloader_idx}"]
        store["preds"].update(self._image_scores(batch["image"]))
        store["target"].update(batch["target"].float())
        store["index"].update(batch["index"].float())

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._store("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._store("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        unit = self._image_scores(batch["image"])
        scale = self.spec.scales[dataloader_idx]
        return {"path": list(batch["path"]), "score": scale.to_native(unit).tolist(),
                "dataset": self.spec.datasets[dataloader_idx]}

    def _epoch_metrics(self, split: str) -> dict[str, dict[str, float]]:
        """Compute (on every rank: it synchronises) and reset the metrics of each dataset, on its native scale."""
        results: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.spec.datasets):
            store = self.eval_stores[f"{split}_{i}"]
            if store["preds"].update_count == 0:
                continue
            outputs, target, index = (store[key].compute() for key in ("preds", "target", "index"))
            for metric in store.values():
                metric.reset()
            if not torch.isfinite(outputs).all():
                raise QMambaError(f"the model predicted NaN or inf for {int((~torch.isfinite(outputs)).sum())} of "
                                  f"{outputs.numel()} {split} images of {name} at epoch {self.current_epoch}: its "
                                  "weights are not finite (a diverged run?); use an earlier checkpoint or train "
                                  "again with a lower learning rate")
            pairs = self._held_out_pairs(split, i)
            if pairs is not None:
                results[name] = self._comparison_metrics(split, i, outputs, index.long(), pairs)
                continue
            scale = self.spec.scales[i]
            preds, target = scale.to_native(outputs), scale.to_native(target)
            results[name] = iqa_metrics(preds, target, logistic=split == "test")
            results[name]["images"] = float(preds.numel())
            if split == "val" and not self.trainer.sanity_checking:
                self._log_scatter(name, preds, target, results[name])
        for name, metrics in results.items():
            for key, value in metrics.items():
                if key != "images":
                    # identical on every rank (the stores gathered all shards); the mean-reduce keeps DDP quiet
                    self.log(f"{split}/{name}/{key}", value, add_dataloader_idx=False, sync_dist=True)
        for keys in (("srcc", "plcc"), ("pair_accuracy",)):  # means over the datasets that have them
            having = [m for m in results.values() if keys[0] in m]
            for key in keys if having else ():
                mean = sum(m[key] for m in having) / len(having)
                self.log(f"{split}/{key}", mean, prog_bar=split == "val", add_dataloader_idx=False, sync_dist=True)
        return results

    def _held_out_pairs(self, split: str, index: int) -> Any:
        datamodule = self._datamodule()
        return datamodule.held_out_pairs(split, index) if isinstance(datamodule, IQADataModule) else None

    def _comparison_metrics(self, split: str, index: int, outputs: Tensor, positions: Tensor,
                            pairs: Any) -> dict[str, float]:
        """Pairwise accuracy and log-likelihood of a comparisons dataset's held-out pairs, from the scores of the
        split's images (gathered from every rank, put back in order). In a fit's validation the dataset's scale is
        fitted to these images' scores: centred on their mean, their standard deviation as the unit."""
        count = max(int(positions.max()) + 1, int(pairs[["first", "second"]].to_numpy().max(initial=-1)) + 1)
        scores = torch.full((count,), float("nan"), dtype=torch.float64)
        scores[positions.cpu()] = outputs.double().cpu()
        scores_np = scores.numpy()
        scored = np.isfinite(scores_np)  # all of them, but in the sanity check's few batches
        pairs = pairs[scored[pairs["first"]] & scored[pairs["second"]]]
        first, second = pairs["first"].to_numpy(), pairs["second"].to_numpy()
        scores_np = np.where(scored, scores_np, 0.0)
        predicted = self.criterion.preference(torch.from_numpy(scores_np[first] - scores_np[second])).numpy()
        results = pair_metrics(scores_np, first, second, pairs["judged"].to_numpy(), pairs["weight"].to_numpy(),
                               predicted)
        results["images"] = float(scored.sum())
        if split == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking \
                and scores_np[scored].std() > 0:
            self.spec.scales[index] = self._fitted_scale(self.spec.datasets[index], float(scores_np[scored].mean()),
                                                         float(scores_np[scored].std()))
        return results

    def _fitted_scale(self, name: str, centre: float, spread: float) -> ScoreScale:
        """The scale of a model trained from the comparisons of ``name``, in words a reader of a score can use."""
        step = spread / self.criterion.pair_spread
        law = (f"Phi({step:.4g} * (s_A - s_B))" if self.criterion.link == "thurstone" else
               f"1 / (1 + exp(-{step * LOGISTIC_SPREAD:.4g} * (s_A - s_B)))")
        return ScoreScale.fitted_scale(centre, spread, (
            f"a {self.criterion.link.replace('_', '-').title()} scale fitted to the comparisons of {name}: 0 is the "
            f"mean of its validation images, 1 their standard deviation; P(A looks better than B) = {law}"))

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        results = self._epoch_metrics("test")
        self._report_test(results, self.trainer.log_dir)  # log_dir broadcasts: every rank must ask

    @rank_zero_only
    def _log_scatter(self, name: str, preds: Tensor, target: Tensor, metrics: dict[str, float]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        figure = scatter_figure(preds, target, f"{name} epoch {self.current_epoch}: SRCC {metrics['srcc']:.3f} "
                                f"PLCC {metrics['plcc']:.3f}", self.hparams.scatter_points)
        if figure is not None:
            experiment.add_figure(f"val/{name}/scatter", figure, global_step=self.global_step, close=True)

    @rank_zero_only
    def _report_test(self, results: dict[str, dict[str, float]], log_dir: str | None) -> None:
        """Print the final table and write ``test_results.json`` next to the run."""
        if not results:
            return
        lines = []
        scored = {name: m for name, m in results.items() if "srcc" in m}
        if scored:
            header = f"{'dataset':<16} {'images':>7} {'SRCC':>7} {'PLCC':>7} {'KRCC':>7} {'RMSE':>9} {'PLCC(4PL)':>10}"
            lines += [header, "-" * len(header)]
            for name, m in scored.items():
                lines.append(f"{name:<16} {int(m['images']):>7d} {m['srcc']:>7.4f} {m['plcc']:>7.4f} "
                             f"{m['krcc']:>7.4f} {m['rmse']:>9.4f} {m.get('plcc_logistic', float('nan')):>10.4f}")
        compared = {name: m for name, m in results.items() if "pair_accuracy" in m}
        if compared:
            header = f"{'dataset':<16} {'images':>7} {'pairs':>7} {'pair accuracy':>14} {'log-likelihood':>15}"
            lines += ([""] if lines else []) + [header, "-" * len(header)]
            for name, m in compared.items():
                lines.append(f"{name:<16} {int(m['images']):>7d} {int(m['pairs']):>7d} {m['pair_accuracy']:>14.4f} "
                             f"{m['log_likelihood']:>15.4f}")
        print("\n" + "\n".join(lines) + "\n", flush=True)
        if log_dir:
            payload = {"checkpoint": self.trainer.ckpt_path, "pretrained": self.pretrained_source, "results": results}
            write_text_atomic(Path(log_dir) / "test_results.json", json.dumps(payload, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything `qmamba score` needs besides the weights: datasets, score scales, preprocessing."""
        meta = checkpoint.setdefault("qmamba", {})  # PromptTuning may have added its part
        meta.update(self.spec.to_meta())
        meta["training"] = {"qmamba_version": qmamba.__version__, "device": self.device.type,
                            "scan_backends": sorted(set(self._scan_backends().values()))}
        if self.pretrained_source is not None:
            meta["pretrained"] = self.pretrained_source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_fits(checkpoint)
        meta = checkpoint.get("qmamba")
        if meta and not isinstance(self._datamodule(), IQADataModule):  # a run's own data wins (testing elsewhere)
            self.spec = DataSpec.from_meta(meta)
        elif meta:  # but a scale fitted to comparisons belongs to the weights: a resumed or tested run keeps it
            self._keep_fitted_scales(DataSpec.from_meta(meta), self.spec)
        if meta and meta.get("pretrained"):
            self.pretrained_source = meta["pretrained"]

    def _keep_fitted_scales(self, fitted: DataSpec, spec: DataSpec) -> None:
        """Use ``spec``, with the scales that ``fitted`` has fitted to the comparisons of a dataset of both."""
        for i, name in enumerate(spec.datasets):
            if spec.scales[i].fitted and name in fitted.datasets and fitted.scale_of(name).fitted:
                spec.scales[i] = fitted.scale_of(name)
        self.spec = spec

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        """One line, before Lightning's strict loading lists every key: a checkpoint of another architecture (or
        with other head or prompt options) than the config builds."""
        own, state = self.state_dict(), checkpoint.get("state_dict", {})
        missing, unknown = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        shapes = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
        if not (missing or unknown or shapes):
            return
        theirs = checkpoint.get("hyper_parameters", {}).get("backbone", "?")
        example = (f"{missing[0]} missing" if missing else f"{unknown[0]} unknown" if unknown else
                   f"{shapes[0]}: {tuple(state[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(
            f"{self.trainer.ckpt_path} does not fit the model the config builds (checkpoint: {theirs}, config: "
            f"{self.hparams.backbone}; {len(missing)} weights missing, {len(unknown)} unknown, {len(shapes)} of "
            f"another shape, e.g. {example}); use the config.yaml of the run the checkpoint comes from")
