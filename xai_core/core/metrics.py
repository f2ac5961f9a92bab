"""The metric protocol: how much to trust an explanation, as a number per sample.

Metrics are plugins registered through ``register_metrics(register)``, like explainers. A metric
class declares its ``name``, its ``direction`` (is higher or lower better) and what it ``needs``
(ground-truth ``masks``, a ``torch`` model it can copy, ...), and computes one value per sample from
a :class:`MetricContext`. Two optional attributes tell ``compare()`` how to summarise the values:
``range`` (the interval every value lies in, e.g. ``(0.0, 1.0)``; ``None``, the default, is
unbounded), which confidence intervals never leave, and ``measured_once`` (``True`` when every
sample gets the same single measurement, like ``cost``: no interval and no ranking as a statistic).
``compare()`` builds the context; a metric never re-implements the explainer: it calls
``context.rerun(...)`` to explain perturbed inputs or a modified model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from xai_core.core.adapters import ModelAdapter
from xai_core.core.errors import PluginError, TargetError
from xai_core.core.explanation import Explanation
from xai_core.core.types import check_registered_class


class Direction(StrEnum):
    """Which way a metric's value is better."""

    HIGHER = "higher"
    LOWER = "lower"


class Need(StrEnum):
    """Something a metric needs beyond a model, inputs and an explanation."""

    MASKS = "masks"  # ground-truth regions (N, *spatial), bool
    # a model it may copy and modify (randomisation): an adapter implementing
    # xai_core.core.adapters.ParameterRandomization (every PyTorch model's)
    TORCH_MODEL = "torch-model"


@dataclass
class MetricContext:
    """Everything a metric may use; tensors are on the model's device.

    ``explanation`` holds one target per sample: ``maps`` is ``(N, *spatial)`` on the input grid
    and ``targets`` is ``(N, 1)``. ``score(x, rows)`` gives the target score of each row of ``x``
    (``rows`` maps rows to samples), evaluated in chunks of ``chunk_size``.
    ``rerun(inputs=..., model=...)`` explains again with the same method, options and targets.
    """

    model: ModelAdapter
    inputs: torch.Tensor
    explanation: Explanation
    method: str
    rerun: Callable[..., Explanation]
    masks: torch.Tensor | None = None
    chunk_size: int = 64
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def maps(self) -> torch.Tensor:
        return self.explanation.maps

    @property
    def targets(self) -> torch.Tensor:
        """The ``(N,)`` explained class of each sample."""
        if self.explanation.targets is None:
            raise TargetError("Metrics need class targets; this explanation used a callable.")
        return self.explanation.targets[:, 0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for any number of rows, in chunks, without gradients, in eval mode."""
        with torch.no_grad(), self.model.session():
            parts = [self.model.forward(c) for c in x.split(self.chunk_size)]
        return torch.cat(parts) if parts else x.new_zeros((0,))

    def score(self, x: torch.Tensor, rows: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
        """The target class's score of each row: softmax / sigmoid probability, or the logit."""
        out = self.logits(x)
        if kind == "softmax":
            out = out.softmax(dim=1)
        elif kind == "sigmoid":
            out = out.sigmoid()
        return out.gather(1, self.targets.index_select(0, rows)[:, None])[:, 0]


@dataclass
class MetricResult:
    """One value per sample (NaN where undefined, e.g. no mask), plus free-form details."""

    values: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Metric(Protocol):
    name: ClassVar[str]
    direction: ClassVar[Direction]
    needs: ClassVar[frozenset[Need]]

    # Optional (read with metric_range() / metric_measured_once()): the interval every value
    # lies in (None: unbounded), and whether the values are one measurement given to every sample.
    # range: ClassVar[tuple[float, float] | None] = None
    # measured_once: ClassVar[bool] = False

    def compute(self, context: MetricContext, **options: Any) -> MetricResult: ...


def metric_range(cls: Any) -> tuple[float, float] | None:
    """The metric's declared range, or ``None`` (unbounded) when it declares none."""
    bounds = getattr(cls, "range", None)
    return None if bounds is None else (float(bounds[0]), float(bounds[1]))


def metric_measured_once(cls: Any) -> bool:
    """Whether the metric's values are one measurement per method given to every sample."""
    return bool(getattr(cls, "measured_once", False))


def check_metric_class(cls: Any) -> None:
    """Raise PluginError when ``cls`` breaks the Metric protocol (said in words)."""
    check_registered_class(cls, "metric", "compute", "deletion")
    if not isinstance(getattr(cls, "direction", None), Direction):
        raise PluginError(
            f"{cls.__qualname__}.direction must be a xai_core.core.metrics.Direction."
        )
    needs = getattr(cls, "needs", frozenset())
    if not all(isinstance(n, Need) for n in needs):
        raise PluginError(f"{cls.__qualname__}.needs must hold xai_core.core.metrics.Need values.")
    bounds = getattr(cls, "range", None)
    if bounds is not None:
        ok = (
            isinstance(bounds, tuple)
            and len(bounds) == 2
            and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            and not any(math.isnan(b) for b in bounds)
            and bounds[0] < bounds[1]
        )
        if not ok:
            raise PluginError(
                f"{cls.__qualname__}.range must be None or a tuple (low, high) of numbers with "
                f"low < high (infinite allowed); got {bounds!r}."
            )
    if not isinstance(getattr(cls, "measured_once", False), bool):
        raise PluginError(f"{cls.__qualname__}.measured_once must be a bool.")
    params = inspect.signature(cls.compute).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise PluginError(f"{cls.__qualname__}.compute must list its options, not take **kwargs.")


def metric_options(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.compute).parameters.values()
    return {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
