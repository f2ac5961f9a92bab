"""Attention maps on ONNX transformer exports: the softmax outputs of the attention blocks are
captured as graph outputs; attention, rollout, gradient rollout and Grad-CAM on the tokens
entering the last attention equal the same methods on the PyTorch model (a tiny timm ViT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import xai_core
from xai_core.core.adapters import check_protocols
from xai_core.core.errors import CapabilityError

from .test_onnx_whitebox import assert_same_maps, export

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> tuple[nn.Module, torch.Tensor, Path]:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        num_classes=10,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x, export(model, x, tmp_path_factory.mktemp("vit") / "vit.onnx")


def test_attention_layers_and_default_layer(vit):
    _, x, path = vit
    adapter = xai_core.adapt(str(path))
    assert adapter.attention_layers() == [
        "/blocks/blocks.0/attn/Softmax_output_0",
        "/blocks/blocks.1/attn/Softmax_output_0",
    ]
    # The tokens entering the last attention (timm's blocks.1.norm1), not the patch embedding.
    assert adapter.default_layer(x) == "/blocks/blocks.1/norm1/LayerNormalization_output_0"
    check_protocols(adapter)
    listed = {info.name for info in xai_core.list_explainers(model=str(path))}
    assert {"attention", "rollout", "grad_rollout", "gradcam", "occlusion"} <= listed


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("attention", {}),
        ("rollout", {}),
        ("grad_rollout", {"targets": [[1, 3], [2, 2]]}),
        ("gradcam", {"targets": [[1, 3], [2, 2]]}),
    ],
)
def test_equals_torch(vit, method, options):
    model, x, path = vit
    on_onnx = xai_core.explain(str(path), x, method=method, **options)
    on_torch = xai_core.explain(model, x, method=method, **options)
    assert len(on_onnx.layers) == len(on_torch.layers)
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_cnn_exports_have_no_attention(tmp_path):
    model = xai_core.testing.tiny_cnn()
    path = export(model, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx")
    with pytest.raises(CapabilityError, match="attention"):
        xai_core.explain(str(path), torch.randn(2, 3, 16, 16), method="rollout")
