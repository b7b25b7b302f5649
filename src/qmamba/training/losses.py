"""Losses on unit-scale scores: regression with optional correlation and ranking terms, and the fidelity loss on
preference probabilities, for comparisons (``A looks better than B``) and for in-batch pairs of MOS data.

The preference model is Thurstone's (case V): each image's perceived quality is its score plus normal noise of
standard deviation ``sigma``, so ``P(a better than b) = Phi((f_a - f_b) / sqrt(sigma_a^2 + sigma_b^2))``.
``bradley_terry`` is the logistic version with the same noise spread. The fidelity loss
``1 - sqrt(p g) - sqrt((1 - p)(1 - g))`` compares the predicted probability ``p`` with the judged one ``g``
(UNIQUE, Zhang et al. 2021; LIQE, Zhang et al. 2023): bounded, and zero exactly when ``p = g``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IQALoss", "Link", "fidelity", "in_batch_pairs", "preference_probability"]

Link = Literal["thurstone", "bradley_terry"]
LINKS = ("thurstone", "bradley_terry")
LOGISTIC_SPREAD = math.pi / math.sqrt(3.0)  # the standard logistic's standard deviation


def preference_probability(difference: Tensor, spread: Tensor | float, link: Link = "thurstone") -> Tensor:
    """``P(first better than second)`` for score differences ``f_first - f_second`` and the standard deviation of
    the difference's noise, ``sqrt(sigma_first^2 + sigma_second^2)``."""
    z = difference / spread
    if link == "thurstone":
        return 0.5 * torch.erfc(-z / math.sqrt(2.0))  # the normal CDF, accurate far into both tails
    if link == "bradley_terry":
        return torch.sigmoid(LOGISTIC_SPREAD * z)
    raise ValueError(f"link must be one of {', '.join(LINKS)}, got {link!r}")


def fidelity(predicted: Tensor, judged: Tensor, weight: Tensor | None = None) -> Tensor:
    """The mean fidelity loss of predicted against judged preference probabilities (weighted by ``weight``: the
    number of judgements behind each)."""
    eps = 1e-8  # the square root's gradient at 0
    loss = 1.0 - torch.sqrt(predicted * judged + eps) - torch.sqrt((1.0 - predicted) * (1.0 - judged) + eps)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(eps)


def in_batch_pairs(pred: Tensor, target: Tensor, groups: Tensor, std: Tensor, sigma: float,
                   link: Link) -> tuple[Tensor, Tensor]:
    """Predicted and judged preference probabilities of every pair of a batch's images from one dataset (LIQE's
    scheme: scores of different datasets are never compared).

    With each image's standard deviation of ratings (``std``, unit scale, all finite) the judged probability is
    Thurstone's from the two MOS (UNIQUE's) and the same deviations are the model's noise, so that the loss is least
    where the scores equal the MOS; without, the judgement is the order of the MOS (1, 0, or 0.5 for a tie) and the
    model's noise is ``sigma`` per image."""
    first, second = torch.triu_indices(len(pred), len(pred), offset=1, device=pred.device)
    same = groups[first] == groups[second]
    first, second = first[same], second[same]
    if bool(torch.isfinite(std).all()) and bool((std > 0).all()):
        spread = torch.sqrt(std[first] ** 2 + std[second] ** 2)
        judged = preference_probability(target[first] - target[second], spread, link)
    else:
        spread = torch.tensor(math.sqrt(2.0) * sigma, device=pred.device)
        judged = 0.5 * (torch.sign(target[first] - target[second]) + 1.0)
    return preference_probability(pred[first] - pred[second], spread, link), judged


class IQALoss(nn.Module):
    """``base(pred, target) + plcc_weight * (1 - PLCC) / 2 + rank_weight * margin ranking + fidelity_weight *
    in-batch fidelity``.

    The correlation, ranking and fidelity terms act within a batch (and within one dataset: ``groups``): they reward
    getting the order and the linear trend right, which is what SRCC/PLCC measure, while a regression base anchors
    the scale. ``base="fidelity"`` trains on the in-batch pairs alone: scale-free, so datasets on different scales
    need no alignment, and the outputs are not on the MOS scale (rank metrics still are).
    """

    def __init__(self, base: Literal["smoothl1", "l1", "mse", "fidelity"] = "smoothl1", smoothl1_beta: float = 0.1,
                 plcc_weight: float = 0.0, rank_weight: float = 0.0, rank_margin: float = 0.0,
                 fidelity_weight: float = 0.0, pair_link: Link = "thurstone", pair_sigma: float = 0.1) -> None:
        super().__init__()
        if base not in ("smoothl1", "l1", "mse", "fidelity"):
            raise ValueError(f"loss must be smoothl1, l1, mse or fidelity, got {base!r}")
        if pair_link not in LINKS:
            raise ValueError(f"pair_link must be one of {', '.join(LINKS)}, got {pair_link!r}")
        if not pair_sigma > 0:
            raise ValueError(f"pair_sigma must be > 0, got {pair_sigma}")
        self.base, self.beta = base, smoothl1_beta
        self.plcc_weight, self.rank_weight, self.rank_margin = plcc_weight, rank_weight, rank_margin
        self.fidelity_weight = 1.0 if base == "fidelity" else fidelity_weight
        self.link, self.sigma = pair_link, pair_sigma

    def forward(self, pred: Tensor, target: Tensor, groups: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """``groups``: each image's dataset (pairs are formed within one); ``std``: its ratings' standard deviation
        on the unit scale (NaN where unknown)."""
        if self.base == "smoothl1":
            loss = F.smooth_l1_loss(pred, target, beta=self.beta)
        elif self.base == "l1":
            loss = F.l1_loss(pred, target)
        elif self.base == "mse":
            loss = F.mse_loss(pred, target)
        else:
            loss = pred.new_zeros(())
        if self.plcc_weight and pred.numel() > 1:
            p, t = pred - pred.mean(), target - target.mean()
            plcc = (p * t).sum() / (p.norm() * t.norm()).clamp_min(1e-8)
            loss = loss + self.plcc_weight * (1.0 - plcc) / 2.0
        if self.rank_weight:
            sign = torch.sign(target[:, None] - target[None, :])
            ordered = sign != 0  # pairs with a defined order
            if ordered.any():
                hinge = F.relu(self.rank_margin - sign * (pred[:, None] - pred[None, :]))
                loss = loss + self.rank_weight * hinge[ordered].mean()
        if self.fidelity_weight and pred.numel() > 1:
            groups = torch.zeros_like(pred, dtype=torch.long) if groups is None else groups
            std = torch.full_like(pred, float("nan")) if std is None else std
            predicted, judged = in_batch_pairs(pred, target, groups, std, self.sigma, self.link)
            if predicted.numel():
                loss = loss + self.fidelity_weight * fidelity(predicted, judged)
        return loss

    @property
    def pair_spread(self) -> float:
        """The standard deviation of a score difference's noise: ``sigma`` per image, two images."""
        return math.sqrt(2.0) * self.sigma

    def preference(self, difference: Tensor) -> Tensor:
        """``P(first better)`` for score differences ``f_first - f_second`` under the model's link and noise."""
        return preference_probability(difference, self.pair_spread, self.link)

    def comparisons(self, first: Tensor, second: Tensor, judged: Tensor, weight: Tensor) -> Tensor:
        """The fidelity loss of a batch of comparisons: the two images' scores, the judged probability that the
        first is better, and the judgements behind each."""
        return fidelity(self.preference(first - second), judged, weight)
