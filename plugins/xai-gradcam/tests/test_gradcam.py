"""Grad-CAM against hand-computed maps, the CAM identity, per-target and per-layer loops, and
models that break naive hooks (in-place ReLU, a module used twice, in-place edits later)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from xai_gradcam import GradCAM

import xai_core
from xai_core.core.errors import LayerTypeError, OptionError, TargetError
from xai_core.torch.capture import hook_count

VARIANTS = ("gradcam", "guided", "gradcam++")
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
X = torch.tensor([[[[1.0, -2.0], [3.0, 2.0]]]])  # (1, 1, 2, 2); its mean is 1


def tiny() -> nn.Module:
    """A = conv(x) = (x, -x); y = W mean_ij A + b, W = [[2, 1], [1, 3]]: dy_c/dA_k = W[c, k] / 4."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        fc.weight.copy_(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        fc.bias.copy_(torch.tensor([0.5, -1.0]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


# Class 0: g = (1/2, 1/4) everywhere, sum_ij A = (4, -4).
#   gradcam:   alpha = (1/2, 1/4)                                  -> ReLU(x/4)
#   guided:    alpha = (1/2 * 3/4, 1/4 * 1/4) (3 and 1 positive A)  -> ReLU(5x/16)
#   gradcam++: a = g^2 / (2 g^2 + S g^3) = (1/4, 1), alpha = 4 a g  -> ReLU(x/2 - x) = ReLU(-x/2)
HAND = {
    ("gradcam", 0): [[0.25, 0.0], [0.75, 0.5]],
    ("guided", 0): [[0.3125, 0.0], [0.9375, 0.625]],
    ("gradcam++", 0): [[0.0, 1.0], [0.0, 0.0]],
    ("gradcam", 1): [[0.0, 1.0], [0.0, 0.0]],  # alpha = (1/4, 3/4): ReLU(-x/2)
}


@pytest.mark.parametrize(("variant", "target"), list(HAND))
def test_hand_computed(variant, target):
    exp = xai_core.explain(tiny(), X, method="gradcam", targets=target, variant=variant)
    assert exp.layers == ["0"]  # the default: the last module with a spatial output
    torch.testing.assert_close(exp.raw[0], torch.tensor(HAND[variant, target])[None, None])


def test_hand_computed_without_relu():
    exp = xai_core.explain(tiny(), X, method="gradcam", targets=0, relu=False)
    torch.testing.assert_close(exp.raw[0], X / 4)


class GapNet(nn.Module):
    """conv -> ReLU -> conv -> global average pooling -> linear, 2D or 3D.

    ``body``'s output is the tensor fed into pooling, and it has negative values, so ReLU(CAM)
    differs from CAM.
    """

    def __init__(self, dims: int = 2, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.body = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, padding=1))
        self.fc = nn.Linear(5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=tuple(range(2, x.ndim))))


def batch(n: int, size: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(6, 7), (4, 5, 3)])
def test_equals_relu_cam_over_positions_at_pooled_tensor(size):
    """alpha_k^c = W[c, k] / Z at the tensor fed into GAP, so Grad-CAM = ReLU(CAM) / Z."""
    model, x = GapNet(dims=len(size)), batch(2, size)
    exp = xai_core.explain(model, x, method="gradcam", targets="all", layer="body")
    with torch.no_grad():
        cam = torch.einsum("kc,nc...->nk...", model.fc.weight, model.body(x))
    zeta = torch.tensor(size).prod()
    torch.testing.assert_close(exp.raw[0], cam.clamp(min=0) / zeta)


