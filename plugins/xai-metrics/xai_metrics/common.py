"""What several metrics share: option checks, the score kind, one map per sample, rank
correlation and SSIM, and a Gaussian blur that runs on the model's device."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

# scipy and scikit-image are imported by the one metric helper that uses them (start-up time).
import torch

from xai_core.core.errors import InputError, OptionError, did_you_mean
from xai_core.core.explanation import normalize
from xai_core.core.metrics import MetricContext

KINDS = ("auto", "softmax", "sigmoid", "logit")


def integer(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise OptionError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def finite_float(value: object, name: str, *, minimum: float | None = None) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (minimum is None or value >= minimum)
    )
    if not ok:
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise OptionError(f"{name} must be a finite number{bound}; got {value!r}.")
    return float(value)


def per_axis(value: object, name: str, rank: int) -> tuple[float, ...]:
    """``value`` (one positive number, or one per spatial axis) as ``rank`` floats."""
    several = isinstance(value, Sequence) and not isinstance(value, str)
    items = list(value) if several else [value] * rank
    if len(items) != rank:
        raise OptionError(f"{name} must be one number or {rank} (one per axis); got {value!r}.")
    out = tuple(finite_float(v, name) for v in items)
    if any(v <= 0 for v in out):
        raise OptionError(f"{name} must be positive; got {value!r}.")
    return out


def choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise OptionError(f"{name} must be one of {tuple(choices)}; got {value!r}.{hint}")
    return value


def score_kind(context: MetricContext, kind: object, allowed: Sequence[str] = KINDS) -> str:
    """The score a curve records. ``auto``: softmax with several outputs, sigmoid with one.

    A softmax over a single output is always 1, so it is refused rather than scored.
    """
    kind = choice(kind, "kind", allowed)
    outputs = context.explanation.scores.shape[1]
    if kind == "auto":
        return "softmax" if outputs > 1 else "sigmoid"
    if kind == "softmax" and outputs == 1:
        raise OptionError(
            "kind='softmax' over a model with a single output is always 1; use kind='sigmoid'."
        )
    return kind


def single_maps(
    context: MetricContext, maps: torch.Tensor | None = None, rows: int | None = None
) -> torch.Tensor:
    """One float map per sample on the input grid, ``(N, *spatial)``, or a typed error
    (``rows``: the number of samples when ``maps`` explain another batch than the inputs)."""
    maps = context.maps if maps is None else maps
    want = (context.inputs.shape[0] if rows is None else rows, *context.inputs.shape[2:])
    if tuple(maps.shape) != want:
        raise InputError(
            f"Metrics score one map per sample, shape {want}; this explanation has maps of shape "
            f"{tuple(maps.shape)} (several layers or targets?). Explain one layer and one target."
        )
    return maps.to(torch.promote_types(maps.dtype, torch.float32))


def exact_float(device: torch.device) -> torch.dtype:
    """float64 for ranks of large maps (float32 is exact only up to 2**24), where supported."""
    return torch.float32 if device.type == "mps" else torch.float64


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis, ties given their average rank (as scipy.stats.rankdata).

    For a value ``v``: ``less`` values are smaller and ``leq`` are smaller or equal, so the tied
    block occupies ranks ``less + 1 .. leq`` and its average is ``(less + leq + 1) / 2``.
    """
    x = x.contiguous()
    ordered = x.sort(dim=-1).values
    less = torch.searchsorted(ordered, x, right=False)
    leq = torch.searchsorted(ordered, x, right=True)
    return (less + leq + 1).to(exact_float(x.device)) / 2


def spearman(original: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row pair ``(N, P)``, ties averaged.

    NaN where the original map is constant (nothing to compare); 0 where only ``other`` is
    constant: a map that collapsed to a constant kept none of the original's ordering.
    """
    a = average_ranks(original)
    b = average_ranks(other)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm_a, norm_b = a.square().sum(dim=1).sqrt(), b.square().sum(dim=1).sqrt()
    rho = (a * b).sum(dim=1) / (norm_a * norm_b).clamp_min(torch.finfo(a.dtype).tiny)
    rho = torch.where(norm_b > 0, rho.clamp(-1, 1), 0.0)
    return torch.where(norm_a > 0, rho, math.nan)


def ssim(
    original: torch.Tensor, other: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean SSIM (scikit-image) of min-max normalised maps ``(N, *spatial)``, per sample.

    The mean runs over the pixels whose whole window lies in ``valid`` (default: every pixel),
    which without ``valid`` is exactly scikit-image's own mean (it crops half a window at the
    borders). Maps are normalised over the valid pixels first, so SSIM compares structure, not
    scale. NaN where the original map is constant over the valid pixels (nothing to compare),
    when the maps are smaller than a 3-pixel window, or when no window fits.
    """
    from scipy.ndimage import binary_erosion
    from skimage.metrics import structural_similarity

    spatial = tuple(original.shape[1:])
    n = original.shape[0]
    valid = (
        torch.ones(spatial, dtype=torch.bool, device=original.device) if valid is None else valid
    )
    side = min(spatial)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return torch.full((n,), math.nan, device=original.device)
    keep = binary_erosion(valid.cpu().numpy(), np.ones((win,) * len(spatial)), border_value=0)
    if not keep.any():
        return torch.full((n,), math.nan, device=original.device)
    a = normalize(original, original.dim() - 1, valid).to("cpu", torch.float64).numpy()
    b = normalize(other, other.dim() - 1, valid).to("cpu", torch.float64).numpy()
    values = []
    for x, y in zip(a, b, strict=True):  # one call per sample: skimage has no batch axis
        _, full = structural_similarity(x, y, win_size=win, data_range=1.0, full=True)
        values.append(full[keep].mean() if x.max() > 0 else math.nan)  # as spearman(): NaN
    return torch.tensor(values, device=original.device)


def per_class(values: torch.Tensor, targets: torch.Tensor) -> dict[int, float]:
    """Mean of the defined values of each explained class (the papers' per-category accuracy)."""
    out = {}
    for c in targets.unique().tolist():
        picked = values[(targets == c) & ~values.isnan()]
        if picked.numel():
            out[int(c)] = float(picked.to("cpu", torch.float64).mean())
    return out
