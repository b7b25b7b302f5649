"""IQA metrics: SRCC, PLCC, KRCC, RMSE and logistic-fitted PLCC of native-scale scores (float32); pairwise accuracy
and log-likelihood of held-out comparisons."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

__all__ = ["iqa_metrics", "logistic_plcc", "pair_metrics"]


def logistic_plcc(preds: np.ndarray, target: np.ndarray) -> float:
    """PLCC after the VQEG 4-parameter logistic map of predictions onto the targets (NaN if the fit fails)."""
    from scipy.optimize import curve_fit

    def logistic(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / (np.abs(b4) + 1e-8))) + b2

    p0 = [target.max(), target.min(), float(np.mean(preds)), float(np.std(preds)) + 1e-3]
    try:
        with warnings.catch_warnings():  # an unestimable covariance is irrelevant: only the fitted curve is used
            warnings.simplefilter("ignore")
            params, _ = curve_fit(logistic, preds, target, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError):
        return float("nan")
    fitted = logistic(preds, *params)
    if np.std(fitted) == 0:
        return float("nan")
    return float(np.corrcoef(fitted, target)[0, 1])


def iqa_metrics(preds: torch.Tensor, target: torch.Tensor, logistic: bool = False) -> dict[str, float]:
    """Correlations and error of predictions vs targets (both 1-D, same scale)."""
    preds, target = preds.detach().float().cpu().flatten(), target.detach().float().cpu().flatten()
    if preds.numel() < 2:
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan"), "rmse": float("nan")}
    out = {
        "srcc": spearman_corrcoef(preds, target).item(),
        "plcc": pearson_corrcoef(preds, target).item(),
        "krcc": kendall_rank_corrcoef(preds, target).item(),
        "rmse": torch.sqrt(torch.mean((preds - target) ** 2)).item(),
    }
    if logistic:
        out["plcc_logistic"] = logistic_plcc(preds.double().numpy(), target.double().numpy())
    return out


def pair_metrics(scores: np.ndarray, first: np.ndarray, second: np.ndarray, judged: np.ndarray, weight: np.ndarray,
                 predicted: np.ndarray) -> dict[str, float]:
    """How well image scores explain held-out comparisons, counted per judgement (a pair judged ``weight`` times,
    the first better in a share ``judged`` of them).

    ``pair_accuracy``: the share of judgements whose better image the scores rank higher (a tie in the scores is
    half right); ``log_likelihood``: the mean log-probability of the judgements under the model's ``predicted``
    probabilities (nats per judgement; 0 is perfect, log 0.5 = -0.693 a coin)."""
    total = float(weight.sum())
    if total == 0:
        return {"pair_accuracy": float("nan"), "log_likelihood": float("nan"), "pairs": 0.0}
    difference = scores[first] - scores[second]
    agree = np.where(difference > 0, judged, np.where(difference < 0, 1.0 - judged, 0.5))
    predicted = np.clip(predicted.astype(np.float64), 1e-12, 1.0 - 1e-12)
    likelihood = judged * np.log(predicted) + (1.0 - judged) * np.log1p(-predicted)
    return {"pair_accuracy": float((agree * weight).sum() / total),
            "log_likelihood": float((likelihood * weight).sum() / total), "pairs": float(len(first))}
