"""Which implementation of the optimizer's step a CPU run uses.

torch picks the implementation of an optimizer's step from where the parameters are: ``foreach`` on a GPU, and on a
CPU a Python loop over the parameters, even where the optimizer has a fused CPU kernel. That loop is a tenth of a
QMamba-T training step on the CPU: AdamW over its 28 M parameters (204 tensors) takes 70 ms a step as torch's loop and
21 ms fused (2 cores of an Ice Lake Xeon, AVX-512; Swin-T: 70 ms and 19 ms), of a 640 ms step at batch 2. So a CPU
run in fp32 steps fused where the config leaves the choice to torch. GPU runs keep torch's choice, and so does mixed
precision, where Lightning cannot clip a fused optimizer's gradients
(:func:`qmamba.training.cli.refuse_unclippable_optimizer`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

ParamGroups = list[dict[str, Any]]


def leaves_implementation_to_torch(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has a fused kernel and its options leave the implementation to torch: ``fused`` and
    ``foreach`` both unset (a config that sets either, to any value, is followed as it is)."""
    return "fused" in optimizer.defaults and optimizer.defaults["fused"] is None and \
        optimizer.defaults.get("foreach") is None


def fused_on_cpu(build: Callable[[ParamGroups], torch.optim.Optimizer],
                 groups: Callable[[], ParamGroups]) -> torch.optim.Optimizer:
    """``build(groups())``, rebuilt with ``fused=True`` when it is one of torch's optimizers, it leaves the
    implementation to torch, and every parameter is a floating-point CPU tensor: the same update rule, rounded
    differently in the last bits (and deterministically). ``groups`` makes new group dicts per call, as torch fills
    the dicts it is given."""
    optimizer = build(groups())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not type(optimizer).__module__.startswith("torch.optim.") or \
            not leaves_implementation_to_torch(optimizer) or \
            not all(p.device.type == "cpu" and p.is_floating_point() for p in params):
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold decoupled_weight_decay too
    options = {name: value for name, value in optimizer.defaults.items() if name in accepted}
    return type(optimizer)(groups(), **{**options, "fused": True})
