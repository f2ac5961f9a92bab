"""compare(): method and metric selection, shared targets, failures isolated, aggregates."""

from __future__ import annotations

import math

import pytest
import torch

import xai_core
from xai_core.core.errors import InputError, OptionError, UnknownMethodError, UnknownOptionError
from xai_core.core.metrics import Direction, MetricResult, Need
from xai_core.workflows.compare import compare, mean_ci


class MaxValue:
    name = "max_value"
    direction = Direction.LOWER
    needs = frozenset()

    def compute(self, context, *, scale: float = 1.0):
        return MetricResult(context.maps.flatten(1).amax(1) * scale)


class InMask:
    name = "in_mask"
    direction = Direction.HIGHER
    needs = frozenset({Need.MASKS})

    def compute(self, context):
        return MetricResult(context.masks.flatten(1).float().mean(1))


class Failing:
    name = "failing"
    direction = Direction.HIGHER
    needs = frozenset()

    def compute(self, context):
        raise ValueError("broken metric")


@pytest.fixture
def metrics(fresh_registry):
    class Plugin:
        @xai_core.hookimpl
        def register_metrics(self, register):
            for cls in (MaxValue, InMask, Failing):
                register(cls)

    fresh_registry.register_plugin(Plugin(), "test-metrics")
    return fresh_registry


def test_default_methods_are_those_the_model_supports(metrics, cnn, images, tmp_path):
    result = compare(cnn, images, metrics=["max_value"])
    assert {"cam", "gradcam", "occlusion"} <= set(result.methods)
    assert "rollout" in result.skipped_methods and "attention" in result.skipped_methods["rollout"]


def test_onnx_models_skip_attention_methods_with_reason(metrics, images, tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        xai_core.testing.tiny_cnn(),
        (images,),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    result = compare(
        str(path),
        images,
        methods=["rollout", "gradcam", "occlusion"],
        metrics=["max_value"],
        options={"occlusion": {"window": 4, "stride": 4}},
    )
    assert result.methods == ["gradcam", "occlusion"]  # Grad-CAM on the ONNX graph
    assert "attention" in result.skipped_methods["rollout"]


def test_every_method_explains_the_same_targets(metrics, cnn, images):
    result = compare(cnn, images, methods=["gradcam", "cam"], metrics=["max_value"])
    top = cnn(images).argmax(1)
    assert result.targets.tolist() == top.tolist()
    for exp in result.explanations.values():
        assert exp.targets[:, 0].tolist() == top.tolist()
    fixed = compare(cnn, images, targets=[1, 2], methods=["gradcam"], metrics=["max_value"])
    assert fixed.explanations["gradcam"].targets[:, 0].tolist() == [1, 2]


def test_metric_needing_masks_is_skipped_without_them(metrics, cnn, images):
    result = compare(cnn, images, methods=["gradcam"])
    assert "masks" in result.skipped_metrics["in_mask"]
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8] = True
    with_masks = compare(cnn, images, methods=["gradcam"], masks=masks)
    assert with_masks.values[("gradcam", "in_mask")].tolist() == [0.5, 0.0]


def test_a_failing_metric_is_recorded_and_the_others_survive(metrics, cnn, images):
    result = compare(cnn, images, methods=["gradcam"], metrics=["failing", "max_value"])
    assert "broken metric" in result.errors[("gradcam", "failing")]
    assert torch.isnan(result.values[("gradcam", "failing")]).all()
    assert not torch.isnan(result.values[("gradcam", "max_value")]).any()


def test_ranking_follows_the_metric_direction(metrics, cnn, images):
    result = compare(
        cnn,
        images,
        methods=["gradcam", "occlusion"],
        metrics=["max_value"],
        options={"occlusion": {"window": 4, "stride": 4}},
    )
    means = {m: result.aggregate(m, "max_value").mean for m in result.methods}
    assert result.ranking("max_value") == sorted(means, key=means.get)  # lower is better


def test_bad_requests_are_typed_errors(metrics, cnn, images):
    with pytest.raises(UnknownMethodError):
        compare(cnn, images, methods=["nope"])
    with pytest.raises(UnknownMethodError):
        compare(cnn, images, metrics=["nope"])
    with pytest.raises(UnknownOptionError, match="scale"):
        compare(cnn, images, methods=["gradcam"], metric_options={"max_value": {"scal": 2}})
    with pytest.raises(UnknownOptionError):
        compare(cnn, images, methods=["gradcam"], options={"gradcam": {"layr": "0"}})
    with pytest.raises(InputError, match="masks must have shape"):
        compare(cnn, images, methods=["gradcam"], masks=torch.zeros(2, 8, 8))
    with pytest.raises(OptionError, match="one class per sample"):
        compare(cnn, images, targets="all", methods=["gradcam"])


def test_mean_ignores_undefined_values_and_the_interval_keeps_the_range():
    values = torch.tensor([0.1, 0.2, 0.9, float("nan"), 0.95])
    agg = mean_ci(values, (0.0, 1.0))
    assert agg.n == 4 and agg.mean == pytest.approx(0.5375) and agg.kind == "bootstrap"
    assert 0.0 <= agg.low < agg.mean < agg.high <= 1.0
    assert math.isnan(mean_ci(torch.tensor([float("nan")])).mean)
