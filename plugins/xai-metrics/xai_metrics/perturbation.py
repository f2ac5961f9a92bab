"""Metrics that perturb the input by the map and watch the target score.

Deletion and insertion (Petsiuk, Das and Saenko, *RISE*, BMVC 2018). Pixels are ordered by
attribution, most important first; after ``k`` of ``steps`` steps the first
``n_k = floor(k P / steps)`` of the ``P`` pixels (every channel) are changed::

    deletion:   x_k = baseline on the first n_k pixels, x elsewhere        (x_0 = x)
    insertion:  x_k = x on the first n_k pixels, blur(x) elsewhere          (x_0 = blur(x))
    AUC       = trapezoid of p(x_k) over the fraction n_k / P in [0, 1]

Average drop and increase in confidence (Chattopadhyay et al., *Grad-CAM++*, WACV 2018), with
``Y = p(x)`` and ``O = p(x * E)`` for the min-max normalised map ``E``::

    drop     = max(0, Y - O) / Y        (the paper's "Average Drop" is its mean, x 100 for %)
    increase = 1[Y < O]

All perturbed inputs are built on the model's device from rank masks and scored
``context.chunk_size`` at a time, samples and steps mixed in one batch: no loop over pixels.
"""

from __future__ import annotations

import math
import numbers

import torch

