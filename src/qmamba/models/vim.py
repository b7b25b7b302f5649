"""Vim-style isotropic backbone (Vision Mamba, Zhu et al. 2024): bidirectional Mamba blocks over patch tokens.

Optional comparison backbone for QMamba. Follows Vim's "bimamba v2" design: a shared in-projection to (x, z), a
forward and a backward branch (each a causal depthwise conv1d + selective scan with its own parameters), outputs
averaged and gated by SiLU(z), a shared out-projection; pre-norm residual blocks with RMSNorm, an absolute
position embedding and a class token in the middle of the sequence. Parameter names follow Vim's
(``layers.{i}.mixer.conv1d_b``, ``A_b_log``, ...). The causal conv uses causal-conv1d on CUDA when installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmamba.ops.causal_conv1d import causal_conv1d
from qmamba.ops.selective_scan import ScanBackend, selective_scan, validate_backend

from .layers import DropPath, RMSNorm, drop_path_rates, no_weight_decay, trunc_normal_init
from .ss2d import mamba_dt_bias

__all__ = ["BiMamba", "Vim", "VimBlock"]


class BiMamba(nn.Module):
    """Vim's bidirectional mixer on (B, L, C) tokens."""

    def __init__(
        self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, scan_backend: ScanBackend = "auto"
    ) -> None:
        super().__init__()
        inner, rank = expand * dim, math.ceil(dim / 16)
        self.d_state, self.dt_rank, self.scan_backend = d_state, rank, validate_backend(scan_backend)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        # one set per direction, with Vim's checkpoint names: conv1d / conv1d_b, x_proj / x_proj_b, A_log / A_b_log
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(inner, rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(rank, inner))
            a_log = torch.log(torch.arange(1, d_state + 1.0)).repeat(inner, 1)
            setattr(self, f"A{suffix}_log", no_weight_decay(nn.Parameter(a_log)))
            setattr(self, f"D{suffix}", no_weight_decay(nn.Parameter(torch.ones(inner))))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self, depth: int) -> None:
        """Mamba's init for the delta projections and the depth-scaled out-projection (after generic init)."""
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt_proj.bias.copy_(mamba_dt_bias(tuple(dt_proj.bias.shape)))
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(depth)

    def _branch(self, x: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor, D: Tensor
                ) -> Tensor:
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu", backend=self.scan_backend)
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(
            x.float(), delta.float(), -torch.exp(A_log.float()),
            B.transpose(1, 2).float().contiguous(), C.transpose(1, 2).float().contiguous(), D.float(),
            delta_bias=dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend,
        )

    def forward(self, tokens: Tensor) -> Tensor:
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (B, inner, L) each
        y_f = self._branch(x, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._branch(x.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        y = (y_f + y_b.flip(-1)) / 2 * F.silu(z.float())
        return self.out_proj(y.transpose(1, 2).to(tokens.dtype))


class VimBlock(nn.Module):
    """Vim's "Add -> RMSNorm -> Mixer" block; the residual stream is carried separately in fp32."""

    def __init__(self, dim: int, drop_path: float = 0.0, **mixer: object) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMamba(dim, **mixer)  # type: ignore[arg-type]
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = (residual + self.drop_path(hidden) if residual is not None else hidden).float()
        return self.mixer(self.norm(residual)), residual


class Vim(nn.Module):
    """Isotropic Vision-Mamba backbone.

    Args:
        dim: token width (192 tiny, 384 small).
        depth: number of blocks.
        patch_size: square patch size (and stride).
        img_size: size the position embedding is built for; other sizes interpolate it.
        d_state: SSM state size.
        drop_path_rate: stochastic-depth rate of the last block.
        scan_backend: ``auto`` | ``cuda`` | ``triton`` | ``cpu`` | ``torch``; also selects the causal-conv1d kernel.
        in_chans: input channels.
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 24,
        patch_size: int = 16,
        img_size: int = 224,
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        scan_backend: ScanBackend = "auto",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_features = dim
        self.stage_dims = [dim]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        rates = drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList(
            VimBlock(dim, drop_path=r, d_state=d_state, scan_backend=scan_backend) for r in rates
        )
        self.norm_f = RMSNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(trunc_normal_init)
        for layer in self.layers:
            layer.mixer.reset_ssm_parameters(depth)

    def _pos_embed(self, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (grid_h, grid_w) != (self.grid, self.grid):
            patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2)
        return cls_pos, patch_pos

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """``tokens`` (B, L, C) normalised patch tokens, ``cls`` and ``pooled`` (B, C) the middle class token."""
        x = self.patch_embed.proj(images)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls_pos, patch_pos = self._pos_embed(grid_h, grid_w)
        x = x + patch_pos
        middle = x.shape[1] // 2
        cls = (self.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :middle], cls, x[:, middle:]], dim=1)
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        x = self.norm_f((residual + layer.drop_path(hidden)).float()).to(images.dtype)
        tokens = torch.cat([x[:, :middle], x[:, middle + 1 :]], dim=1)
        out = {"tokens": tokens, "cls": x[:, middle], "pooled": x[:, middle]}
        out["stage0"] = tokens.transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w)
        return out

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)["pooled"]


VIM_PRESETS: dict[str, dict[str, object]] = {
    "vim_tiny": dict(dim=192, depth=24),
    "vim_small": dict(dim=384, depth=24),
    "vim_test": dict(dim=32, depth=2),
}
