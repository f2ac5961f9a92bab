"""Vision transformers from timm, Hugging Face and torchvision: attention capture, attention
maps, and Grad-CAM's default layer (docs/methods/attention.md, docs/methods/gradcam.md).

Tiny random-weight models (2 blocks, 32-56 px), built once per module."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import xai_core
from xai_core import Capability
from xai_core.core.errors import CapabilityError
from xai_core.torch.adapter import TorchAdapter
from xai_core.torch.capture import capture, capture_attention, explicit_attention, hook_count

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ATTENTION_METHODS = ("attention", "rollout", "grad_rollout")


def _timm(name: str, size: int, fused: bool = True, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=size, **kw)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def _hf(model_cls: str, config_cls: str, impl: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = getattr(transformers, config_cls)(
        **size, image_size=32, patch_size=8, num_labels=5, attn_implementation=impl, **kw
    )
    return getattr(transformers, model_cls)(config)


def _tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: no gradients
    return model


small = dict(depth=2, embed_dim=32, num_heads=2)
# name: (builder, input size, Grad-CAM's expected default layer)
VITS: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "timm-vit": (lambda: _timm("vit_tiny_patch16_224", 32, **small), 32, "blocks.1.norm1"),
    "timm-vit-eager": (
        lambda: _timm("vit_tiny_patch16_224", 32, fused=False, **small), 32, "blocks.1.norm1"
    ),
    "timm-deit": (lambda: _timm("deit_tiny_patch16_224", 32, **small), 32, "blocks.1.norm1"),
    "timm-eva02": (lambda: _timm("eva02_tiny_patch14_224", 28, **small), 28, "blocks.1.norm1"),
    "timm-beit": (lambda: _timm("beit_base_patch16_224", 32, **small), 32, "blocks.1.norm1"),
    "timm-dinov2-reg": (
        lambda: _timm("vit_small_patch14_reg4_dinov2", 28, **small), 28, "blocks.1.norm1"
    ),
    "hf-vit-eager": (
        lambda: _hf("ViTForImageClassification", "ViTConfig", "eager"),
        32,
        "vit.layers.1.layernorm_before",
    ),
    "hf-vit-sdpa": (
        lambda: _hf("ViTForImageClassification", "ViTConfig", "sdpa"),
        32,
        "vit.layers.1.layernorm_before",
    ),
    "hf-deit-distilled": (
        lambda: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", "sdpa"),
        32,
        "deit.layers.1.layernorm_before",
    ),
    "hf-dinov2": (
        lambda: _hf("Dinov2ForImageClassification", "Dinov2Config", "sdpa"),
        32,
        "dinov2.encoder.layer.1.norm1",
    ),
    "hf-beit": (
        lambda: _hf(
            "BeitForImageClassification", "BeitConfig", "eager", use_relative_position_bias=True
        ),
        32,
        "beit.layers.1.layernorm_before",
    ),
    "tv-vit": (_tv_vit, 32, "encoder.layers.encoder_layer_1.ln_1"),
}


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> dict[str, object]:
    """Everything an explanation could change: flags, config, modes, parameters, hooks."""
    config = getattr(model, "config", None)
    return {
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
        "impl": getattr(config, "_attn_implementation", None),
        "config": config.to_dict() if config is not None else None,
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hook_count(model),
    }


def _same_state(a: dict[str, object], b: dict[str, object]) -> bool:
    pa, pb = a["params"], b["params"]
    assert pa.keys() == pb.keys()
    rest = {k: v for k, v in a.items() if k != "params"} == {
        k: v for k, v in b.items() if k != "params"
    }
    return rest and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module", params=list(VITS))
def vit(request) -> tuple[str, nn.Module, torch.Tensor, str]:
    build, size, layer = VITS[request.param]
    return request.param, build(), _images(size), layer


# -- attention capture and maps ------------------------------------------------------------------


def test_attention_methods_on_every_vit(vit) -> None:
    name, model, x, _ = vit
    assert Capability.ATTENTION in TorchAdapter(model).capabilities, name
    model.train()  # the user's mode: explanations run in eval mode and restore it
    before = _state(model)
    with torch.no_grad():
        plain = xai_core.torch.adapter.scores_of(model.eval()(x))
    model.train()
    for method in ATTENTION_METHODS:
        exp = xai_core.explain(model, x, method=method, targets=[[0, 3], [0, 3]])
        grid = exp.details["grid"]
        assert grid in {(4, 4), (2, 2)} and exp.raw[0].shape == (2, 2, *grid), name
        assert bool(torch.isfinite(exp.raw[0]).all()), (name, method)
        assert exp.raw[0].abs().sum() > 0, (name, method)
        # The model computed what it always computes: the explicit attention is the model's.
        torch.testing.assert_close(exp.scores, plain, atol=1e-5, rtol=1e-4)
        assert _same_state(before, _state(model)), (name, method)
    assert model.training


def test_fused_and_eager_attention_give_the_same_maps() -> None:
    """timm with F.scaled_dot_product_attention (computed explicitly by xai-core) and with its
    own eager softmax: the same weights, so the same maps, gradients included."""
    fused = _timm("vit_tiny_patch16_224", 32, **small)
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = _images(32)
    for method in ATTENTION_METHODS:
        a = xai_core.explain(fused, x, method=method, targets=[1, 2]).raw[0]
        b = xai_core.explain(eager, x, method=method, targets=[1, 2]).raw[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))


def test_timm_weights_equal_a_hand_computation() -> None:
    """softmax(q k^T / sqrt(d)) from the first block's qkv weights, written out by hand."""
    model = _timm("vit_tiny_patch16_224", 32, **small).eval()
    attn = model.blocks[0].attn
    x = _images(32)
    with (
        torch.no_grad(),
        capture({"a": attn}, inputs=True) as entering,
        capture_attention({"a": attn}) as seen,
    ):
        model(x)
    tokens = entering.last("a")  # (N, T, C)
    n, t, c = tokens.shape
    qkv = F.linear(tokens, attn.qkv.weight, attn.qkv.bias).reshape(n, t, 3, 2, c // 2)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    reference = (q @ k.transpose(-2, -1) / (c // 2) ** 0.5).softmax(dim=-1)
    torch.testing.assert_close(seen.last("a"), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hugging_face_weights_equal_output_attentions(impl) -> None:
    """The weights xai-core reads equal what the model itself returns with
    ``output_attentions=True`` in eager mode, whichever implementation it was built with."""
    model = _hf("ViTForImageClassification", "ViTConfig", impl).eval()
    reference_model = _hf("ViTForImageClassification", "ViTConfig", "eager").eval()
    x = _images(32)
    with torch.no_grad():
        reference = reference_model(x, output_attentions=True).attentions
    exp = xai_core.explain(model, x, method="attention", layer=0, head=1)
    torch.testing.assert_close(exp.raw[0][:, 0], reference[0][:, 1, 0, 1:].unflatten(-1, (4, 4)))
    # Same weights (same seed), other implementation: the same gradient-weighted rollout.
    ours = xai_core.explain(model, x, method="grad_rollout", targets=[[1, 4], [0, 2]]).raw[0]
    eager = xai_core.explain(reference_model, x, method="grad_rollout", targets=[[1, 4], [0, 2]])
    torch.testing.assert_close(ours, eager.raw[0], atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == impl


def test_explicit_attention_equals_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    boolean = torch.rand(6, 6, generator=g) > 0.3
    boolean.fill_diagonal_(True)
    cases = [
        {},
        {"attn_mask": torch.randn(2, 1, 6, 6, generator=g)},
        {"attn_mask": boolean},
        {"is_causal": True},
        {"scale": 0.3},
    ]
    for kwargs in cases:
        out, weights = explicit_attention(q, k, v, **kwargs)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    gqa, _ = explicit_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
    torch.testing.assert_close(
        gqa, F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
    )
    with pytest.raises(CapabilityError, match="dropout"):
        explicit_attention(q, k, v, dropout_p=0.1)


def test_structural_attention_module_that_records_nothing_is_refused() -> None:
    class Opaque(nn.Module):  # looks like attention, mixes tokens without softmax or SDPA
        num_heads = 2

        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.qkv(x)[..., :8].cumsum(dim=1))

    module = Opaque()
    with pytest.raises(CapabilityError, match="record_attention"), capture_attention({"o": module}):
        module(torch.randn(1, 4, 8))
    assert hook_count(module) == 0


# -- windowed attention ----------------------------------------------------------------------------


def _swins() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    timm_swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=56,
        depths=(1, 1), num_heads=(1, 2), embed_dim=16,
    )
    hf_swin = transformers.SwinForImageClassification(
        transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
            window_size=2, num_labels=5,
        )
    )
    return {"timm": (timm_swin, _images(56)), "hf": (hf_swin, _images(32))}


