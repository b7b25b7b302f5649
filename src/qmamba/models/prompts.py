"""Parameter-efficient transfer for QMamba: StylePrompt (ICML and v1 forms) and SSF, attached by forward hooks.

QMamba transfers a trained model to a new IQA dataset by freezing it and learning how to re-style its features:
domain shifts in IQA are largely shifts of feature statistics. Every module here starts as the identity, so an
attached model scores exactly like the source until training moves it.

* :class:`StylePrompt` (ICML): a per-stage prompt bank mixed by input-conditioned weights, injected as a channel
  scale ("variance prompt") and shift ("mean prompt"): ``F' = F * (1 + gamma) + beta`` (the paper's
  description; our choices where it is silent: docs/architecture.md).
* :class:`StaticStylePrompt` (v1): learned per-channel mean and variance prompts, ``F' = F * (1 + p_var) + p_mean``.
* SSF (Lian et al., NeurIPS 2022), the baseline: a scale and shift after every LayerNorm, Linear and Conv2d.

Prompts sit on the residual stream after VSS blocks: after every block of a stage with one generator shared by the
stage's blocks (``where="block"``, the default), or after each stage's last block (``where="stage"``). They live in
``model.prompts`` so they travel with the state dict; :func:`attach_prompts` also registers the hooks.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmamba.errors import UsageError

__all__ = ["PROMPT_METHODS", "StaticStylePrompt", "StylePrompt", "attach_prompts", "check_prompt_target", "has_prompts"]

PromptMethod = Literal["styleprompt", "static", "ssf"]
PROMPT_METHODS: tuple[str, ...] = get_args(PromptMethod)


class StylePrompt(nn.Module):
    """StylePrompt generation + injection for (B, H, W, C) features.

    Generation: ``w = softmax(W_s GAP(F))`` over ``num_prompts`` learned prompts, ``P = sum_n w_n P_n``.
    Injection: ``h = GELU(W_e P)``, ``gamma = W_g h``, ``beta = W_b h``, ``F' = F * (1 + gamma) + beta``. The 1x1
    convolutions of the paper act on a 1x1 prompt map, so they are linear maps; ``reduction`` sets the width of
    ``h`` (the paper's 3.83 M on LQMamba-B implies a reduced width; its exact layout is not published).
    ``W_g`` and ``W_b`` start at zero: identity at initialisation. The bank starts at unit scale, not the 0.02 of
    ViT tokens: identity holds anyway, and distinct prompts give the mixture and ``W_e`` a signal to learn from
    (with 0.02 the demo transfer trained visibly slower: SRCC 0.540 against 0.564 after the same 12 epochs).
    """

    def __init__(self, dim: int, num_prompts: int = 8, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, dim // reduction)
        self.bank = nn.Parameter(torch.empty(num_prompts, dim))
        nn.init.trunc_normal_(self.bank, std=1.0)
        self.select = nn.Linear(dim, num_prompts)
        self.embed = nn.Linear(dim, hidden)
        self.gamma = nn.Linear(hidden, dim)
        self.beta = nn.Linear(hidden, dim)
        for layer in (self.gamma, self.beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        weights = F.softmax(self.select(x.mean(dim=(1, 2))), dim=-1)  # (B, N): which styles this image needs
        hidden = F.gelu(self.embed(weights @ self.bank))
        return x * (1 + self.gamma(hidden)[:, None, None]) + self.beta(hidden)[:, None, None]


class StaticStylePrompt(nn.Module):
    """The v1 form: learned per-channel variance and mean prompts on (..., C) features, zero at initialisation."""

    def __init__(self, dim: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.p_var = nn.Parameter(torch.zeros(dim))
        self.p_mean = nn.Parameter(torch.zeros(dim))
        self.channel_dim = channel_dim

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * (1 + self.p_var.view(shape)) + self.p_mean.view(shape)


def has_prompts(model: nn.Module) -> bool:
    return isinstance(getattr(model, "prompts", None), nn.ModuleDict)


class _Inject:
    """Forward hook applying ``prompt`` to a module's output. A class, not a closure, so ``copy.deepcopy`` (EMA,
    SWA) and pickling give the copy hooks that use the copy's own prompts."""

    def __init__(self, prompt: nn.Module) -> None:
        self.prompt = prompt

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self.prompt(output)


def check_prompt_target(backbone: nn.Module, method: str) -> None:
    """StylePrompt and the static prompts hook into a vision-Mamba backbone's stages of blocks; SSF into any
    backbone's norms, linear layers and convolutions. One line when ``method`` cannot attach to ``backbone``."""
    stages = getattr(backbone, "layers", None)
    if method != "ssf" and (stages is None or not all(hasattr(stage, "blocks") for stage in stages)):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise UsageError(f"transfer method {method} attaches prompts to the stages of a vision-Mamba backbone, and "
                         f"{name} has none: use head, full or ssf with it")


def attach_prompts(
    model: nn.Module,
    method: PromptMethod = "styleprompt",
    where: Literal["block", "stage"] = "block",
    num_prompts: int = 8,
    reduction: int = 4,
) -> nn.ModuleDict:
    """Create ``model.prompts`` for ``method`` and hook them into ``model.backbone`` (a VMamba / LQMamba)."""
    if has_prompts(model):
        raise RuntimeError("the model already carries prompts; attach them once")
    if method not in PROMPT_METHODS:
        raise ValueError(f"unknown prompt method {method!r}; choose from {PROMPT_METHODS}")
    backbone = model.backbone
    prompts = nn.ModuleDict()
    if method == "ssf":
        for name, module in backbone.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.Linear, nn.Conv2d)):
                width = module.out_channels if isinstance(module, nn.Conv2d) else (
                    module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[-1])
                prompt = StaticStylePrompt(width, channel_dim=1 if isinstance(module, nn.Conv2d) else -1)
                prompts[name.replace(".", "_")] = prompt
                module.register_forward_hook(_Inject(prompt))
    else:
        check_prompt_target(backbone, method)
        for i, stage in enumerate(backbone.layers):
            dim = stage.blocks[0].norm.normalized_shape[-1]
            prompt = StylePrompt(dim, num_prompts, reduction) if method == "styleprompt" else StaticStylePrompt(dim)
            prompts[f"stage{i}"] = prompt
            for block in stage.blocks if where == "block" else stage.blocks[-1:]:
                block.register_forward_hook(_Inject(prompt))
    param = next(backbone.parameters())
    model.prompts = prompts.to(device=param.device, dtype=param.dtype)
    return prompts
