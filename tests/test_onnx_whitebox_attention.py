"""Attention maps on ONNX transformer exports: the softmax outputs of the attention blocks are
captured as graph outputs; attention, rollout, gradient rollout and Grad-CAM on the tokens
entering the last attention equal the same methods on the PyTorch model (tiny timm,
torchvision and Hugging Face ViTs)."""

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


class Logits(nn.Module):
    """A Hugging Face model whose forward returns the logits (what an ONNX export outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x).logits


def tiny_vit(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "timm":
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
            num_classes=10,
        )  # fmt: skip
    if kind == "huggingface":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
            hidden_size=32, intermediate_size=64, num_labels=10, attn_implementation="sdpa",
        )  # fmt: skip
        return Logits(ViTForImageClassification(config))
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)  # nn.MultiheadAttention
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model


# The ONNX names of the tokens entering the last attention (timm: blocks.1.norm1; torchvision:
# encoder_layer_1.ln_1, before nn.MultiheadAttention's sequence-first transpose; Hugging Face:
# layers.1.layernorm_before).
TOKENS = {
    "timm": "/blocks/blocks.1/norm1/LayerNormalization_output_0",
    "torchvision": "/encoder/layers/encoder_layer_1/ln_1/LayerNormalization_output_0",
    "huggingface": "/m/vit/layers.1/layernorm_before/LayerNormalization_output_0",
}


@pytest.fixture(scope="module", params=["timm", "torchvision", "huggingface"])
def vit(request, tmp_path_factory) -> tuple[str, nn.Module, torch.Tensor, Path]:
    model = tiny_vit(request.param).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = export(model, x, tmp_path_factory.mktemp("vit") / "vit.onnx")
    return request.param, model, x, path


def test_attention_layers_and_default_layer(vit):
    kind, _, x, path = vit
    adapter = xai_core.adapt(str(path))
    attention = adapter.attention_layers()
    assert len(attention) == 2 and all(a.endswith("Softmax_output_0") for a in attention)
    # The tokens entering the last attention, not the patch embedding (the last 4D tensor).
    assert adapter.default_layer(x) == TOKENS[kind]
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
    _, model, x, path = vit
    on_onnx = xai_core.explain(str(path), x, method=method, **options)
    on_torch = xai_core.explain(model, x, method=method, **options)
    assert len(on_onnx.layers) == len(on_torch.layers)
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_cnn_exports_have_no_attention(tmp_path):
    model = xai_core.testing.tiny_cnn()
    path = export(model, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx")
    with pytest.raises(CapabilityError, match="attention"):
        xai_core.explain(str(path), torch.randn(2, 3, 16, 16), method="rollout")
