"""The result contract every plugin's explainer and metric must keep, checked on every call.

A malformed result must surface as a :class:`~xai_core.core.errors.PluginContractError` naming the
plugin's distribution, the method or metric and what was wrong, never as a map the rest of the
pipeline silently reshapes, a NaN map that gets ranked, or one value too many (docs/conventions.md):

* an explainer returns an :class:`~xai_core.Attribution` whose maps are one tensor per layer of
  shape ``(N, K, *grid)``: ``N`` the batch, ``K`` the targets it resolved per sample, a grid of
  the input's spatial rank; floating point, finite, on the inputs' device; its ``scores`` are the
  ``(N, outputs)`` model scores (``(N, C)`` for class targets, ``(N, C, *output grid)`` for
  segmentation region targets), finite, on the same device;
* a metric returns a :class:`~xai_core.core.metrics.MetricResult` with one real value per sample,
  ``(N,)``: finite, or NaN where the metric is undefined for that sample (no mask, a constant
  map); never infinite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xai_core.core.errors import PluginContractError
from xai_core.core.metrics import MetricResult
from xai_core.core.targets import Targets
from xai_core.core.types import Attribution, ExplainerInfo, PluginInfo


def _origin(distribution: str | None, plugin: str) -> str:
    return distribution or f"the in-process plugin {plugin!r}"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _breach(who: str, origin: str) -> Callable[[str], PluginContractError]:
    """The error for a fault ``what`` in a result of ``who`` (a method or metric of ``origin``)."""

    def fail(what: str) -> PluginContractError:
        return PluginContractError(
            f"{who} broke the result contract: {what} This is a bug in {origin}; report it to "
            f"its authors."
        )

    return fail


def check_attribution(
    result: Any, info: ExplainerInfo, request: Targets, inputs: torch.Tensor
) -> None:
    """Raise :class:`PluginContractError` unless ``result`` keeps the explainer contract."""
    origin = _origin(info.distribution, info.plugin)
    fail = _breach(
        f"The method {info.name!r} from {origin} ({info.cls.__qualname__}.explain)", origin
    )

    if not isinstance(result, Attribution):
        raise fail(f"it returned a {type(result).__name__}, not an xai_core.Attribution.")
    if request.resolved is None:
        raise fail("it never called targets.resolve(scores), so nobody knows what it explained.")
    n, k, rank = inputs.shape[0], request.resolved.count, inputs.ndim
    maps = result.maps if isinstance(result.maps, list) else [result.maps]
    if not maps:
        raise fail("it returned no maps.")
    if not isinstance(result.details, dict):
        raise fail(f"details must be a dict; got {type(result.details).__name__}.")
    layers = result.layers
    if not isinstance(layers, list | tuple) or not all(isinstance(x, str) for x in layers):
        raise fail(f"layers must be a list of layer names; got {layers!r}.")
    if len(layers) not in (0, len(maps)):
        raise fail(f"it returned {len(maps)} maps but {len(layers)} layer names.")
    for i, m in enumerate(maps):
        which = f"map {i}" if len(maps) > 1 else "the map"
        if not isinstance(m, torch.Tensor):
            raise fail(f"{which} is a {type(m).__name__}, not a tensor.")
        want = f"(N={n}, K={k}, {rank - 2} spatial sizes)"
        if m.ndim != rank or m.shape[0] != n or m.shape[1] != k or 0 in m.shape[2:]:
            raise fail(f"{which} has shape {tuple(m.shape)}; the contract is {want}.")
        if not m.is_floating_point():
            raise fail(f"{which} has dtype {m.dtype}; maps must be floating point.")
        if m.device != inputs.device:
            raise fail(f"{which} is on {m.device}; the inputs and model are on {inputs.device}.")
    scores = result.scores
    if not isinstance(scores, torch.Tensor) or scores.ndim == 0 or scores.shape[0] != n:
        raise fail(f"scores must be the model's (N={n}, outputs) scores; got {_shape(scores)}.")
    # Class targets read (N, classes) scores; region targets (N, classes, *output grid).
    resolved = request.resolved
    want_ndim = 2 if resolved.region is None else resolved.region.ndim
    if resolved.indices is not None and scores.ndim != want_ndim:
        what = "classes" if resolved.region is None else "classes, *output grid"
        raise fail(f"scores must be (N={n}, {what}) for these targets; got {_shape(scores)}.")
    if not scores.is_floating_point() or scores.device != inputs.device:
        raise fail(
            f"scores must be floating point on {inputs.device}; got {scores.dtype} on "
            f"{scores.device}."
        )
    # One device sync for every tensor together; the per-tensor search runs only on failure.
    if not bool(torch.stack([torch.isfinite(t).all() for t in (*maps, scores)]).all()):
        for name, t in [*((f"map {i}", m) for i, m in enumerate(maps)), ("scores", scores)]:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise fail(f"{name} holds {bad} NaN or infinite value(s) of {t.numel()}.")


def check_metric_result(result: Any, metric: str, source: PluginInfo, n: int) -> torch.Tensor:
    """The metric's ``(N,)`` values as float64 on the CPU, or a :class:`PluginContractError`."""
    origin = _origin(source.distribution, source.plugin)
    fail = _breach(f"The metric {metric!r} from {origin}", origin)

    if not isinstance(result, MetricResult):
        raise fail(f"compute() returned a {type(result).__name__}, not a MetricResult.")
    values = result.values
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (n,):
        raise fail(f"values must be one number per sample, shape ({n},); got {_shape(values)}.")
    if values.is_complex() or values.device.type == "meta":
        raise fail(f"values must be real numbers in memory; got {values.dtype} on {values.device}.")
    if not isinstance(result.details, dict):
        raise fail(f"details must be a dict; got {type(result.details).__name__}.")
    values = values.detach().to("cpu", torch.float64)
    infinite = int(torch.isinf(values).sum())
    if infinite:
        raise fail(
            f"{infinite} of {n} values are infinite; a value is finite, or NaN where the metric "
            f"is undefined for that sample."
        )
    return values
