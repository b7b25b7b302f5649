"""VMamba backbones (v2 and legacy v0) for QMamba and LQMamba.

Layout of this file: stems and downsamplers, the VSS block, the backbone, official-checkpoint remapping and
loading, then the size presets. Module and parameter names reproduce MzeroMiko/VMamba's classification model
(``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``classifier.norm.*``) so that its
ImageNet checkpoints load; the ImageNet ``classifier.head`` is not part of the backbone. Internally everything runs
channel-last (B, H, W, C), which is parameter-compatible with the official channel-first ``LayerNorm2d``/``Linear2d``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from qmamba.files.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from qmamba.ops.scan_order import CROSS_2D
from qmamba.ops.selective_scan import ScanBackend

from .layers import DropPath, Mlp, PatchwiseConv2d, Permute, drop_path_rates, trunc_normal_init
from .ss2d import SS2D

__all__ = ["VMamba", "VSSBlock", "LoadReport", "load_official_checkpoint", "remap_official_state_dict"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- stems, downsamplers
def make_stem(version: Literal["v1", "v2"], in_chans: int, dim: int) -> nn.Sequential:
    """Image (B, 3, H, W) -> channel-last (B, H/4, W/4, dim). Indices match the official Sequential."""
    if version == "v1":  # conv 4x4 stride 4 + LN (v0 models)
        return nn.Sequential(nn.Conv2d(in_chans, dim, 4, 4), Permute(0, 2, 3, 1), nn.LayerNorm(dim))
    if version == "v2":  # two conv 3x3 stride 2 with LN and GELU between (v2 models)
        return nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1),
            Permute(0, 2, 3, 1),
            nn.LayerNorm(dim // 2),
            Permute(0, 3, 1, 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1),
            Permute(0, 2, 3, 1),
            nn.LayerNorm(dim),
        )
    raise ValueError(f"stem must be 'v1' or 'v2', got {version!r}")


class PatchMerging(nn.Module):
    """Swin's patch merging (v0 downsample): 2x2 neighbours concatenated, LayerNorm(4C), Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = nn.functional.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Swin's order matters for reduction.weight: (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def make_downsample(version: Literal["v1", "v3"], dim: int) -> nn.Module:
    """Halve the resolution and double the width of a channel-last map."""
    if version == "v1":
        return PatchMerging(dim)
    if version == "v3":  # conv 3x3 stride 2 + LN
        return nn.Sequential(
            Permute(0, 3, 1, 2), PatchwiseConv2d(dim, 2 * dim, 3, 2, 1), Permute(0, 2, 3, 1), nn.LayerNorm(2 * dim)
        )
    raise ValueError(f"downsample must be 'v1' or 'v3', got {version!r}")


# ----------------------------------------------------------------------------------------------------------- blocks
class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))) when mlp_ratio > 0."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, **ss2d: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ss2d)
        self.drop_path = DropPath(drop_path)
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_path.p and self.training:
            x = x + self.drop_path(self.op(self.norm(x)))
            return x if self.mlp is None else x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.op(self.norm(x), residual=x)  # the branches add x themselves, inside their last matrix product
        return x if self.mlp is None else self.mlp(self.norm2(x), residual=x)


