"""explain() refuses bad input with typed errors that say what was wrong, model left alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xai_core
from xai_core.core.errors import (
    DeviceError,
    InputError,
    InputTypeError,
    ModelError,
    TargetError,
    TargetTypeError,
    UnknownOptionError,
    XaiError,
)
from xai_core.testing import tiny_cnn
from xai_core.torch.capture import hook_count

MODEL = tiny_cnn()


def explain(x, **kw):
    return xai_core.explain(MODEL, x, method="gradcam", **kw)


GOOD = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    ("inputs", "error", "words"),
    [
        ([[1.0]], InputTypeError, "torch.Tensor"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), InputTypeError, "floating point"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.float64), InputTypeError, "torch.float32"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.float16), InputTypeError, "model.double()"),
        (torch.zeros(3, 8, 8), InputError, "unsqueeze(0)"),
        (torch.zeros(2, 3, 8), InputError, "(N, C, H, W)"),
        (torch.zeros(2, 3, 4, 8, 8), InputError, "(N, C, H, W)"),
        (torch.zeros(0, 3, 8, 8), InputError, "empty"),
        (torch.zeros(2, 1, 8, 8), InputError, "3 input channels; got 1"),
        (torch.zeros(2, 4, 8, 8), InputError, "3 input channels; got 4"),
        (torch.full((2, 3, 8, 8), float("nan")), InputError, "NaN"),
        (torch.tensor(float("inf")).expand(1, 3, 8, 8), InputError, "infinite"),
    ],
)
def test_bad_inputs(inputs, error, words):
    with pytest.raises(error) as err:
        explain(inputs)
    assert words in str(err.value)


def test_grayscale_hint():
    with pytest.raises(InputError, match="expand"):
        explain(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("targets", "error", "words"),
    [
        ([0], TargetError, "Got 1 targets for a batch of 2"),
        ([0, 1, 2], TargetError, "Got 3 targets for a batch of 2"),
        ([[0, 1], [2]], TargetError, "same number of targets"),
        ([4, 0], TargetError, "out of range"),
        (-1, TargetError, ">= 0"),
        ([0.5, 1.0], TargetTypeError, "integer class indices"),
        (torch.tensor([0.0, 1.0]), TargetTypeError, "integer class indices"),
        (True, TargetTypeError, "bool"),
        ("top", TargetTypeError, "'all'"),
        ({"a": 1}, TargetTypeError, "Cannot interpret"),
        (lambda out: out.sum(), TargetError, "shape (B,) or (B, K)"),
        (lambda out: "x", TargetError, "return a tensor"),
    ],
)
def test_bad_targets(targets, error, words):
    with pytest.raises(error) as err:
        explain(GOOD, targets=targets)
    assert words in str(err.value)


def test_unknown_option_is_named_with_suggestion():
    with pytest.raises(UnknownOptionError, match=r"'layr'.*Did you mean 'layer'"):
        explain(GOOD, layr="0")


def test_inputs_on_another_device_than_the_model():
    meta_model = tiny_cnn().to("meta")
    with pytest.raises(DeviceError, match="move them"):
        xai_core.explain(meta_model, GOOD, method="gradcam")


@pytest.mark.parametrize(
    ("targets", "shape"),
    [
        (None, (2, 8, 8)),
        (1, (2, 8, 8)),
        ([1, 3], (2, 8, 8)),
        (torch.tensor([1, 3]), (2, 8, 8)),
        ([[1, 3], [0, 2]], (2, 2, 8, 8)),
        ([[1], [0]], (2, 1, 8, 8)),
        ("all", (2, 4, 8, 8)),
        (lambda out: out[:, 2], (2, 8, 8)),
        (lambda out: out[:, :2], (2, 2, 8, 8)),
    ],
)
def test_target_forms_give_documented_shapes(targets, shape):
    exp = explain(GOOD, targets=targets)
    assert tuple(exp.maps.shape) == shape


def test_top_class_is_the_default_target():
    exp = explain(GOOD)
    assert exp.targets[:, 0].tolist() == MODEL(GOOD).argmax(1).tolist()


# -- property-based: whatever is thrown at explain(), it answers with an XaiError or a result ---

shapes = st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=6)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16])
fills = st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -1e30])
target_specs = st.one_of(
    st.none(),
    st.integers(-3, 6),
    st.lists(st.integers(-2, 5), max_size=4),
    st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), max_size=4),
    st.sampled_from(["all", "first", 1.5]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=dtypes, fill=fills, targets=target_specs)
def test_malformed_inputs_raise_only_typed_errors(shape, dtype, fill, targets):
    before = hook_count(MODEL)
    training = MODEL.training
    try:
        x = torch.full(shape, fill).to(dtype) if shape else torch.tensor(fill).to(dtype)
    except (RuntimeError, OverflowError):
        return
    try:
        exp = explain(x, targets=targets)
    except XaiError as err:
        assert str(err)  # every error explains itself
    else:
        assert exp.maps.shape[0] == x.shape[0]
        assert torch.isfinite(exp.maps).all()
    assert hook_count(MODEL) == before
    assert MODEL.training == training


def test_inputs_the_model_cannot_run_on_are_a_model_error_naming_the_shape():
    """torch's own message (a pooling with nothing left to pool) with the shape and what to
    check; hooks removed. The same from compare(), whose first forward pass fails."""
    from xai_core.demo import load_model

    model = load_model("cnn")  # three poolings: 4 pixels leave nothing
    tiny = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ModelError, match=r"shape \(1, 1, 4, 4\): .*Output size is too small") as e:
        xai_core.explain(model, tiny, method="gradcam")
    assert isinstance(e.value, RuntimeError)  # still what code catching torch's errors expects
    assert isinstance(e.value.__cause__, RuntimeError)  # torch's own, kept
    assert hook_count(model) == 0
    with pytest.raises(ModelError, match=r"cannot run on inputs of shape \(1, 1, 4, 4\)"):
        xai_core.compare(model, tiny, methods=["gradcam"], metrics=["sparseness"])


def test_a_timm_vit_given_another_size_is_a_model_error():
    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3
    ).eval()
    with pytest.raises(ModelError, match=r"shape \(1, 3, 16, 16\): .*16"):
        xai_core.explain(vit, torch.zeros(1, 3, 16, 16), method="saliency")


def test_an_explainers_own_error_is_not_blamed_on_the_inputs(monkeypatch):
    """The model runs on these inputs: the explainer's RuntimeError stays itself."""
    info = xai_core.get_registry().get_explainer("gradcam")

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in the explainer")

    monkeypatch.setattr(info.cls, "explain", broken)
    with pytest.raises(RuntimeError, match="a bug in the explainer") as caught:
        explain(GOOD)
    assert not isinstance(caught.value, XaiError)
