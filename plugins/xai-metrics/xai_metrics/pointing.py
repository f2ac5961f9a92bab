"""Localisation against ground-truth regions: the pointing game and its energy-based variant.

Pointing game (Zhang et al., *Top-down Neural Attention by Excitation Backprop*, ECCV 2016)::

    m   = argmax_u map(u)                                    (the first maximum in raster order)
    hit = exists u in mask with sum_i ((u_i - m_i) / r_i)^2 <= 1
    r_i = tolerance * S_i / reference_size                   (15 px at 224 px, scaled per axis)

Energy-based pointing game (Wang et al., *Score-CAM*, CVPR Workshops 2020)::

    share = sum_{u in mask} max(map(u), 0) / sum_u max(map(u), 0)

Relevance mass accuracy (Arras et al., *CLEVR-XAI: A benchmark dataset for the ground truth
evaluation of neural network explanations*, Information Fusion 2022) is the energy-based pointing
game's share under the name the paper gives it. Relevance rank accuracy (same paper)::

    K    = |mask|,   top = the K pixels of highest map value
    rank = |top  intersect  mask| / K

with tied values at the cut-off sharing the remaining places equally (the expected value under a
random order of the ties), so a constant map scores the chance level K / P.

All work on 2D and 3D maps alike. A sample whose mask is empty has no value (NaN). A map with no
maximum (constant) or no positive attribution pointed nowhere: it scores a miss / 0, never NaN,
so a method cannot improve its mean by returning empty maps.
"""

from __future__ import annotations

import math

import torch

from xai_core.core.errors import InputError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_metrics.common import exact_float, finite_float, integer, per_class, single_maps


def _masks(context: MetricContext, metric: str) -> torch.Tensor:
    if context.masks is None:
        raise InputError(f"{metric} needs ground-truth masks: pass masks=... (N, *spatial).")
    want = tuple(context.inputs.shape[:1] + context.inputs.shape[2:])
    if tuple(context.masks.shape) != want:
        raise InputError(f"masks must have shape {want}; got {tuple(context.masks.shape)}.")
    return context.masks.bool()


def _class_details(values: torch.Tensor, context: MetricContext) -> dict[str, object]:
    """Accuracy per explained class and its mean over classes, as the papers report it."""
    classes = per_class(values, context.targets)
    mean = sum(classes.values()) / len(classes) if classes else math.nan
    return {"per_class": classes, "accuracy": mean}


class PointingGame:
    """Hit (1) when the map's maximum lies within a tolerance of the ground-truth region."""

    name = "pointing_game"
    direction = Direction.HIGHER
    needs = frozenset({Need.MASKS})
    range = (0.0, 1.0)  # 1 hit, 0 miss

    def compute(
        self,
        context: MetricContext,
        *,
        tolerance: float = 15.0,
        reference_size: int | None = 224,
    ) -> MetricResult:
        """:param tolerance: radius in pixels at ``reference_size`` (0: the maximum itself).
        :param reference_size: the image size the tolerance is given for; each axis's radius is
            ``tolerance * size / reference_size``. ``None``: ``tolerance`` is in pixels of this
            input, the same on every axis.
        """
        tolerance = finite_float(tolerance, "tolerance", minimum=0)
        maps, masks = single_maps(context), _masks(context, self.name)
        spatial = maps.shape[1:]
        dtype = exact_float(maps.device)
        size = torch.tensor(spatial, dtype=dtype, device=maps.device)
        scale = 1.0 if reference_size is None else size / integer(reference_size, "reference_size")
        radius = (tolerance * scale * torch.ones_like(size)).view(-1, *[1] * len(spatial))

        flat = maps.flatten(1)
        peak = torch.stack(torch.unravel_index(flat.argmax(dim=1), spatial), dim=1)  # (N, rank)
        grid = torch.stack(
            torch.meshgrid(*[torch.arange(s, device=maps.device) for s in spatial], indexing="ij")
        )  # (rank, *spatial)
        offset = (grid[None] - peak.view(*peak.shape, *[1] * len(spatial))).to(dtype)
        # An axis of radius 0 admits only offset 0 there (0/0 would be NaN).
        term = torch.where(offset == 0, 0.0, offset.square() / radius.square())
        within = term.sum(dim=1) <= 1

        pointed = flat.amax(dim=1) > flat.amin(dim=1)
        hit = (within & masks).flatten(1).any(dim=1) & pointed
        defined = masks.flatten(1).any(dim=1)
        values = torch.where(defined, hit.to(dtype), math.nan)
        return MetricResult(
            values,
            {
                **_class_details(values, context),
                "hits": int((hit & defined).sum()),
                "misses": int((~hit & defined).sum()),
                "constant_maps": int((~pointed).sum()),
                "radius": radius.flatten().tolist(),
            },
        )


class EnergyPointingGame:
    """Share of the map's positive attribution that falls inside the ground-truth region."""

    name = "energy_pointing_game"
    direction = Direction.HIGHER
    needs = frozenset({Need.MASKS})
    range = (0.0, 1.0)  # a share

    def compute(self, context: MetricContext) -> MetricResult:
        maps = single_maps(context)
        positive = maps.clamp_min(0).flatten(1).to(exact_float(maps.device))
        masks = _masks(context, self.name).flatten(1)
        total = positive.sum(dim=1)
        share = (positive * masks).sum(dim=1) / total.clamp_min(torch.finfo(total.dtype).tiny)
        values = torch.where(masks.any(dim=1), torch.where(total > 0, share, 0.0), math.nan)
        return MetricResult(
            values,
            {**_class_details(values, context), "no_positive": int((total == 0).sum())},
        )


class RelevanceMassAccuracy(EnergyPointingGame):
    """Share of the positive relevance inside the mask (Arras et al. 2022; = energy pointing)."""

    name = "relevance_mass"


class RelevanceRankAccuracy:
    """Share of the ``|mask|`` highest pixels that lie inside the mask (Arras et al. 2022)."""

    name = "relevance_rank"
    direction = Direction.HIGHER
    needs = frozenset({Need.MASKS})
    range = (0.0, 1.0)  # a share

    def compute(self, context: MetricContext) -> MetricResult:
        maps = single_maps(context).flatten(1)
        masks = _masks(context, self.name).flatten(1)
        dtype = exact_float(maps.device)
        k = masks.sum(dim=1)  # (N,)
        ordered = maps.sort(dim=1, descending=True).values
        cut = ordered.gather(1, (k - 1).clamp_min(0)[:, None])  # the K-th highest value
        above, tied = maps > cut, maps == cut
        # Places left for the tied block at the cut-off, shared equally among its pixels.
        left = (k - above.sum(dim=1)).to(dtype)
        hits = (above & masks).sum(dim=1).to(dtype)
        hits = hits + (tied & masks).sum(dim=1).to(dtype) * left / tied.sum(dim=1).clamp_min(1)
        values = torch.where(k > 0, hits / k.clamp_min(1).to(dtype), math.nan)
        return MetricResult(values.clamp(0, 1), _class_details(values, context))
