"""Training pieces: losses, metrics, schedules, parameter groups, the module's multi-crop evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmamba.training import IQALoss, QMambaIQA, WarmupCosine, WarmupStepDecay, iqa_metrics
from qmamba.training.metrics import logistic_plcc


def test_metrics_match_definitions():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    preds = torch.tensor([1.1, 1.9, 3.5, 3.9, 5.2])
    m = iqa_metrics(preds, target, logistic=True)
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0)
    assert m["plcc"] == pytest.approx(float(np.corrcoef(preds, target)[0, 1]), abs=1e-6)
    assert m["rmse"] == pytest.approx(float(torch.sqrt(((preds - target) ** 2).mean())), abs=1e-6)
    assert m["plcc_logistic"] >= m["plcc"] - 1e-3
    bf16 = iqa_metrics(preds.bfloat16(), target)  # computed in float32 whatever comes in
    assert bf16["srcc"] == pytest.approx(1.0)


def test_logistic_plcc_linearises_a_monotone_curve():
    x = np.linspace(-3, 3, 50)
    y = 1 / (1 + np.exp(-2 * x))
    assert logistic_plcc(x, y) > 0.999 > float(np.corrcoef(x, y)[0, 1])


@pytest.mark.parametrize("base", ["smoothl1", "l1", "mse"])
def test_loss_terms_equal_their_definitions(base):
    pred = torch.tensor([0.3, 0.2, 0.8, 0.5])
    target = torch.tensor([0.1, 0.4, 0.9, 0.6])
    assert IQALoss(base)(target.clone(), target).item() == pytest.approx(0.0, abs=1e-7)
    diff = (pred - target).abs()
    expected_base = {"l1": diff.mean(), "mse": (diff**2).mean(),
                     "smoothl1": torch.where(diff < 0.1, 0.5 * diff**2 / 0.1, diff - 0.05).mean()}[base]
    assert IQALoss(base)(pred, target).item() == pytest.approx(expected_base.item(), rel=1e-6)

    plcc = float(np.corrcoef(pred.numpy(), target.numpy())[0, 1])
    with_plcc = IQALoss(base, plcc_weight=2.0)(pred, target).item()
    assert with_plcc == pytest.approx(expected_base.item() + 2.0 * (1 - plcc) / 2, rel=1e-5)

    # pairwise hinge over ordered pairs: max(0, margin - sign(t_i - t_j) (p_i - p_j)), averaged
    hinges = [max(0.0, 0.1 - math.copysign(1.0, float(ti - tj)) * float(pi - pj))
              for i, (pi, ti) in enumerate(zip(pred, target)) for j, (pj, tj) in enumerate(zip(pred, target))
              if i != j]
    with_rank = IQALoss(base, rank_weight=0.5, rank_margin=0.1)(pred, target).item()
    assert with_rank == pytest.approx(expected_base.item() + 0.5 * sum(hinges) / len(hinges), rel=1e-5)

    tied = torch.tensor([0.5, 0.5])  # no ordered pair: the ranking term adds nothing
    assert IQALoss(base, rank_weight=1.0)(torch.tensor([0.2, 0.9]), tied).item() == pytest.approx(
        IQALoss(base)(torch.tensor([0.2, 0.9]), tied).item())
    with pytest.raises(ValueError):
        IQALoss("huber")  # type: ignore[arg-type]


def test_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    step = WarmupStepDecay(opt, warmup_epochs=3, step_epochs=3, gamma=0.1, start_factor=1e-3)
    factors = [step.lr_lambdas[0](e) for e in range(10)]
    assert factors[0] == pytest.approx(1e-3) and factors[3] == 1.0 and factors[6] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(0.01)
    cosine = WarmupCosine(opt, max_epochs=10, warmup_epochs=1, min_factor=0.0)
    assert cosine.lr_lambdas[0](1) == 1.0 and cosine.lr_lambdas[0](10) == pytest.approx(0.0, abs=1e-9)
    assert cosine.lr_lambdas[0](6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 9)))


def test_no_weight_decay_on_norms_biases_and_ssm_parameters():
    module = QMambaIQA(backbone="qmamba_test", optimizer=lambda groups: torch.optim.AdamW(groups, weight_decay=0.05))
    optimizer = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    no_decay_names = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert {"A_logs", "Ds", "bias", "weight"} >= no_decay_names >= {"A_logs", "Ds", "bias"}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any(names[id(p)].endswith(("A_logs", "Ds")) for p in decay["params"])



def test_a_cpu_run_steps_fused_unless_the_config_or_mixed_precision_says_otherwise(caplog):
    """torch's CPU default is a Python loop over the parameters; qmamba steps fused where the config leaves the
    choice to torch, with the same update (in other rounding), and says so."""
    import lightning as L

    def adamw(**options: object):  # noqa: ANN202
        return lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05, **options)

    with caplog.at_level("INFO", logger="qmamba"):
        fused = QMambaIQA(backbone="qmamba_test", optimizer=adamw()).configure_optimizers()
    assert "with AdamW's fused CPU step" in caplog.text
    assert [(g["fused"], g["weight_decay"]) for g in fused.param_groups] == [(True, 0.05), (True, 0.0)]
    for options in ({"fused": False}, {"foreach": False}, {"foreach": True}):  # a config's own choice is followed
        kept = QMambaIQA(backbone="qmamba_test", optimizer=adamw(**options)).configure_optimizers()
        assert {k: kept.defaults[k] for k in options} == options and not kept.defaults["fused"]
    plain = QMambaIQA(backbone="qmamba_test", optimizer=lambda groups: torch.optim.RMSprop(groups, lr=1e-3))
    assert isinstance(plain.configure_optimizers(), torch.optim.RMSprop)  # no fused kernel: as built
    mixed = QMambaIQA(backbone="qmamba_test", optimizer=adamw())
    mixed.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    assert mixed.configure_optimizers().defaults["fused"] is None  # Lightning could not clip its gradients

    loop = QMambaIQA(backbone="qmamba_test", optimizer=adamw(fused=False))
    looped = loop.configure_optimizers()
    fused_module = QMambaIQA(backbone="qmamba_test", optimizer=adamw())
    fused_module.load_state_dict(loop.state_dict())
    fused = fused_module.configure_optimizers()
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in loop.parameters()]
        for module, optimizer in ((loop, looped), (fused_module, fused)):
            for p, g in zip(module.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(loop.parameters(), fused_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

def test_multi_crop_score_is_the_mean_over_crops():
    module = QMambaIQA(backbone="qmamba_test").eval()
    crops = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        per_crop = module(crops.flatten(0, 1)).view(2, 3)
        assert torch.allclose(module._image_scores(crops), per_crop.mean(1), atol=1e-6)


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    import os

    from qmamba.files.atomic import write_text_atomic

    target = tmp_path / "results" / "out.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
