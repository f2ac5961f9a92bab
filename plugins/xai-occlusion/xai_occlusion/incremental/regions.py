"""The region algebra: where each node's patch lies for every window position, how far a
sliding-window layer spreads a region (:func:`_reach`), when a region is (nearly) the whole map
(:func:`_finish`), and the geometry of a sliding-window layer (:class:`Window`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# A patch covering at least this share of its feature map is computed on the whole map: the
# gather-and-overlay costs more than the positions it saves.
FULL_AREA = 0.7


@dataclass
class Region:
    """Where a node's patch lies: ``size`` per axis, ``starts[p]`` for window position ``p``."""

    size: tuple[int, ...]
    starts: torch.Tensor  # (positions, rank) long, on the host while planning

    def covers(self, other: Region) -> bool:
        return self.size == other.size and torch.equal(self.starts, other.starts)


def _finish(
    lo: torch.Tensor,
    hi: torch.Tensor,
    spatial: tuple[int, ...],
    cap: float | None,
    full_area: float,
) -> Region | None:
    """The region holding the inclusive bounds ``[lo, hi]`` (clipped to the map) of every window;
    ``None`` when it is (nearly) the whole map. ``cap`` limits its size (approximate mode)."""
    shape = torch.tensor(spatial)
    lo = torch.minimum(lo.clamp(min=0), shape - 1)
    hi = torch.minimum(hi, shape - 1)
    hi = torch.maximum(hi, lo)
    size = (hi - lo + 1).amax(0)
    start = torch.minimum(lo, shape - size)
    if cap is not None:
        limit = torch.tensor([max(1, math.ceil(cap * s)) for s in spatial])
        over = size > limit
        if bool(over.any()):
            size = torch.minimum(size, limit)
            centred = ((lo + hi + 1) // 2 - size // 2).clamp(min=0)
            centred = torch.minimum(centred, shape - size)
            start = torch.where(over, centred, torch.minimum(lo, shape - size))
    if math.prod(size.tolist()) >= full_area * math.prod(spatial):
        return None
    return Region(tuple(int(s) for s in size), start)


def _reach(
    region: Region,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pad: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive bounds of the outputs of a sliding-window layer that read the input region.

    Output ``j`` reads inputs ``j*s - pad + i*d`` for ``i < k``.
    """
    k, s = torch.tensor(kernel), torch.tensor(stride)
    p, d = torch.tensor(pad), torch.tensor(dilation)
    size = torch.tensor(region.size)
    lo = -torch.div(-(region.starts + p - (k - 1) * d), s, rounding_mode="floor")
    hi = torch.div(region.starts + size - 1 + p, s, rounding_mode="floor")
    return lo, hi


@dataclass
class Window:
    """A sliding-window layer (convolution or pooling) as the engine runs it on patches."""

    kind: str  # "conv", "max", "avg"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]  # before each axis
    dilation: tuple[int, ...]
    module: nn.Module | None = None  # convolution module
    weight: Any = None  # functional convolution (node or tensor)
    bias: Any = None
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
