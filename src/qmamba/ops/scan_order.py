"""Scan orders of a 2-D feature map: VMamba's cross-scan and LocalMamba's window scans, as index permutations.

A direction turns an (H, W) map into a 1-D sequence. Vocabulary (LocalMamba's, plus column-first windows):

* ``h``: row-major; ``v``: column-major (VMamba's directions 0 and 1);
* ``w{K}``: K x K windows in row-major order, tokens row-major inside each window (H, W zero-padded to multiples
  of K); ``w{K}c``: the column-first version (windows and tokens column-major);
* a ``_flip`` suffix reverses the whole sequence (VMamba's directions 2 and 3 are ``h_flip`` and ``v_flip``).

:class:`ScanOrder` precomputes, for a set of directions and a map size, one gather index that builds all sequences
at once (padded to a common length with a zero token) and, per direction, the inverse index that maps a sequence
back to row-major positions. Both are ``index_select`` ops whose backward gathers through the inverse order instead
of scattering (no atomics on a GPU, deterministic): device-agnostic, differentiable, exportable. ``table`` is the
same orders as an int32 (K, L) table of token positions (-1 for padding), the form the fused CPU scan reads
directly.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["CROSS_2D", "ScanOrder", "direction_positions", "identity_table", "scan_order", "validate_direction"]

CROSS_2D = ("h", "v", "h_flip", "v_flip")
_DIRECTION = re.compile(r"^(h|v|w(\d+)(c?))(_flip)?$")


def validate_direction(name: str) -> str:
    """Return ``name`` if it is a known direction, else raise with the vocabulary."""
    match = _DIRECTION.match(name)
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"unknown scan direction {name!r}; use h, v, w<K> or w<K>c (K >= 1), each optionally with '_flip'"
        )
    return name


def direction_positions(name: str, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Sequence of row-major token indices visited by direction ``name``; ``-1`` marks a padding token.

    Tensor ops only, no loops over values: with symbolic ``height`` and ``width`` (torch.compile's dynamic shapes)
    the same code traces into the graph."""
    match = _DIRECTION.match(validate_direction(name))
    assert match is not None
    base, window, column_first, flip = match.groups()
    grid = torch.arange(height * width, device=device).view(height, width)
    if base == "h":
        seq = grid.flatten()
    elif base == "v":
        seq = grid.t().flatten()
    else:
        k = int(window)
        padded = torch.nn.functional.pad(grid, (0, (-width) % k, 0, (-height) % k), value=-1)
        if column_first:
            padded = padded.t()
        # (rows of windows, K, cols of windows, K) -> windows in order, tokens in order inside each window;
        # on the transposed grid this makes both orders column-major
        seq = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k).permute(0, 2, 1, 3).flatten()
    return seq.flip(0) if flip else seq


