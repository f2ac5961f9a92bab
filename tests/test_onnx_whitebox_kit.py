"""The conformance kit's ``onnx`` check on white-box methods: CAM, the Grad-CAM family and
attention maps also run on the ONNX export of the kit's model, on the layers PyTorch used, and
must give the same maps; what cannot run there is skipped with its reason, never passed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from xai_attention import RawAttention
from xai_cam import CAM
from xai_gradcam import GradCAM, ScoreCAM
from xai_gradients import Saliency

from xai_core.core.errors import ConformanceError
from xai_core.testing import SkipCheck, explainer_checks, tiny_cnn

from .test_onnx_whitebox import CumulativeNet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def onnx_check(cls: type, **kwargs):
    return next(c for c in explainer_checks(cls, **kwargs) if c.name == "onnx")


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (CAM, {}),
        (GradCAM, {}),
        (GradCAM, {"layer": "3"}),  # a torch layer name, found in the graph by value
        (GradCAM, {"layers": ["3", "4"], "variant": "gradcam++"}),
        (ScoreCAM, {"batch_size": 4}),
    ],
)
def test_white_box_methods_run_on_the_onnx_export(cls, options):
    check = onnx_check(cls, options=options)
    assert check.skip is None
    check()  # raises ConformanceError if the maps on ONNX differ from PyTorch's


class BlindOnOnnx(GradCAM):
    """Grad-CAM that mirrors its maps on ONNX models: the check must catch it."""

    name = "blind_on_onnx"

    def explain(self, model, inputs, targets, *, layer: str | None = None):
        result = super().explain(model, inputs, targets, layer=layer)
        if model.kind != "onnx":
            return result
        maps = result.maps
        flipped = [m.flip(-1) for m in maps] if isinstance(maps, list) else maps.flip(-1)
        return dataclasses.replace(result, maps=flipped)


def test_a_method_that_differs_on_onnx_fails_the_check():
    check = onnx_check(BlindOnOnnx)
    with pytest.raises(ConformanceError, match="onnx: maps on the ONNX export vs PyTorch"):
        check()


def test_what_cannot_run_on_onnx_gets_its_reason():
    # Input gradients only: not compared there (the whole graph would be re-run in torch).
    assert "reads no layer" in onnx_check(Saliency).skip
    # An attention method on a model whose export has no attention: skipped when it runs.
    cnn = tiny_cnn()
    check = onnx_check(RawAttention, model=cnn, inputs=torch.randn(2, 3, 16, 16))
    assert check.skip is None
    with pytest.raises(SkipCheck, match="offers no attention"):
        check()
    # Grad-CAM at a layer whose tail has an operator the gradient pass lacks (CumSum).
    cumulative = onnx_check(
        GradCAM, model=CumulativeNet(), inputs=torch.randn(2, 3, 8, 8), options={"layer": "conv"}
    )
    with pytest.raises(SkipCheck, match=r"refused the model's ONNX export.*'CumSum'"):
        cumulative()
    # onnxruntime has no float64 convolution: the export cannot run, said so.
    double = onnx_check(CAM, model=tiny_cnn().double(), inputs=torch.randn(2, 3, 16, 16).double())
    with pytest.raises(SkipCheck, match="onnxruntime cannot run the model's ONNX export"):
        double()