@pytest.fixture(scope="module")
def swins() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return _swins()


def test_windowed_attention_is_not_applicable(swins) -> None:
    for name, (model, x) in swins.items():
        assert Capability.ATTENTION in TorchAdapter(model).capabilities
        offered = {i.name for i in xai_core.list_explainers(model=model)}
        assert not offered & set(ATTENTION_METHODS), name
        assert "gradcam" in offered
        for method in ATTENTION_METHODS:
            with pytest.raises(CapabilityError, match="windows"):
                xai_core.explain(model, x, method=method)


# -- Grad-CAM's default layer ----------------------------------------------------------------------


def _depends_on_input(model: nn.Module, layer: str, x: torch.Tensor) -> bool:
    module = dict(model.named_modules())[layer]
    with torch.no_grad(), capture({layer: module}, detach=True) as seen:
        model.eval()(torch.cat([x[:1], x[:1].flip(-1) + 1]))
    out = seen.last(layer)
    return out.shape[0] == 2 and not torch.equal(out[0], out[1])


def test_gradcam_default_layer_is_the_tokens_entering_the_last_attention(vit) -> None:
    name, model, x, expected = vit
    exp = xai_core.explain(model, x, method="gradcam")
    assert exp.layers == [expected], name
    assert exp.details["layouts"] == {expected: "tokens"}
    assert exp.raw[0].shape[-2:] == exp.details["token_layers"][expected][1]
    assert bool(torch.isfinite(exp.raw[0]).all()) and exp.raw[0].abs().sum() > 0, name
    assert _depends_on_input(model, expected, x)


