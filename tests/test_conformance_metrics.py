"""The metric kit: the built-in metrics pass it; each kind of broken metric is caught."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from xai_metrics import METRICS

from xai_core.core.errors import ConformanceError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_core.testing import check_metric, metric_checks, parametrize_metrics


@parametrize_metrics(list(METRICS))
def test_the_built_in_metrics_conform(check):
    check()


class Share:
    """The share of each map's positive mass inside its mask; NaN where the mask is empty."""

    name = "share"
    direction = Direction.HIGHER
    needs = frozenset({Need.MASKS})
    range = (0.0, 1.0)

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        maps = context.maps.clamp_min(0).flatten(1) ** power
        masks = context.masks.flatten(1)
        share = (maps * masks).sum(1) / maps.sum(1).clamp_min(1e-12)
        return MetricResult(torch.where(masks.any(1), share, math.nan))


class OutOfRange(Share):
    name = "out_of_range"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        return MetricResult(super().compute(context, power=power).values + 1.5)


class ZeroWhereUndefined(Share):
    name = "zero_where_undefined"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        return MetricResult(super().compute(context, power=power).values.nan_to_num(0.0))


class Infinite(Share):
    name = "infinite"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        values = super().compute(context, power=power).values
        return MetricResult(values / (values - values))  # 0/0 = NaN, x/0 = inf


class Jittery(Share):
    name = "jittery"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        noise = torch.rand(context.inputs.shape[0], generator=torch.Generator().manual_seed(
            time.perf_counter_ns()))  # fmt: skip
        return MetricResult(super().compute(context, power=power).values * 0.5 + 0.5 * noise)


class SeedsNumpy(Share):
    name = "seeds_numpy"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        np.random.seed(0)
        return super().compute(context, power=power)


class TrainsTheModel(Share):
    name = "trains_the_model"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        context.model.module.eval()  # and forgets to restore the training flags
        return super().compute(context, power=power)


class BatchNormalised(Share):
    name = "batch_normalised"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        values = super().compute(context, power=power).values
        return MetricResult(values / values.nansum().clamp_min(1e-12))


class ScalesInputs(Share):
    name = "scales_inputs"

    def compute(self, context: MetricContext, *, power: float = 1.0) -> MetricResult:
        context.inputs.mul_(2)
        return super().compute(context, power=power)


class TakesKwargs(Share):
    name = "takes_kwargs"

    def compute(self, context: MetricContext, **options) -> MetricResult:
        return super().compute(context)


class Backwards(Share):
    name = "backwards"
    direction = Direction.LOWER  # but a larger share inside the mask is better


class StringDirection(Share):
    name = "string_direction"
    direction = "higher"


def test_a_good_metric_passes_every_check():
    report = check_metric(Share)
    assert report.names("failed") == []
    assert report["range"].status == "passed"
    assert report["nan_where_undefined"].status == "passed"
    assert report["direction"].status == "passed"


@pytest.mark.parametrize(
    ("cls", "check", "fault"),
    [
        (Backwards, "direction", "the wrong way round"),
        (OutOfRange, "range", r"outside the declared range \[0.0, 1.0\]"),
        (ZeroWhereUndefined, "nan_where_undefined", "empty mask got 0"),
        (Infinite, "result", "infinite"),
        (Jittery, "deterministic", "two identical calls"),
        (SeedsNumpy, "global_rng", "np.random.seed"),
        (TrainsTheModel, "model_untouched", "training changed"),
        (BatchNormalised, "batch_invariance", "alone scored"),
        (ScalesInputs, "inputs_untouched", "modified the inputs"),
        (TakesKwargs, "protocol", "kwargs"),
        (StringDirection, "protocol", "Direction"),
    ],
    ids=lambda v: v.name if isinstance(v, type) else None,
)
def test_each_broken_metric_is_caught_by_its_check(cls, check, fault):
    checks = {c.name: c for c in metric_checks(cls)}
    with pytest.raises(ConformanceError, match=fault):
        checks[check]()
    with pytest.raises(ConformanceError, match=f"- {check}: .*{fault}"):
        check_metric(cls)


def test_a_metric_without_masks_skips_the_mask_check_with_its_reason():
    class Mean(Share):
        name = "mean"
        needs = frozenset()
        range = None

        def compute(self, context: MetricContext) -> MetricResult:
            return MetricResult(context.maps.flatten(1).mean(1))

    report = check_metric(Mean)
    assert report["nan_where_undefined"].status == "skipped"
    assert "needs no masks" in report["nan_where_undefined"].message
    assert report["range"].status == "skipped"
    assert "needs none" in report["direction"].message
    assert report.ok
