"""SS2D: VMamba's 2-D selective-scan mixer, with LQMamba's local (window) scans and BiAttn fusion as options.

Parameter names and shapes follow VMamba's ``SS2D`` (``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``,
``dt_projs_bias``, ``A_logs``, ``Ds``, ``out_norm``, ``out_proj``) so official checkpoints load unchanged. The layer
works on channel-last maps (B, H, W, C); LayerNorm and Linear are parameter-compatible with VMamba's channel-first
``LayerNorm2d``/``Linear2d``.
"""

from __future__ import annotations

import math

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import Tensor, nn

from qmamba.ops import cpu_fusion
from qmamba.ops.scan_order import CROSS_2D, scan_order, validate_direction
from qmamba.ops.selective_scan import ScanBackend, ordered_selective_scan, validate_backend

from .layers import no_weight_decay

__all__ = ["SS2D", "BiAttn", "mamba_dt_bias"]

# torch.compile trains these layers at symbolic sizes (dynamic=True, or the default's second input size) only when
# the partitioner recomputes views instead of saving them: inductor cannot order the symbolic strides of a saved view
# such as the depthwise conv's channel-last input (pytorch/pytorch#185510, open in torch 2.14). A view costs nothing
# to recompute, and torch's own note on the option calls it generally a good idea; it is process-wide.
torch._functorch.config.recompute_views = True


def mamba_dt_bias(shape: tuple[int, ...], dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's dt bias init: dt ~ log-uniform[dt_min, dt_max], stored as its inverse softplus."""
    dt = torch.exp(torch.rand(shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class BiAttn(nn.Module):
    """LocalMamba's channel gate: ``y * sigmoid(fc2(gelu(fc1(mean_L(LN(y))))))`` for each direction's output."""

    def __init__(self, dim: int, reduction: float = 0.125) -> None:
        super().__init__()
        hidden = int(dim * reduction)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, y: Tensor) -> Tensor:
        """y: (..., L, D) -> same shape, gated per channel by statistics over L."""
        gate = self.fc2(self.act(self.fc1(self.norm(y).mean(dim=-2, keepdim=True))))
        return y * torch.sigmoid(gate)


class SS2D(nn.Module):
    """Selective-scan 2-D mixer.

    Args:
        dim: block width C.
        d_state: SSM state size N (1 for VMamba v2, 16 for v0).
        ssm_ratio: inner width D_i = ssm_ratio * C.
        dt_rank: rank R of the delta projection; ``None`` = ceil(C / 16).
        directions: scan directions (see :mod:`qmamba.ops.scan_order`); VMamba's cross-scan by default.
        bi_attn: gate each direction's output with a shared :class:`BiAttn` before summing (LQMamba).
        gated: v0 form: in_proj also produces z and the output is multiplied by SiLU(z).
        conv_bias: bias in the depthwise 3x3 conv (v0 only).
        scan_backend: ``auto``, ``cuda``, ``triton``, ``cpu`` or ``torch`` (see :func:`qmamba.ops.selective_scan`).
        scan_fp32: an fp32 scan under mixed precision (VMamba's maintainer's advice): fp32 states and output; the
            fused kernels read the bf16 operands as they are, the other backends scan fp32 copies.

    Attributes:
        scan_out_dtype: when set, the dtype the scan returns whatever ``scan_fp32`` says of its output (the scan
            itself unchanged). bf16 scoring on the CPU sets bf16
            (:func:`qmamba.models.low_precision.prepare_bf16_inference`): the fp32 scan's sums rounded once, by the
            CPU kernel itself, so that ``out_norm`` reads bf16 and computes its statistics in fp32 inside the op
            instead of running on an fp32 copy.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        directions: tuple[str, ...] = CROSS_2D,
        bi_attn: bool = False,
        gated: bool = False,
        conv_bias: bool = False,
        scan_backend: ScanBackend = "auto",
        scan_fp32: bool = True,
    ) -> None:
        super().__init__()
        inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        k = len(directions)
        self.directions = tuple(validate_direction(d) for d in directions)
        self.d_state, self.dt_rank, self.inner, self.gated = d_state, rank, inner, gated
        self.scan_backend, self.scan_fp32 = validate_backend(scan_backend), scan_fp32
        self.scan_out_dtype: torch.dtype | None = None

        self.in_proj = nn.Linear(dim, inner * (2 if gated else 1), bias=False)
        self.conv2d = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=conv_bias)
        self.act = nn.SiLU()
        bound = inner**-0.5  # nn.Linear's default init, as VMamba leaves x_proj untouched
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, inner).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, rank).uniform_(-(rank**-0.5), rank**-0.5))
        self.dt_projs_bias = nn.Parameter(mamba_dt_bias((k, inner)))
        a_logs = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * inner, 1)
        self.A_logs = no_weight_decay(nn.Parameter(a_logs))
        self.Ds = no_weight_decay(nn.Parameter(torch.ones(k * inner)))
        self.fusion = BiAttn(inner) if bi_attn else None
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C), plus ``residual`` when given (summed inside out_proj where that can be
        fused, :mod:`qmamba.ops.cpu_fusion`)."""
        batch, height, width, _ = x.shape
        x = self.in_proj(x)
        z = None
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        x = cpu_fusion.conv2d(x.permute(0, 3, 1, 2), self.conv2d, self.act)  # (B, D, H, W)
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, self.inner)  # channel-last, row-major

        # x_proj acts per token, so it runs on the map once for all K directions, in token order; dt_proj's rank-R
        # expansion to (B, K, H*W, D) step sizes happens inside the scan (per step on the cpu backend)
        k, rank, n = len(self.directions), self.dt_rank, self.d_state
        scan_dtype = torch.float32 if self.scan_fp32 else None
        # a plain out_norm goes to the scan, whose cpu kernel computes it from its fp32 sums in eager inference (saving
        # a pass over y; elsewhere F.layer_norm runs after the scan); a hooked or replaced one runs as the module
        norm = self.out_norm
        fused_norm = self.fusion is None and type(norm) is nn.LayerNorm and not cpu_fusion.hooked(norm)
        proj = tokens @ self.x_proj_weight.view(k * (rank + 2 * n), self.inner).t()
        dts, bs, cs = proj.view(batch, height * width, k, rank + 2 * n).transpose(1, 2).split([rank, n, n], dim=-1)

        y = ordered_selective_scan(  # the operands as they are: the scan takes them in its kernel's layout and dtype
            tokens,
            dts,
            -torch.exp(self.A_logs.float()),
            bs,
            cs,
            self.Ds.float(),
            self.dt_projs_bias.float().flatten(),
            scan_order(self.directions, height, width, x.device),
            merge=self.fusion is None,
            backend=self.scan_backend,
            delta_proj=self.dt_projs_weight,
            out_dtype=self.scan_out_dtype or scan_dtype,
            scan_dtype=scan_dtype,
            layer_norm=(norm.weight, norm.bias, norm.eps) if fused_norm else None,
        )
        if self.fusion is not None:  # (B, K, H*W, D): gate each direction by its own statistics, then sum
            y = self.fusion(y).sum(1)
        y = (y if fused_norm else norm(y)).view(batch, height, width, self.inner)
        if z is not None:
            y = y * F.silu(z)
        if not torch.is_autocast_enabled(y.device.type):  # e.g. an fp32 scan in a model cast to bf16
            y = y.to(self.out_proj.weight.dtype)
        return cpu_fusion.linear(y, self.out_proj, residual=residual)

    def extra_repr(self) -> str:
        return f"directions={self.directions}, d_state={self.d_state}, dt_rank={self.dt_rank}, gated={self.gated}"
