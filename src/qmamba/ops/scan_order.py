"""Scan orders of a 2-D feature map: VMamba's cross-scan and LocalMamba's window scans, as index permutations.

A direction turns an (H, W) map into a 1-D sequence. Vocabulary (LocalMamba's, plus column-first windows):

* ``h``: row-major; ``v``: column-major (VMamba's directions 0 and 1);
* ``w{K}``: K x K windows in row-major order, tokens row-major inside each window (H, W zero-padded to multiples
  of K); ``w{K}c``: the column-first version (windows and tokens column-major);
* a ``_flip`` suffix reverses the whole sequence (VMamba's directions 2 and 3 are ``h_flip`` and ``v_flip``).

:class:`ScanOrder` precomputes, for a set of directions and a map size, one gather index that builds all
sequences at once (padded to a common length with a zero token) and, per direction, the inverse index that maps a
sequence back to row-major positions. Both are plain ``index_select`` ops: device-agnostic, differentiable,
exportable. ``table`` is the same orders as an int32 (K, L) table of token positions (-1 for padding), the form the
fused CPU scan reads directly.
"""

from __future__ import annotations

import functools
import re

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


def direction_positions(name: str, height: int, width: int) -> Tensor:
    """Sequence of row-major token indices visited by direction ``name``; ``-1`` marks a padding token."""
    match = _DIRECTION.match(validate_direction(name))
    assert match is not None
    base, window, column_first, flip = match.groups()
    grid = torch.arange(height * width).view(height, width)
    if base == "h":
        seq = grid.flatten()
    elif base == "v":
        seq = grid.t().flatten()
    else:
        k = int(window)
        hp, wp = -(-height // k) * k, -(-width // k) * k
        padded = torch.full((hp, wp), -1, dtype=torch.long)
        padded[:height, :width] = grid
        if column_first:
            padded = padded.t()
        # (rows of windows, K, cols of windows, K) -> windows in order, tokens in order inside each window
        # (rows of windows, K, cols of windows, K) -> windows in order, tokens in order inside each window;
        # on the transposed grid this makes both orders column-major
        seq = padded.view(padded.shape[0] // k, k, padded.shape[1] // k, k).permute(0, 2, 1, 3).flatten()
    return seq.flip(0) if flip else seq


class ScanOrder:
    """All directions of one SS2D layer for one map size: ``scan`` (B, D, H*W) -> (B, K, D, L), ``merge`` back."""

    @torch.inference_mode(False)  # cached across calls: tensors made under inference mode could never train
    def __init__(self, directions: tuple[str, ...], height: int, width: int) -> None:
        self.directions = directions
        self.num_tokens = height * width
        seqs = [direction_positions(d, height, width) for d in directions]
        self.length = max(len(s) for s in seqs)
        gather = torch.full((len(seqs), self.length), self.num_tokens, dtype=torch.long)  # index L = zero token
        inverse = torch.empty(len(seqs), self.num_tokens, dtype=torch.long)
        for k, seq in enumerate(seqs):
            valid = seq >= 0
            gather[k, : len(seq)][valid] = seq[valid]
            inverse[k, seq[valid]] = torch.nonzero(valid).squeeze(1)
        self.padded = bool((gather == self.num_tokens).any())
        self.table = torch.where(gather == self.num_tokens, -1, gather).to(torch.int32)
        self._gather = gather.flatten()
        self._inverse = inverse
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @torch.inference_mode(False)
    def _indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self._gather.to(device), self._inverse.to(device))
        return self._device_cache[device]

    def scan(self, x: Tensor) -> Tensor:
        """(B, D, H*W) row-major -> (B, K, D, L) sequences, zero-padded to the longest direction."""
        gather, _ = self._indices(x.device)
        if self.padded:
            x = torch.nn.functional.pad(x, (0, 1))
        seqs = x.index_select(-1, gather).view(*x.shape[:-1], len(self.directions), self.length)
        return seqs.transpose(-3, -2)

    def scan_each(self, x: Tensor) -> Tensor:
        """(B, K, C, H*W) one map per direction -> (B, K, C, L): direction k's map in direction k's order."""
        gather, _ = self._indices(x.device)
        if self.padded:
            x = torch.nn.functional.pad(x, (0, 1))
        k = len(self.directions)
        index = gather.view(1, k, 1, self.length).expand(x.shape[0], k, x.shape[2], self.length)
        return torch.gather(x, -1, index)

    def unscan(self, y: Tensor) -> Tensor:
        """(B, K, D, L) sequence outputs -> (B, K, D, H*W), each direction back in row-major order."""
        _, inverse = self._indices(y.device)
        return torch.stack([y[:, k].index_select(-1, inverse[k]) for k in range(len(self.directions))], dim=1)


@functools.lru_cache(maxsize=256)
def scan_order(directions: tuple[str, ...], height: int, width: int) -> ScanOrder:
    """Cached :class:`ScanOrder` (index tensors are built once per directions and map size)."""
    return ScanOrder(directions, height, width)


def identity_table(length: int, sequences: int) -> Tensor:
    """The (sequences, length) table of a plain 1-D scan: every sequence visits the tokens in order."""
    return torch.arange(length, dtype=torch.int32).repeat(sequences, 1)
