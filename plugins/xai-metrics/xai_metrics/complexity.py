"""How concentrated a map is, from the map alone: sparseness (Gini) and complexity (entropy).

Sparseness (Chalasani et al., *Concise Explanations of Neural Networks using Adversarial
Training*, ICML 2020): the Gini index of the absolute map ``a = |map|`` over its ``P`` pixels,
sorted ascending ``a_(1) <= ... <= a_(P)``::

    G = sum_i (2 i - P - 1) a_(i)  /  (P sum_i a_(i))            in [0, 1 - 1/P]

0 for a uniform map, ``1 - 1/P`` for a single non-zero pixel: **higher is sparser**.

Complexity (Bhatt et al., *Evaluating and Aggregating Feature-based Model Explanations*, IJCAI
2020): the Shannon entropy (natural log) of the normalised absolute map ``p = a / sum a``::

    H = - sum_i p_i log p_i   (0 log 0 = 0)                       in [0, log P]

0 for a single non-zero pixel, ``log P`` for a uniform map: **lower is simpler**.

Both are NaN for an all-zero map (``a / sum a`` is undefined): a method returning nothing has no
concentration to score. Both run batched on the maps' device, 2D and 3D alike.
"""

from __future__ import annotations

import math

import torch

from xai_core.core.metrics import Direction, MetricContext, MetricResult
from xai_metrics.common import exact_float, single_maps


def _absolute(context: MetricContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, P)`` absolute maps in an exact float, and which samples have any attribution."""
    maps = single_maps(context)
    a = maps.flatten(1).abs().to(exact_float(maps.device))
    return a, a.sum(dim=1) > 0


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log) of each normalised absolute map ``(N, ...)``, in an exact
    float; NaN where a map is all zero. Complexity's value, and eMPRT's measure."""
    a = maps.flatten(1).abs().to(exact_float(maps.device))
    total = a.sum(dim=1, keepdim=True)
    share = a / total.clamp_min(torch.finfo(a.dtype).tiny)
    h = -torch.special.xlogy(share, share).sum(dim=1)  # xlogy: 0 log 0 = 0
    return torch.where(total[:, 0] > 0, h.clamp_min(0), math.nan)


class Sparseness:
    """Gini index of the absolute map: 0 uniform, towards 1 for one pixel (Chalasani et al.)."""

    name = "sparseness"
    direction = Direction.HIGHER
    needs = frozenset()
    range = (0.0, 1.0)  # at most 1 - 1/P

    def compute(self, context: MetricContext) -> MetricResult:
        a, defined = _absolute(context)
        p = a.shape[1]
        ordered = a.sort(dim=1).values
        weight = 2 * torch.arange(1, p + 1, device=a.device, dtype=a.dtype) - p - 1
        total = ordered.sum(dim=1)
        gini = (ordered * weight).sum(dim=1) / (p * total.clamp_min(torch.finfo(a.dtype).tiny))
        values = torch.where(defined, gini.clamp(0, 1), math.nan)
        return MetricResult(values, {"all_zero": int((~defined).sum())})


class Complexity:
    """Entropy of the normalised absolute map: 0 for one pixel, log P uniform (Bhatt et al.)."""

    name = "complexity"
    direction = Direction.LOWER
    needs = frozenset()
    range = (0.0, math.inf)  # at most log P, which depends on the input size

    def compute(self, context: MetricContext) -> MetricResult:
        maps = single_maps(context)
        values = entropy(maps)
        return MetricResult(
            values,
            {"all_zero": int(values.isnan().sum()), "max_entropy": math.log(maps[0].numel())},
        )