def test_gradcam_default_on_a_timm_vit_equals_a_hand_computation() -> None:
    model = _timm("vit_small_patch14_reg4_dinov2", 28, **small).eval()  # class + 4 registers
    x = _images(28)
    exp = xai_core.explain(model, x, method="gradcam", targets=2)
    assert exp.details["token_layers"] == {"blocks.1.norm1": (5, (2, 2))}
    tokens: list[torch.Tensor] = []
    handle = model.blocks[1].norm1.register_forward_hook(lambda m, a, out: tokens.append(out))
    try:
        score = model(x)[:, 2].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, tokens[0])
    acts, grads = tokens[0][:, 5:].detach(), grad[:, 5:]  # patch tokens only
    weights = grads.mean(dim=1, keepdim=True)  # (N, 1, C): mean over the patch grid
    reference = (acts * weights).sum(-1).clamp(min=0).view(2, 2, 2)
    torch.testing.assert_close(exp.raw[0][:, 0], reference, atol=1e-6, rtol=1e-5)


def test_gradcam_default_layer_on_hierarchical_models(swins) -> None:
    torch.manual_seed(0)
    convnext = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    )
    cases = {**swins, "hf-convnext": (convnext, _images(32))}
    # timm Swin's last norm is channels-last (N, H, W, C); Hugging Face Swin keeps (N, L, C).
    layouts = {"timm": "channels_last", "hf": "tokens", "hf-convnext": "channels_first"}
    for name, (model, x) in cases.items():
        exp = xai_core.explain(model, x, method="gradcam")
        (layer,) = exp.layers
        assert exp.details["layouts"] == {layer: layouts[name]}, (name, layer)
        assert "attn" not in layer and "attention" not in layer, (name, layer)
        assert bool(torch.isfinite(exp.raw[0]).all()) and exp.raw[0].abs().sum() > 0, name
        assert _depends_on_input(model, layer, x), (name, layer)


def test_attention_that_cannot_be_reproduced_is_refused(monkeypatch) -> None:
    """The explicit computation must give the fused kernel's output, or no map is drawn."""
    import xai_core.torch.capture

    def off_by_a_little(*args, **kwargs):
        out, weights = explicit_attention(*args, **kwargs)
        return out + 1e-3, weights

    monkeypatch.setattr(xai_core.torch.capture, "explicit_attention", off_by_a_little)
    model = _timm("vit_tiny_patch16_224", 32, **small)
    with pytest.raises(CapabilityError, match="differs from its explicit"):
        xai_core.explain(model, _images(32), method="rollout")
    assert hook_count(model) == 0
    assert not torch.overrides._get_current_function_mode_stack()  # the mode is gone too


@pytest.mark.parametrize("name", ["levit_128s", "mobilevit_xxs"])
def test_hybrids_get_an_input_dependent_default_and_typed_attention_errors(name) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=64)
    x = _images(64)
    exp = xai_core.explain(model, x, method="gradcam")
    (layer,) = exp.layers
    assert bool(torch.isfinite(exp.raw[0]).all()) and exp.raw[0].abs().sum() > 0
    assert math.prod(exp.raw[0].shape[2:]) > 1 and _depends_on_input(model, layer, x)
    for method in ATTENTION_METHODS:
        try:
            maps = xai_core.explain(model, x, method=method).raw[0]
        except CapabilityError as error:  # windows (MobileViT), token counts per stage (LeViT)
            assert "windows" in str(error) or "token count" in str(error)
        else:
            assert bool(torch.isfinite(maps).all())
