"""CAM against hand-computed maps and the Grad-CAM identity; finding the pooled tensor and the
head in module, functional and DenseNet-style heads; refusing models without such a head."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
import xai_cam
from torch import nn
from xai_cam import CAM

import xai_core
from xai_core.core.errors import CapabilityError, OptionError, TargetError, TargetTypeError
from xai_core.torch.capture import hook_count

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
X = torch.tensor([[[[1.0, -2.0], [3.0, 2.0]]]])  # (1, 1, 2, 2)


def tiny() -> nn.Module:
    """A = conv(x) = (x, -x), then GAP and y = W z + b with W = [[2, 1], [1, 3]], b = (1/2, -1)."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        fc.weight.copy_(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        fc.bias.copy_(torch.tensor([0.5, -1.0]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


def test_hand_computed():
    # CAM_0 = 2 x + 1 (-x) = x;  CAM_1 = 1 x + 3 (-x) = -2 x.  The bias never enters.
    exp = xai_core.explain(tiny(), X, method="cam", targets="all")
    torch.testing.assert_close(exp.raw[0], torch.cat([X, -2 * X], dim=1))
    assert exp.layers == ["0"] and exp.details == {"head": "3", "relu": False}


class Net(nn.Module):
    """conv -> ReLU -> conv -> (global average pooling) -> linear, with the pooling written in
    one of the ways real models write it:

    * ``module``: ``AdaptiveAvgPool -> Flatten -> Linear`` (ResNet);
    * ``mean``: ``x.mean(spatial)`` in ``forward``;
    * ``relu``: ``F.relu(x, inplace=True)`` then ``F.adaptive_avg_pool`` (DenseNet);
    * ``dropout``: the head is ``Sequential(Dropout, Linear)`` (EfficientNet, MobileNetV2).
    """

    def __init__(self, dims: int = 2, pool: str = "module", classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims, self.pooling = dims, pool
        self.body = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.flatten = nn.Flatten()
        linear = nn.Linear(5, classes)
        self.fc = nn.Sequential(nn.Dropout(0.5), linear) if pool == "dropout" else linear
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        a = self.body(x)
        spatial = tuple(range(2, x.ndim))
        if self.pooling == "mean":
            return self.fc(a.mean(spatial))
        if self.pooling == "relu":
            pool = F.adaptive_avg_pool2d if self.dims == 2 else F.adaptive_avg_pool3d
            return self.fc(pool(F.relu(a, inplace=True), 1).flatten(1))
        return self.fc(self.flatten(self.pool(a)))

    def weight(self) -> torch.Tensor:
        return self.fc[1].weight if self.pooling == "dropout" else self.fc.weight

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """CAM of every class by hand, ``(N, classes, *spatial)``."""
        with torch.no_grad():
            a = self.body(x)
            a = a.relu() if self.pooling == "relu" else a
            return torch.einsum("kc,nc...->nk...", self.weight(), a)


def batch(n: int, size: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(6, 7), (4, 5, 3)])
def test_equals_gradcam_at_pooled_tensor(size):
    """At the tensor fed into GAP, alpha_k^c = W[c, k] / Z: Grad-CAM = ReLU(CAM) / Z."""
    model, x = Net(dims=len(size)), batch(2, size)
    cam = xai_core.explain(model, x, method="cam", targets="all")
    signed = xai_core.explain(model, x, method="gradcam", targets="all", layer="body", relu=False)
    grad = xai_core.explain(model, x, method="gradcam", targets="all", layer="body")
    assert cam.layers == ["body"]
    assert (cam.raw[0] < 0).any()  # so that the ReLU matters
    torch.testing.assert_close(cam.normalized(), signed.normalized())
    zeta = torch.tensor(size).prod()
    torch.testing.assert_close(grad.raw[0], cam.raw[0].clamp(min=0) / zeta)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    ("pool", "head", "relu"),
    [
        ("module", "fc", False),
        ("mean", "fc", False),
        ("relu", "fc", True),
        ("dropout", "fc.1", False),
    ],
)
def test_finds_pooled_tensor_and_head(pool, head, relu, dims, caplog):
    model = Net(dims=dims, pool=pool)
    x = batch(2, (5, 6) if dims == 2 else (3, 4, 5))
    targets = [[2, 0], [1, 1]]
    with caplog.at_level(logging.INFO, logger="xai_core"):
        exp = xai_core.explain(model, x, method="cam", targets=targets)
    assert exp.layers == ["body"] and exp.details == {"head": head, "relu": relu}
    assert "'body'" in caplog.text and f"'{head}'" in caplog.text
    reference = model.reference(x)
    expected = torch.stack([reference[n, row] for n, row in enumerate(targets)])
    torch.testing.assert_close(exp.raw[0], expected)