from xai_core.core.errors import OptionError
from xai_core.core.explanation import normalize
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_core.torch.ops import evaluate_in_chunks, gaussian_blur
from xai_metrics.common import (
    exact_float,
    finite_float,
    integer,
    per_axis,
    score_kind,
    single_maps,
)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """``(N, P)``: the position of each pixel in its map's order, most important first.

    Ties keep raster order (a stable sort), so a result never depends on the sort's luck.
    """
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def perturbation_curve(
    context: MetricContext,
    start: torch.Tensor,
    end: torch.Tensor,
    maps: torch.Tensor,
    steps: int,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of ``x_k = end`` on the first ``n_k`` pixels by ``maps``, ``start`` elsewhere.

    ``start`` and ``end`` broadcast to the inputs. Returns the fractions ``n_k / P``
    (``steps + 1``) and the ``(N, steps + 1)`` curves.
    """
    inputs = context.inputs
    n, spatial = inputs.shape[0], inputs.shape[2:]
    pixels = spatial.numel()
    steps = min(steps, pixels)  # more steps than pixels would only repeat points
    k = torch.arange(steps + 1, device=inputs.device)
    counts = torch.div(k * pixels, steps, rounding_mode="floor")
    ranks = pixel_ranks(maps)
    start, end = start.expand_as(inputs), end.expand_as(inputs)
    total = n * (steps + 1)  # row j is step j % (steps + 1) of sample j // (steps + 1)
    curves = torch.empty(total, device=inputs.device, dtype=torch.float32)

    def scores(j: torch.Tensor) -> torch.Tensor:
        rows, step = j // (steps + 1), j % (steps + 1)
        changed = (ranks[rows] < counts[step, None]).view(-1, 1, *spatial)
        x = torch.where(changed, end[rows], start[rows])
        return context.score(x, rows, kind).float()

    with torch.no_grad(), context.model.session():
        evaluate_in_chunks(scores, curves, context.chunk_size)
    return counts.to(exact_float(inputs.device)) / pixels, curves.view(n, steps + 1)


def _auc_result(fractions: torch.Tensor, curves: torch.Tensor, kind: str) -> MetricResult:
    auc = torch.trapezoid(curves.to(fractions.dtype), fractions, dim=1)
    return MetricResult(
        auc,
        {"kind": kind, "fractions": fractions.cpu(), "curves": curves.detach().cpu()},
    )


def _baseline(value: object, inputs: torch.Tensor) -> torch.Tensor:
    """A number, or a tensor that broadcasts to the inputs (e.g. per-channel black)."""
    if isinstance(value, torch.Tensor):
        try:
            return value.to(inputs.device, inputs.dtype).expand_as(inputs)
        except RuntimeError:
            raise OptionError(
                f"baseline of shape {tuple(value.shape)} does not broadcast to the inputs "
                f"{tuple(inputs.shape)}; pass e.g. shape (1, C, 1, 1) for one value per channel."
            ) from None
    if not isinstance(value, numbers.Real):
        raise OptionError(f"baseline must be a number or a tensor; got {value!r}.")
    return inputs.new_full((1,) * inputs.ndim, finite_float(value, "baseline"))


def curve_work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
    """(images forwarded, re-explanations) of a deletion or insertion curve over a batch of
    ``shape``: the cost estimate of ``compare()``."""
    pixels = math.prod(shape[2:])
    return shape[0] * (min(int(options.get("steps", 100)), pixels) + 1), 0


class Deletion:
    """Area under the target probability as the most important pixels are deleted first."""

    name = "deletion"
    direction = Direction.LOWER
    needs: frozenset[Need] = frozenset()
    range = (0.0, 1.0)  # an area under a probability (kind="logit" leaves it: not clipped then)

    work = staticmethod(curve_work)

    def compute(
        self,
        context: MetricContext,
        *,
        steps: int = 100,
        baseline: float | torch.Tensor = 0.0,
        kind: str = "auto",
    ) -> MetricResult:
        """:param steps: number of deletion steps (``steps + 1`` points on the curve).
        :param baseline: what deleted pixels become: a number or a tensor broadcastable to the
            inputs (the value of "nothing" after your normalisation).
        :param kind: ``auto`` (softmax, or sigmoid for one output), ``softmax``, ``sigmoid``,
            ``logit``.
        """
        steps, kind = integer(steps, "steps"), score_kind(context, kind)
        fill = _baseline(baseline, context.inputs)
        curve = perturbation_curve(context, context.inputs, fill, single_maps(context), steps, kind)
        return _auc_result(*curve, kind)


class Insertion:
    """Area under the target probability as the most important pixels are restored first."""

    name = "insertion"
    direction = Direction.HIGHER
    needs: frozenset[Need] = frozenset()
    range = (0.0, 1.0)  # as deletion

    work = staticmethod(curve_work)

    def compute(
        self,
        context: MetricContext,
        *,
        steps: int = 100,
        sigma: float | tuple[float, ...] = 5.0,
        kind: str = "auto",
    ) -> MetricResult:
        """:param steps: number of insertion steps (``steps + 1`` points on the curve).
        :param sigma: the starting image's Gaussian blur in pixels, one or one per axis.
        :param kind: ``auto`` (softmax, or sigmoid for one output), ``softmax``, ``sigmoid``,
            ``logit``.
        """
        steps, kind = integer(steps, "steps"), score_kind(context, kind)
        inputs = context.inputs
        blurred = gaussian_blur(inputs, per_axis(sigma, "sigma", inputs.ndim - 2))
        curve = perturbation_curve(context, blurred, inputs, single_maps(context), steps, kind)
        return _auc_result(*curve, kind)


def confidence(context: MetricContext, kind: object) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``Y = p(x)`` and ``O = p(x * E)`` of the target, for the min-max normalised map ``E``."""
    kind = score_kind(context, kind, ("auto", "softmax", "sigmoid"))  # Y must be > 0
    inputs = context.inputs
    explanation_map = normalize(single_maps(context), inputs.ndim - 2)
    masked = inputs * explanation_map.unsqueeze(1).to(inputs.dtype)  # every channel
    rows = torch.arange(inputs.shape[0], device=inputs.device)
    with torch.no_grad(), context.model.session():
        y = context.score(inputs, rows, kind).to(exact_float(inputs.device))
        o = context.score(masked, rows, kind).to(y.dtype)
    return y, o, kind


class AvgDrop:
    """Relative drop of the target probability when only the map's region is shown."""

    name = "avg_drop"
    direction = Direction.LOWER
    needs: frozenset[Need] = frozenset()
    range = (0.0, 1.0)  # max(0, Y - O) / Y with O >= 0

    def compute(self, context: MetricContext, *, kind: str = "auto") -> MetricResult:
        """:param kind: ``auto`` (softmax, or sigmoid for one output), ``softmax``, ``sigmoid``."""
        y, o, kind = confidence(context, kind)
        drop = torch.where(y > 0, (y - o).clamp_min(0) / y, math.nan)  # Y = 0: no confidence
        return MetricResult(drop, {"kind": kind, "Y": y.cpu(), "O": o.cpu()})


class AvgIncrease:
    """Whether the target probability rises when only the map's region is shown (1 or 0)."""

    name = "avg_increase"
    direction = Direction.HIGHER
    needs: frozenset[Need] = frozenset()
    range = (0.0, 1.0)  # 0 or 1 per sample

    def compute(self, context: MetricContext, *, kind: str = "auto") -> MetricResult:
        """:param kind: ``auto`` (softmax, or sigmoid for one output), ``softmax``, ``sigmoid``."""
        y, o, kind = confidence(context, kind)
        return MetricResult((y < o).to(y.dtype), {"kind": kind, "Y": y.cpu(), "O": o.cpu()})