class VMambaStage(nn.Module):
    """``blocks`` then ``downsample`` (Identity, without parameters, in the last stage)."""

    def __init__(self, blocks: list[VSSBlock], downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample


# --------------------------------------------------------------------------------------------------------- backbone
class VMamba(nn.Module):
    """Hierarchical VMamba backbone (4 stages of VSS blocks) without the ImageNet classifier head.

    Args:
        depths: blocks per stage.
        dim: width of stage 0; doubles per stage.
        d_state: SSM state size (1 in v2, 16 in v0).
        ssm_ratio: SS2D inner width / block width.
        mlp_ratio: MLP hidden / block width; 0 removes the MLP (v0).
        directions: scan directions per stage (``None`` = VMamba's 4-direction cross-scan everywhere).
        bi_attn: LQMamba's BiAttn fusion of the direction outputs in every block.
        gated: v0 SS2D with a SiLU(z) output gate.
        conv_bias: bias in SS2D's depthwise conv (v0).
        stem: ``v2`` (two stride-2 convs) or ``v1`` (one 4x4 conv, v0 models).
        downsample: ``v3`` (3x3 stride-2 conv) or ``v1`` (patch merging, v0 models).
        drop_path_rate: stochastic-depth rate of the last block (linear from 0).
        scan_backend: selective-scan backend, ``auto`` | ``cuda`` | ``triton`` | ``cpu`` | ``torch``.
        scan_fp32: run the scan in fp32 under mixed precision.
        grad_checkpointing: recompute blocks in the backward pass to save memory.
        in_chans: input channels.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 4, 2),
        dim: int = 96,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        mlp_ratio: float = 4.0,
        directions: tuple[tuple[str, ...], ...] | None = None,
        bi_attn: bool = False,
        gated: bool = False,
        conv_bias: bool = False,
        stem: Literal["v1", "v2"] = "v2",
        downsample: Literal["v1", "v3"] = "v3",
        drop_path_rate: float = 0.0,
        scan_backend: ScanBackend = "auto",
        scan_fp32: bool = True,
        grad_checkpointing: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        depths = tuple(depths)
        directions = tuple(tuple(d) for d in directions) if directions is not None else (CROSS_2D,) * len(depths)
        if len(directions) != len(depths):
            raise ValueError(f"directions has {len(directions)} entries for {len(depths)} stages")
        self.depths = depths
        self.stage_dims = [dim * 2**i for i in range(len(depths))]
        self.num_features = self.stage_dims[-1]
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = make_stem(stem, in_chans, dim)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i, (depth, width) in enumerate(zip(depths, self.stage_dims, strict=True)):
            blocks = [
                VSSBlock(
                    width,
                    drop_path=rates[sum(depths[:i]) + j],
                    mlp_ratio=mlp_ratio,
                    d_state=d_state,
                    ssm_ratio=ssm_ratio,
                    directions=directions[i],
                    bi_attn=bi_attn,
                    gated=gated,
                    conv_bias=conv_bias,
                    scan_backend=scan_backend,
                    scan_fp32=scan_fp32,
                )
                for j in range(depth)
            ]
            last = i == len(depths) - 1
            self.layers.append(VMambaStage(blocks, nn.Identity() if last else make_downsample(downsample, width)))
        # the official model's final norm lives in its classifier; keeping the name keeps checkpoints loadable
        self.classifier = nn.ModuleDict({"norm": nn.LayerNorm(self.num_features)})
        self.apply(trunc_normal_init)
        # the maps are channel-last, so the convolution weights are too: otherwise every convolution of a permuted map
        # copies its weight into the map's layout at every call
        self.to(memory_format=torch.channels_last)

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """Named features: ``stage{i}`` (B, C_i, H_i, W_i) block outputs before downsampling, ``norm`` the
        normalised last stage (B, C, H, W) and ``pooled`` its global average (B, C)."""
        x = self.patch_embed(images)
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            for block in layer.blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            out[f"stage{i}"] = x.permute(0, 3, 1, 2)
            x = layer.downsample(x)
        x = self.classifier["norm"](x)
        out["norm"] = x.permute(0, 3, 1, 2)
        out["pooled"] = x.mean(dim=(1, 2))
        return out

    def forward(self, images: Tensor) -> Tensor:
        """Pooled features (B, num_features)."""
        return self.forward_features(images)["pooled"]


# ------------------------------------------------------------------------------------------- official checkpoints
_LEGACY_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.ln_1\."), r"\1.norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+)\.self_attention\."), r"\1.op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_NEW_MODULES = re.compile(r"\.op\.fusion\.")  # LQMamba's BiAttn: not in any ImageNet checkpoint


@dataclass
class LoadReport:
    """What loading an official checkpoint did: keys left at their init, and checkpoint keys not used."""

    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def summary(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "") if keys else "none"

        return f"newly initialised: {summary(self.missing)}; unused checkpoint keys: {summary(self.dropped)}"


def remap_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official VMamba keys -> this backbone's keys: v0 renames and (out, in, 1, 1) Linear2d weights squeezed."""
    legacy = "patch_embed.proj.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if legacy:
            for pattern, replacement in _LEGACY_RENAMES:
                key = pattern.sub(replacement, key)
        if key.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")) and value.dim() == 4:
            value = value.flatten(1)
        out[key] = value
    return out


def load_official_checkpoint(model: VMamba, path: str | os.PathLike[str], trusted: bool = False) -> LoadReport:
    """Load an official VMamba ImageNet checkpoint (container key ``model``) into ``model``.

    Accepted differences: the ImageNet ``classifier.head`` and blocks beyond the model's depth are dropped (QMamba-T
    from the [2,2,5,2] tiny checkpoint drops ``layers.2.blocks.4``); LQMamba's BiAttn modules start from their init.
    Anything else -- a shape mismatch, a missing backbone weight, an unknown key -- raises, naming the keys.
    """
    state = remap_official_state_dict(extract_state_dict(read_checkpoint(path, trusted)))
    own = model.state_dict()
    report = LoadReport()
    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        block = _BLOCK_KEY.match(key)
        beyond_depth = block is not None and (
            int(block[1]) >= len(model.depths) or int(block[2]) >= model.depths[int(block[1])]
        )
        if key.startswith("classifier.head.") or (beyond_depth and key not in own):
            report.dropped.append(key)
        else:
            kept[key] = value
    unknown = sorted(set(kept) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in kept.items()
              if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(kept))
    unexpected_missing = [k for k in missing if not _NEW_MODULES.search(k)]
    if unknown or shapes or unexpected_missing:
        problems = []
        if shapes:
            problems.append("shape mismatches:\n  " + "\n  ".join(shapes[:10]))
        if unexpected_missing:
            problems.append("model weights missing from the checkpoint:\n  " + "\n  ".join(unexpected_missing[:10]))
        if unknown:
            problems.append("checkpoint keys the model does not have:\n  " + "\n  ".join(unknown[:10]))
        raise CheckpointError(
            f"{path} does not fit this backbone (depths {model.depths}, widths {model.stage_dims}). "
            + "\n".join(problems)
            + "\nPick the preset that matches the file (e.g. vssm1_tiny_0230s -> vmamba_tiny_s1l8, "
            "vssm_tiny_0230 -> vmamba_tiny_s2l5 or qmamba_tiny, vssm_small_0229 -> qmamba_small, "
            "vssm_base_0229 -> qmamba_base, vssmtiny_dp01 -> vmamba_vanilla_tiny)."
        )
    model.load_state_dict(kept, strict=False)
    report.missing = missing
    log.info("loaded %s: %s", path, report)
    return report


# ---------------------------------------------------------------------------------------------------- size presets
def local_directions(windows: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
    """LQMamba's default scans per stage: row- and column-first K x K window scans and their reverses.

    The paper describes horizontal and vertical scanning inside windows, continued across windows, with the window
    size varying with depth; the exact choice is unpublished (see docs/architecture.md).
    """
    return tuple((f"w{k}", f"w{k}c", f"w{k}_flip", f"w{k}c_flip") for k in windows)


LQMAMBA_WINDOWS = (14, 7, 7, 7)

VMAMBA_PRESETS: dict[str, dict[str, Any]] = {
    # QMamba (VMamba v2 s2: ssm_ratio 2, d_state 1) -- the paper's backbone parameter counts (docs/architecture.md)
    "qmamba_tiny": dict(depths=(2, 2, 4, 2), dim=96),  # 27,992,640
    "qmamba_tiny5": dict(depths=(2, 2, 5, 2), dim=96),  # 29,936,832; loads vssm_tiny_0230 without dropping
    "qmamba_small": dict(depths=(2, 2, 15, 2), dim=96),  # 49,378,752
    "qmamba_base": dict(depths=(2, 2, 15, 2), dim=128),  # 87,532,800
    # LQMamba: local window scans + one BiAttn per block
    "lqmamba_tiny": dict(depths=(2, 2, 4, 2), dim=96, directions=local_directions(LQMAMBA_WINDOWS), bi_attn=True),
    "lqmamba_small": dict(depths=(2, 2, 15, 2), dim=96, directions=local_directions(LQMAMBA_WINDOWS), bi_attn=True),
    "lqmamba_base": dict(depths=(2, 2, 15, 2), dim=128, directions=local_directions(LQMAMBA_WINDOWS), bi_attn=True),
    # official VMamba ImageNet architectures
    "vmamba_tiny_s1l8": dict(depths=(2, 2, 8, 2), dim=96, ssm_ratio=1.0),
    "vmamba_tiny_s2l5": dict(depths=(2, 2, 5, 2), dim=96),
    "vmamba_small": dict(depths=(2, 2, 15, 2), dim=96),
    "vmamba_base": dict(depths=(2, 2, 15, 2), dim=128),
    "vmamba_vanilla_tiny": dict(
        depths=(2, 2, 9, 2), dim=96, d_state=16, mlp_ratio=0.0, gated=True, conv_bias=True, stem="v1", downsample="v1"
    ),
    # tiny presets for tests and CPU demos
    "qmamba_test": dict(depths=(1, 1, 1, 1), dim=16),
    "lqmamba_test": dict(depths=(1, 1, 1, 1), dim=16, directions=local_directions((4, 2, 2, 2)), bi_attn=True),
}