class _Reorder(torch.autograd.Function):
    """``x.index_select(-1, index)`` for an index that visits each position a fixed number of times (a scan order
    is a permutation, or K of them), with a backward that gathers the gradient back through ``inverse`` instead of
    scattering it. index_select's and gather's own backwards are index_add / scatter_add, whose atomics were the
    largest kernels of a QMamba-T training step on an H200 (benchmarks/profile_step.py); this one is deterministic."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(-1, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors  # (copies, positions): where each input position went; len(index): nowhere
        padded = torch.nn.functional.pad(grad, (0, 1))
        copies = padded.index_select(-1, inverse.flatten()).view(*grad.shape[:-1], *inverse.shape)
        return copies.sum(-2), None, None


def _reorder(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(-1, index)  # inference and tracing (export): the plain op, the same forward
    return _Reorder.apply(x, index, inverse)


class ScanOrder:
    """All directions of one SS2D layer for one map size: ``scan`` (B, D, H*W) -> (B, K, D, L), ``unscan`` back.

    Built with tensor ops from the map size alone, so that under torch.compile it is part of the graph: with
    symbolic sizes one graph serves every input size (:func:`scan_order`)."""

    def __init__(self, directions: tuple[str, ...], height: int, width: int,
                 device: torch.device | None = None) -> None:
        device = torch.device("cpu") if device is None else device
        self.directions = directions
        self.num_tokens = tokens = height * width
        seqs = [direction_positions(d, height, width, device) for d in directions]
        lengths = {s.shape[0] for s in seqs}  # one per window size K (H * W for h and v, which are never longer)
        self.length = length = functools.reduce(torch.sym_max, lengths) if len(lengths) > 1 else lengths.pop()
        k = len(seqs)
        # sizes stay symbolic under torch.compile: T enters as a tensor operand, never as a constant (a pad or fill
        # value would specialize the graph to one size)
        positions = torch.stack([torch.nn.functional.pad(s, (0, length - s.shape[0]), value=-1) for s in seqs])
        self.table = positions.to(torch.int32)  # (K, L) token positions, -1 for padding: the fused CPU scan's form
        gather = torch.where(positions >= 0, positions, positions.new_ones(()) * tokens)  # padding reads token T
        steps_of = torch.arange(length, device=device).expand(k, length)
        inverse = torch.zeros(k, tokens + 1, dtype=torch.long, device=device).scatter_(1, gather, steps_of)[:, :tokens]
        self.padded = length != tokens  # every direction visits each token once, so only padding makes one longer
        # each index with the inverse its backward gathers through; position k * L (or T) of a padded gradient is 0
        rows = tokens + 1 if self.padded else tokens  # a map's positions, and the zero token when there is padding
        offsets = torch.arange(k, device=device)[:, None]
        past_end = torch.full((k, 1), k, device=device) * length
        steps = torch.cat([offsets * length + inverse, past_end], 1)[:, :rows]
        self._indices_on = {device: {
            "scan": (gather.flatten(), steps),
            "scan_each": ((gather + offsets * rows).flatten(), steps.reshape(1, -1)),
            "unscan": (inverse, gather[:, None, :]),
        }}

    def _indices(self, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._indices_on:
            with torch.inference_mode(False):  # cached across calls: made under inference mode, they could not train
                built = next(iter(self._indices_on.values()))
                self._indices_on[device] = {n: (i.to(device), v.to(device)) for n, (i, v) in built.items()}
        return self._indices_on[device][name]

    def scan(self, x: Tensor) -> Tensor:
        """(B, D, H*W) row-major -> (B, K, D, L) sequences, zero-padded to the longest direction."""
        if self.padded:
            x = torch.nn.functional.pad(x, (0, 1))
        seqs = _reorder(x, *self._indices("scan", x.device)).view(*x.shape[:-1], len(self.directions), self.length)
        return seqs.transpose(-3, -2)

    def scan_each(self, x: Tensor) -> Tensor:
        """(B, K, C, H*W) one map per direction -> (B, K, C, L): direction k's map in direction k's order."""
        if self.padded:
            x = torch.nn.functional.pad(x, (0, 1))
        batch, k, channels = x.shape[:3]
        maps = x.transpose(1, 2).reshape(batch, channels, -1)  # (B, C, K * positions): a view for transposed maps
        seqs = _reorder(maps, *self._indices("scan_each", x.device)).view(batch, channels, k, self.length)
        return seqs.transpose(1, 2)

    def unscan(self, y: Tensor) -> Tensor:
        """(B, K, D, L) sequence outputs -> (B, K, D, H*W), each direction back in row-major order."""
        inverse, back = self._indices("unscan", y.device)
        return torch.stack([_reorder(y[:, k], inverse[k], back[k]) for k in range(len(self.directions))], dim=1)


_ORDERS: dict[tuple[tuple[str, ...], int, int], ScanOrder] = {}
_MAX_ORDERS = 256


def scan_order(directions: tuple[str, ...], height: int, width: int,
               device: torch.device | None = None) -> ScanOrder:
    """The :class:`ScanOrder` of ``directions`` on an ``height`` x ``width`` map, its indices on ``device``.

    Eager calls share one cached order per directions and map size. Under torch.compile the order is built inside
    the graph instead: from symbolic sizes (dynamic shapes) its indices are computed for each input size, and from
    static ones inductor folds them into constants."""
    if torch.compiler.is_compiling():
        return ScanOrder(directions, height, width, device)
    key = (directions, height, width)
    if key not in _ORDERS:
        if len(_ORDERS) >= _MAX_ORDERS:
            del _ORDERS[next(iter(_ORDERS))]
        with torch.inference_mode(False):  # cached across calls: made under inference mode, they could not train
            _ORDERS[key] = ScanOrder(directions, height, width)
    return _ORDERS[key]


def identity_table(length: int, sequences: int) -> Tensor:
    """The (sequences, length) table of a plain 1-D scan: every sequence visits the tokens in order."""
    return torch.arange(length, dtype=torch.int32).repeat(sequences, 1)