class WithEmbedding(Net):
    """Returns ``(scores, embedding)``: another linear layer runs after the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x).mean(dim=(2, 3))
        return self.fc(z), self.proj(z)


def test_head_is_the_linear_layer_that_computes_the_scores():
    model, x = WithEmbedding(), batch(2, (5, 5))
    exp = xai_core.explain(model, x, method="cam", targets="all")
    assert exp.layers == ["body"] and exp.details["head"] == "fc"
    torch.testing.assert_close(exp.raw[0], model.reference(x))


def test_splits_the_score_over_positions():
    """mean_ij CAM_c(i,j) = y_c - b_c, for every class."""
    model, x = Net(pool="mean"), batch(3, (5, 5))
    exp = xai_core.explain(model, x, method="cam", targets="all")
    torch.testing.assert_close(exp.raw[0].mean(dim=(2, 3)), exp.scores - model.fc.bias)


def test_one_forward_pass_and_a_cached_probe():
    model, x = Net(), batch(2, (5, 5))
    xai_core.explain(model, x, method="cam")
    assert model.forwards == 2  # the probe on one sample, then the explanation
    xai_core.explain(model, x, method="cam", targets="all")
    assert model.forwards == 3  # the probe is cached per model and input shape
    xai_core.explain(model, batch(2, (6, 6)), method="cam")
    assert model.forwards == 5
    assert len(xai_cam._found[model]) == 2
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the cache does not keep models alive


class Twice(nn.Module):
    """A 1x1 conv (weight 2, bias 1) applied twice, then the mean and a linear layer (weight 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(2.0)
            self.conv.bias.fill_(1.0)
            self.fc.weight.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))


def test_module_used_twice_uses_last_call():
    # The pooled tensor is the second call's output 2 (2 x + 1) + 1 = 4 x + 3; CAM = 3 (4 x + 3).
    exp = xai_core.explain(Twice(), X, method="cam")
    assert exp.layers == ["conv"]
    torch.testing.assert_close(exp.raw[0], 3 * (4 * X + 3))


# -- torchvision ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_resnet18(images):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    cam = xai_core.explain(model, images, method="cam", targets=[[1, 7], [3, 3]])
    assert cam.layers == ["layer4"] and cam.details == {"head": "fc", "relu": False}
    grad = xai_core.explain(model, images, method="gradcam", targets=[[1, 7], [3, 3]], relu=False)
    assert grad.layers == ["layer4"]
    torch.testing.assert_close(cam.normalized(), grad.normalized(), atol=1e-5, rtol=1e-4)
    assert hook_count(model) == 0


@pytest.mark.slow
def test_densenet121_pools_relu_of_features(images):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.densenet121(weights=None).eval()
    exp = xai_core.explain(model, images, method="cam", targets=[5, 9])
    assert exp.layers == ["features"] and exp.details == {"head": "classifier", "relu": True}
    with torch.no_grad():
        features = model.features(images).relu()
    expected = torch.einsum("nc,nchw->nhw", model.classifier.weight[[5, 9]], features)
    torch.testing.assert_close(exp.raw[0][:, 0], expected, atol=1e-5, rtol=1e-4)
    assert xai_core.explain(model, images, method="gradcam").layers == ["features"]