class SquareNet(GapNet):
    """Gradients that vary over positions and vanish where A < 0 (for guided and ++)."""

    def head(self, acts: torch.Tensor) -> torch.Tensor:
        return self.fc(acts.relu().pow(2).mean(dim=tuple(range(2, acts.ndim))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def reference_gradients(model: SquareNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` at ``body`` and d y[:, c] / d A for every class ``c``, ``(C, N, *A.shape[1:])``."""
    acts = model.body(x).detach().requires_grad_(True)
    scores = model.head(acts)
    grads = [
        torch.autograd.grad(scores[:, c].sum(), acts, retain_graph=True)[0]
        for c in range(scores.shape[1])
    ]
    return acts.detach(), torch.stack(grads)


def test_variants_equal_their_formulas_with_varying_gradients():
    model, x = SquareNet(), batch(2, (5, 4))
    acts, g = reference_gradients(model, x)  # (N, C, h, w), (K, N, C, h, w)
    total = acts.sum(dim=(2, 3), keepdim=True)
    a = g**2 / torch.where(2 * g**2 + total * g**3 == 0, 1.0, 2 * g**2 + total * g**3)
    alphas = {
        "gradcam": g.mean(dim=(3, 4)),
        "guided": (g * (acts > 0) * (g > 0)).mean(dim=(3, 4)),
        "gradcam++": (a * g.clamp(min=0)).sum(dim=(3, 4)),
    }
    for variant, alpha in alphas.items():
        expected = torch.einsum("knc,nchw->nkhw", alpha, acts).clamp(min=0)
        exp = xai_core.explain(
            model, x, method="gradcam", targets="all", layer="body", variant=variant
        )
        torch.testing.assert_close(exp.raw[0], expected, msg=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("targets", [[[2, 0], [1, 1], [0, 2]], "all"])
def test_several_targets_equal_one_at_a_time(variant, targets):
    model, x = SquareNet(classes=3), batch(3, (6, 5))
    exp = xai_core.explain(
        model, x, method="gradcam", targets=targets, layer="body.0", variant=variant, relu=False
    )
    columns = torch.tensor([[2, 0], [1, 1], [0, 2]] if targets != "all" else [[0, 1, 2]] * 3)
    assert exp.maps.shape == (3, columns.shape[1], 6, 5)
    for k in range(columns.shape[1]):
        one = xai_core.explain(
            model,
            x,
            method="gradcam",
            targets=columns[:, k].tolist(),
            layer="body.0",
            variant=variant,
            relu=False,
        )
        torch.testing.assert_close(exp.raw[0][:, k], one.raw[0][:, 0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_several_layers_equal_one_at_a_time(variant):
    model, x = SquareNet(dims=3), batch(2, (4, 5, 3))
    names = ["body.0", "body.1", "body"]
    exp = xai_core.explain(
        model, x, method="gradcam", targets=[[0, 2], [1, 0]], layers=names, variant=variant
    )
    assert exp.layers == names
    assert exp.maps.shape == (2, 2, 3, 4, 5, 3)  # (N, K, L, *spatial)
    for name, raw in zip(names, exp.raw, strict=True):
        one = xai_core.explain(
            model, x, method="gradcam", targets=[[0, 2], [1, 0]], layer=name, variant=variant
        )
        torch.testing.assert_close(raw, one.raw[0])
        torch.testing.assert_close(exp.layer(name), one.maps)


# -- models that break naive hooks ---------------------------------------------------------


class InPlace(nn.Module):
    """In-place ReLUs right after the hooked convolutions: a module and DenseNet's functional."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv2(self.relu(self.conv1(x)))
        a = F.relu(a, inplace=self.inplace)
        return self.fc(F.adaptive_avg_pool2d(a, 1).flatten(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inplace_relu_after_hooked_layer(variant):
    model, x = InPlace(inplace=True), batch(2, (6, 6))
    reference = copy.deepcopy(model)
    reference.inplace = reference.relu.inplace = False
    options = {"layers": ["conv1", "conv2"], "targets": [[0, 1], [2, 0]], "variant": variant}
    got = xai_core.explain(model, x, method="gradcam", **options)
    want = xai_core.explain(reference, x, method="gradcam", **options)
    for a, b in zip(got.raw, want.raw, strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


class Shared(nn.Module):
    """One 1x1 conv (weight 2, bias 1) applied twice, then GAP and a linear layer of weight 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.fc = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(2.0)
            self.conv.bias.fill_(1.0)
            self.fc.weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))


def test_module_used_twice_uses_last_call():
    # Last call: A = 2(2x + 1) + 1 = 4x + 3, dy/dA = 3/4, map = ReLU(3x + 9/4).
    # (The first call would give ReLU(3/2 (2x + 1)) = ReLU(3x + 3/2).)
    exp = xai_core.explain(Shared(), X, method="gradcam", layer="conv")
    torch.testing.assert_close(exp.raw[0], torch.tensor([[[[5.25, 0.0], [11.25, 8.25]]]]))
    assert exp.details["calls"] == {"conv": 2}


class EditedLater(nn.Module):
    """The hooked output is scaled in place afterwards (``mul_``/``add_``) by the model."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a = a.mul_(2).add_(1) if self.inplace else a * 2 + 1
        return self.fc(a.square().mean(dim=(2, 3)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_activations_edited_in_place_later(variant):
    x = batch(2, (5, 5))
    got = xai_core.explain(EditedLater(True), x, method="gradcam", targets="all", variant=variant)
    want = xai_core.explain(EditedLater(False), x, method="gradcam", targets="all", variant=variant)
    torch.testing.assert_close(got.raw[0], want.raw[0])


class Aliased(nn.Module):
    """The hooked module (an Identity) returns its input, which the model then edits in place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.tap = nn.Identity()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = self.tap(a)
        a = a.mul_(2) if self.inplace else a * 2
        return self.fc((a * b).mean(dim=(2, 3)))


def test_hooked_output_aliasing_a_tensor_edited_later():
    x = batch(2, (5, 5))
    got = xai_core.explain(Aliased(True), x, method="gradcam", layer="tap", relu=False)
    want = xai_core.explain(Aliased(False), x, method="gradcam", layer="tap", relu=False)
    torch.testing.assert_close(got.raw[0], want.raw[0])


# -- token layers (vision transformers) ----------------------------------------------------


class Tokens(nn.Module):
    """(N, C, H, W) -> (N, [1 +] H*W, C) in raster order, with a learned class token first."""

    def __init__(self, channels: int, class_token: bool) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, channels)) if class_token else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        t = f.flatten(2).transpose(1, 2)
        return t if self.cls is None else torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)


class TokenNet(nn.Module):
    """A conv feature map turned into tokens, then a non-linear per-token mix and mean pooling:
    the token layer's patch tokens are the conv output, permuted."""

    def __init__(self, class_token: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.tokens = Tokens(5, class_token)
        self.mix, self.fc = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mix(self.tokens(self.conv(x)))).mean(dim=1))


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("variant", ["gradcam", "guided", "gradcam++"])
def test_token_layer_equals_the_feature_map_it_holds(class_token, variant):
    model, x = TokenNet(class_token), batch(2, (6, 7))
    targets = [[0, 2], [1, 1]]
    on_tokens = xai_core.explain(
        model, x, method="gradcam", layer="tokens", variant=variant, targets=targets
    )
    on_conv = xai_core.explain(
        model, x, method="gradcam", layer="conv", variant=variant, targets=targets
    )
    torch.testing.assert_close(on_tokens.raw[0], on_conv.raw[0], atol=1e-6, rtol=1e-5)
    assert on_tokens.details["token_layers"] == {"tokens": (class_token, (6, 7))}
    assert on_conv.details["token_layers"] == {}
    assert float(on_tokens.raw[0].abs().sum()) > 0


def test_tokens_that_tile_no_grid_are_refused():
    model, x = TokenNet(class_token=False), batch(1, (6, 7))  # 42 tokens
    with pytest.raises(LayerTypeError, match=r"tokens \(1, 42, 5\).*patch grid"):
        xai_core.explain(model, x, method="gradcam", layer="tokens", class_token=True)


@pytest.mark.slow
def test_torchvision_vit_before_the_last_attention():
    """On ViT-B/16 the last block's input norm is the layer to take: after the last attention
    only the class token reaches the head, so the patch tokens' gradients are exactly zero."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.manual_seed(0)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    exp = xai_core.explain(
        model,
        x,
        method="gradcam",
        layers=["encoder.layers.encoder_layer_11.ln_1", "encoder.ln"],
        relu=False,  # random weights: the map may well be negative everywhere
    )
    before, after = exp.raw
    assert before.shape == (2, 1, 14, 14) and exp.maps.shape[-2:] == (224, 224)
    default = xai_core.explain(model, x, method="gradcam", relu=False)
    assert default.layers == ["encoder.layers.encoder_layer_11.ln_1"]
    torch.testing.assert_close(default.raw[0], before)
    assert torch.isfinite(before).all() and float(before.abs().sum()) > 0
    assert float(after.abs().sum()) == 0
    assert exp.details["token_layers"]["encoder.ln"] == (True, (14, 14))
    assert hook_count(model) == 0


# -- torchvision models and devices --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer4"), ("densenet121", "features")])
def test_torchvision(name, layer):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    exp = xai_core.explain(model, x, method="gradcam", targets=[[1, 7], [3, 3]])
    assert exp.layers == [layer]
    assert exp.maps.shape == (2, 2, 64, 64)
    assert torch.isfinite(exp.maps).all() and exp.maps.min() >= 0
    one = xai_core.explain(model, x, method="gradcam", targets=[7, 3])
    torch.testing.assert_close(exp.raw[0][:, 1], one.raw[0][:, 0], atol=1e-6, rtol=1e-4)
    assert hook_count(model) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_maps_stay_on_the_model_device(device):
    model, x = GapNet().to(device), batch(2, (6, 6)).to(device)
    exp = xai_core.explain(model, x, method="gradcam", variant="gradcam++")
    assert exp.raw[0].device == x.device and exp.maps.device == x.device


# -- errors, hooks and state ---------------------------------------------------------------


def test_errors_are_typed():
    model, x = GapNet(), batch(2, (6, 6))
    with pytest.raises(OptionError, match="variant"):
        xai_core.explain(model, x, method="gradcam", variant="gradcam+")
    with pytest.raises(OptionError, match="either"):
        xai_core.explain(model, x, method="gradcam", layer="body", layers=["body"])
    with pytest.raises(LayerTypeError, match="feature map"):
        xai_core.explain(model, x, method="gradcam", layer="fc")


class SideBranch(GapNet):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(x)
        self.unused(a)  # computed, but the scores do not depend on it
        return self.fc(a.mean(dim=(2, 3)))


@pytest.mark.parametrize("targets", [0, "all"])
def test_layer_off_the_path_to_the_scores(targets):
    with pytest.raises(OptionError, match="'unused'"):
        xai_core.explain(
            SideBranch(), batch(2, (6, 6)), method="gradcam", layer="unused", targets=targets
        )


class NormNet(GapNet):
    def __init__(self) -> None:
        super().__init__()
        self.body.insert(1, nn.BatchNorm2d(4))
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-1, 1)


def model_state(model: nn.Module) -> tuple:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        hook_count(model),
    )


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1] and a[4] == b[4] == 0
    for g, h in zip(a[2], b[2], strict=True):
        assert (g is None and h is None) or torch.equal(g, h)
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hooks_removed_and_state_restored(variant):
    model, x = NormNet().train(), batch(2, (6, 6))
    model.body[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = model_state(model)
    xai_core.explain(
        model, x, method="gradcam", layers=["body.0", "body"], variant=variant, targets="all"
    )
    assert_same_state(before, model_state(model))
    with pytest.raises(TargetError):  # out of range: found only once the scores exist
        xai_core.explain(model, x, method="gradcam", targets=3, variant=variant)
    assert_same_state(before, model_state(model))
    assert not x.requires_grad


def test_conformance():
    from xai_core.testing import check_explainer

    check_explainer(GradCAM)
    check_explainer(
        GradCAM, model=GapNet(dims=3), inputs=batch(3, (4, 4, 4)), options={"variant": "gradcam++"}
    )