@pytest.mark.slow
def test_efficientnet_and_mobilenet_v3(images):
    torchvision = pytest.importorskip("torchvision")
    exp = xai_core.explain(torchvision.models.efficientnet_b0(weights=None), images, method="cam")
    assert exp.layers == ["features"] and exp.details["head"] == "classifier.1"
    assert exp.maps.shape == (2, 64, 64) and torch.isfinite(exp.maps).all()
    # MobileNetV3's classifier has a hidden layer: Linear -> Hardswish -> Dropout -> Linear.
    with pytest.raises(CapabilityError, match="gradcam"):
        xai_core.explain(torchvision.models.mobilenet_v3_small(weights=None), images, method="cam")


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first layer norm: an nn.LayerNorm subclass on (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NormedHead(Net):
    """ConvNeXt's head: global pooling, a layer norm over the channels, then the classifier
    (Hugging Face norms the pooled vector, timm the 1x1 map before flattening)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.norm = LayerNorm2d(5) if style == "timm" else nn.LayerNorm(5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)
            self.norm.bias.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(x)
        if self.style == "timm":
            return self.fc(self.norm(F.adaptive_avg_pool2d(a, 1)).flatten(1))
        return self.fc(self.norm(a.mean((2, 3))))


@pytest.mark.parametrize("style", ["timm", "hf"])
def test_layer_norm_between_pooling_and_head(style):
    """CAM stays exact: the map's spatial mean is the logit minus a per-class constant,
    b_c + W[c] . beta (see the module docstring)."""
    model, x = NormedHead(style), batch(2, (5, 6))
    exp = xai_core.explain(model, x, method="cam", targets="all")
    assert exp.layers == ["body"] and exp.details == {"head": "fc", "relu": False, "norm": "norm"}
    with torch.no_grad():
        constant = model.fc.bias + model.fc.weight @ model.norm.bias
        expected = model(x) - constant
    torch.testing.assert_close(exp.raw[0].mean((2, 3)), expected)


def test_norm_over_other_than_the_channels_is_refused():
    model = NormedHead("hf")
    model.norm = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5))  # a hidden layer after the norm
    with pytest.raises(CapabilityError, match="method='gradcam'"):
        xai_core.explain(model, batch(2, (5, 6)), method="cam")


# -- models without a GAP + linear head, options, errors -----------------------------------


class MLPHead(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


class Flattened(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5 * 25, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class Scaled(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sigmoid()


@pytest.mark.parametrize("model", [MLPHead, Flattened, Scaled])
def test_refuses_models_without_gap_linear_head(model):
    with pytest.raises(CapabilityError, match="method='gradcam'"):
        xai_core.explain(model(), batch(2, (5, 5)), method="cam")


def test_explicit_layer_and_head():
    model, x = Net(pool="dropout"), batch(2, (5, 5))
    auto = xai_core.explain(model, x, method="cam", targets="all")
    for layer, head in [
        ("body", "fc.1"),
        (model.body, model.fc[1]),
        ("body", None),
        (None, "fc.1"),
    ]:
        exp = xai_core.explain(model, x, method="cam", targets="all", layer=layer, head=head)
        torch.testing.assert_close(exp.raw[0], auto.raw[0])
        assert exp.layers == ["body"] and exp.details["head"] == "fc.1"
    with pytest.raises(CapabilityError, match=r"'body\.0'"):  # not the tensor that is pooled
        xai_core.explain(model, x, method="cam", layer="body.0")
    with pytest.raises(OptionError, match=r"nn\.Linear"):
        xai_core.explain(model, x, method="cam", head="fc")
    with pytest.raises(OptionError, match="'layer' of method 'cam' must be str or Module"):
        xai_core.explain(model, x, method="cam", layer=["body", "body.0"])


def test_callable_target_is_refused():
    with pytest.raises(TargetTypeError, match="gradcam"):
        xai_core.explain(Net(), batch(2, (5, 5)), method="cam", targets=lambda y: y[:, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_maps_stay_on_the_model_device(device):
    model, x = Net(pool="relu").to(device), batch(2, (5, 5)).to(device)
    exp = xai_core.explain(model, x, method="cam")
    assert exp.raw[0].device == x.device and exp.maps.device == x.device


class NormNet(Net):
    def __init__(self) -> None:
        super().__init__(pool="relu")
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


def test_hooks_removed_and_state_restored():
    model, x = NormNet().train(), batch(2, (6, 6))
    model.body[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = model_state(model)
    xai_core.explain(model, x, method="cam", targets="all")
    assert_same_state(before, model_state(model))
    with pytest.raises(TargetError):  # out of range: found only once the scores exist
        xai_core.explain(model, x, method="cam", targets=3)
    assert_same_state(before, model_state(model))
    with pytest.raises(CapabilityError):  # fails after the forward pass, too
        xai_core.explain(model, x, method="cam", layer="body.0")
    assert_same_state(before, model_state(model))


def test_conformance():
    from xai_core.testing import check_explainer

    check_explainer(CAM)
    check_explainer(CAM, model=Net(dims=3, pool="relu"), inputs=batch(3, (4, 4, 4)))
