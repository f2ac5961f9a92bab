"""Incremental occlusion against plain occlusion: every supported layer, torchvision nets, 3D,
fallbacks, the approximate mode and its options."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy.stats import spearmanr
from torch import nn
from xai_occlusion import Occlusion, incremental

import xai_core
from xai_core.core.errors import OptionError
from xai_core.testing import explainer_checks


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on two shared cores run faster, and steadier, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that folding them is tested."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            m.weight.data.copy_(1 + 0.2 * torch.randn(c, generator=generator))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=generator))
    return model.eval()


def with_head(body: nn.Module, channels: int, size: tuple[int, ...], classes: int = 3):
    """``body`` then a linear layer over every output position: each position matters."""
    with torch.no_grad():
        features = body.eval()(torch.zeros(1, channels, *size)).numel()
    return nn.Sequential(body, nn.Flatten(), nn.Linear(features, classes))


def compare(model, x, *, expect="exact", atol=2e-5, **options):
    """Plain and incremental occlusion of the same call: equal maps; the incremental details."""
    plain = xai_core.explain(model, x, method="occlusion", incremental=False, **options)
    fast = xai_core.explain(model, x, method="occlusion", incremental="exact", **options)
    assert fast.details["incremental"]["mode"] == expect, fast.details["incremental"]
    scale = max(1.0, float(plain.scores.abs().max()))
    torch.testing.assert_close(fast.maps, plain.maps, atol=atol * scale, rtol=1e-4)
    torch.testing.assert_close(fast.scores, plain.scores)
    return fast.details["incremental"]


def image(n: int, channels: int, size: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, *size, generator=torch.Generator().manual_seed(seed))


# -- every supported layer -------------------------------------------------------------------


class Residual(nn.Module):
    """A ResNet basic block with a strided 1x1 projection (2D or 3D)."""

    def __init__(self, cin: int, cout: int, stride: int, rank: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if rank == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if rank == 2 else nn.BatchNorm3d
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.down = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


class Dense(nn.Module):
    """DenseNet-style: concatenations of features with different reach; pre-activation BN."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4, 3, padding=1))
        self.b = nn.Sequential(
            nn.BatchNorm2d(cin + 4), nn.ReLU(), nn.Conv2d(cin + 4, 4, 5, padding=2)
        )

    def forward(self, x):
        y = torch.cat([x, self.a(x)], 1)
        return torch.cat((y, self.b(y)), dim=1)


class Functional(nn.Module):
    """Functional convolution (weights as graph attributes), pooling and element-wise calls."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 5, 1, 1) + 0.5)

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, stride=(1, 2), padding=1)
        x = F.relu(x * self.scale + 0.1, inplace=True)
        x = torch.tanh(F.avg_pool2d(x, 3, 1, 1)) - x.sigmoid()
        x = F.max_pool2d(x, 2, ceil_mode=True)
        return F.leaky_relu(torch.maximum(x, -x * 0.5), 0.1)


class Positional(nn.Module):
    """A constant that varies over space, added to a feature map."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 4, *size))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.pos)


class SqueezeExcite(nn.Module):
    """A channel gate from global pooling: ends the incremental region mid-network."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, c)
        self.after = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]
        return self.after(x * gate)


class Upsampled(nn.Module):
    """An op the engine does not run on patches (interpolation), then more convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.interpolate(torch.relu(self.a(x)), scale_factor=2.0, mode="nearest"))


class ViewHead(nn.Module):
    """``x.view(x.size(0), -1)``: shape queries on a patch, then a head on the full tensor."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * math.prod(size), 3)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


SIZE = (18, 20)


def layers_2d() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    c = nn.Conv2d
    cases = {
        "conv": nn.Sequential(c(3, 4, 3, padding=1), nn.ReLU()),
        "conv_stride2_nopad": nn.Sequential(c(3, 4, 3, stride=2), nn.Tanh()),
        "conv_stride3_dilation2": nn.Sequential(c(3, 4, 3, stride=3, padding=2, dilation=2)),
        "conv_groups": nn.Sequential(c(3, 4, 1), c(4, 6, 3, padding=1, groups=2), nn.GELU()),
        "depthwise": nn.Sequential(c(3, 4, 1), c(4, 4, 5, padding=2, groups=4), nn.SiLU()),
        "conv_same_even": nn.Sequential(c(3, 4, 4, padding="same", dilation=2), nn.Hardswish()),
        "conv_valid_rect": nn.Sequential(c(3, 4, (3, 5), padding="valid", bias=False)),
        "conv_stem": nn.Sequential(c(3, 4, 7, stride=2, padding=3), nn.LeakyReLU(0.2)),
        "batchnorm_folded": nn.Sequential(c(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        "batchnorm_alone": nn.Sequential(c(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Sigmoid()),
        "activations": nn.Sequential(
            c(3, 4, 3, padding=1),
            nn.ReLU6(),
            nn.ELU(),
            nn.Softplus(),
            nn.Mish(),
            nn.PReLU(4),
            nn.Dropout(0.5),
            nn.Dropout2d(0.5),
            nn.Identity(),
            nn.Softmax(dim=1),
        ),
        "maxpool": nn.Sequential(c(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1)),
        "maxpool_ceil_dilation": nn.Sequential(
            c(3, 4, 3), nn.MaxPool2d(3, 2, padding=1, dilation=2, ceil_mode=True)
        ),
        "avgpool": nn.Sequential(c(3, 4, 3, padding=1), nn.AvgPool2d(2)),
        "avgpool_exclude_pad_ceil": nn.Sequential(
            c(3, 4, 3), nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        ),
        "avgpool_divisor": nn.Sequential(
            c(3, 4, 3, padding=1), nn.AvgPool2d(3, 1, padding=1, divisor_override=5)
        ),
        "adaptive_divisible": nn.Sequential(
            c(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d((9, 10)), nn.AdaptiveMaxPool2d((3, 5))
        ),
        "adaptive_uneven": nn.Sequential(c(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(7)),
        "global_pool": nn.Sequential(c(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
        "residual": nn.Sequential(Residual(3, 4, 1), Residual(4, 6, 2)),
        "concatenation": Dense(3),
        "functional": Functional(),
        "spatial_constant": Positional(SIZE),
        "squeeze_excite": SqueezeExcite(4),
        "upsample": Upsampled(),
    }
    return {name: randomise(with_head(body, 3, SIZE)) for name, body in cases.items()} | {
        "view_head": ViewHead(SIZE).eval()
    }


LAYERS = layers_2d()


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_equals_plain_occlusion(name):
    model = LAYERS[name]
    compare(model, image(2, 3, SIZE), window=(4, 5), stride=(3, 2), chunk_size=17, targets="all")


@pytest.mark.parametrize(
    ("window", "stride", "n", "chunk", "baseline"),
    [
        (3, 1, 1, 1, "zero"),
        ((5, 2), (2, 3), 3, 7, "mean"),
        ((18, 4), (1, 4), 2, 64, 0.5),  # the box spans a whole axis
        ((7, 7), (7, 5), 2, 5, "blur"),
    ],
)
def test_windows_batches_chunks_and_baselines(window, stride, n, chunk, baseline):
    model = randomise(
        with_head(nn.Sequential(Residual(3, 4, 2), nn.MaxPool2d(2), Dense(4)), 3, SIZE)
    )
    compare(
        model,
        image(n, 3, SIZE),
        window=window,
        stride=stride,
        chunk_size=chunk,
        baseline=baseline,
        sigma=1.5,
        targets=[[b % 3, 2] for b in range(n)],
    )


def test_3d_layers():
    torch.manual_seed(0)
    size = (6, 10, 12)
    body = nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1),
        nn.BatchNorm3d(4),
        nn.ReLU(inplace=True),
        Residual(4, 4, 1, rank=3),
        nn.MaxPool3d(2, ceil_mode=True),
        nn.AvgPool3d(3, 1, 1, count_include_pad=False),
    )
    model = randomise(with_head(body, 2, size))
    compare(model, image(2, 2, size), window=(2, 3, 4), stride=(2, 2, 3), chunk_size=9)
    pooled = randomise(nn.Sequential(body, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)))
    compare(pooled, image(1, 2, size), window=3, stride=(1, 2, 3), chunk_size=32, targets="all")


# -- torchvision networks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "stride", "n", "chunk"), [(16, 8, 1, 32), ((12, 20), (10, 6), 2, 13)]
)
def test_resnet18(window, stride, n, chunk):
    torch.manual_seed(0)
    model = randomise(torchvision.models.resnet18(weights=None, num_classes=10))
    x = image(n, 3, (64, 64))
    info = compare(model, x, window=window, stride=stride, chunk_size=chunk, targets="all")
    assert 0 < info["estimated_cost"] < 1


@pytest.mark.parametrize(("window", "stride", "n", "chunk"), [(16, 8, 1, 25), (8, 12, 2, 16)])
def test_densenet121(window, stride, n, chunk):
    torch.manual_seed(0)
    model = randomise(torchvision.models.densenet121(weights=None, num_classes=10))
    compare(model, image(n, 3, (64, 64)), window=window, stride=stride, chunk_size=chunk)


def test_vgg_style():
    torch.manual_seed(0)
    cfg = [8, "M", 16, "M", 16, 16, "M"]
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    model = with_head(nn.Sequential(*layers), 3, (48, 48)).eval()
    compare(model, image(2, 3, (48, 48)), window=6, stride=4, chunk_size=50)


def test_3d_resnet():
    torch.manual_seed(0)
    model = randomise(torchvision.models.video.r3d_18(weights=None, num_classes=5))
    x = image(1, 3, (8, 32, 32))
    compare(model, x, window=(4, 16, 16), stride=(4, 8, 8), chunk_size=6, targets="all")


# -- auto mode, fallbacks --------------------------------------------------------------------


def test_auto_mode_uses_the_engine_and_matches():
    torch.manual_seed(0)
    model = randomise(torchvision.models.resnet18(weights=None, num_classes=4))
    x = image(1, 3, (96, 96))
    auto = xai_core.explain(model, x, method="occlusion", window=12, stride=12)
    plain = xai_core.explain(model, x, method="occlusion", window=12, stride=12, incremental=False)
    assert auto.details["incremental"]["mode"] == "exact"
    assert plain.details["incremental"] == {"mode": "off"}
    torch.testing.assert_close(auto.maps, plain.maps, atol=1e-4, rtol=1e-4)


def test_auto_mode_leaves_small_inputs_and_non_cnns_alone():
    tiny = xai_core.explain(LAYERS["conv"], image(1, 3, SIZE), method="occlusion")
    assert tiny.details["incremental"]["mode"] == "off"
    assert "fewer than" in tiny.details["incremental"]["reason"]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    got = xai_core.explain(mlp, image(1, 3, (32, 32)), method="occlusion", window=8)
    assert got.details["incremental"] == {"mode": "off", "reason": "no convolution in the model"}


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 32 * 32, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.flatten(1))


def test_untraceable_model_falls_back_with_a_warning():
    model, x = Untraceable().eval(), image(2, 3, (32, 32))
    plain = xai_core.explain(model, x, method="occlusion", window=8, incremental=False)
    with pytest.warns(RuntimeWarning, match="cannot trace the model"):
        got = xai_core.explain(model, x, method="occlusion", window=8, incremental="exact")
    assert got.details["incremental"]["mode"] == "off"
    assert "TraceError" in got.details["incremental"]["reason"]
    torch.testing.assert_close(got.maps, plain.maps)


def test_untraceable_model_in_auto_mode_logs(caplog):
    model, x = Untraceable().eval(), image(1, 3, (32, 32))
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="xai_core"):
        warnings.simplefilter("error")
        got = xai_core.explain(model, x, method="occlusion", window=8)
    assert got.details["incremental"]["mode"] == "off"
    assert "cannot trace the model" in caplog.text


class InPlaceAlias(nn.Module):
    """An in-place op on a value that a later node reads: the engine declines."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        h.relu_()
        return (h + 1).mean((2, 3))


def test_in_place_aliasing_falls_back():
    model, x = InPlaceAlias().eval(), image(1, 3, (32, 32))
    with pytest.warns(RuntimeWarning, match="in place"):
        got = xai_core.explain(model, x, method="occlusion", window=8, incremental="exact")
    plain = xai_core.explain(model, x, method="occlusion", window=8, incremental=False)
    torch.testing.assert_close(got.maps, plain.maps)


def test_not_a_torch_model_uses_plain_occlusion():
    class Onnx:
        kind = "onnx"

    x = image(1, 3, (8, 8))
    engine, info = incremental.prepare(Onnx(), x, x, [], (2, 2), "auto", {}, x)
    assert engine is None and info == {"mode": "off", "reason": "not a PyTorch module"}
    with pytest.warns(RuntimeWarning, match="not a PyTorch module"):
        incremental.prepare(Onnx(), x, x, [], (2, 2), "exact", {}, x)


def test_a_changed_model_is_traced_again():
    torch.manual_seed(0)
    model = with_head(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), 3, SIZE).eval()
    x = image(1, 3, SIZE)
    compare(model, x, window=4, stride=2)
    model[0][1] = nn.Tanh()
    compare(model, x, window=4, stride=2)


def test_conformance_with_the_engine():
    torch.manual_seed(0)
    model = randomise(with_head(nn.Sequential(Residual(3, 4, 2), nn.ReLU()), 3, (16, 16)))
    options = {"window": 4, "stride": 3, "incremental": "exact"}
    for check in explainer_checks(
        Occlusion, model=model, inputs=image(3, 3, (16, 16)), options=options
    ):
        check()


def test_progress_counts_perturbations():
    calls = []
    xai_core.explain(
        LAYERS["residual"],
        image(2, 3, SIZE),
        method="occlusion",
        window=6,
        stride=6,
        chunk_size=5,
        incremental="exact",
        progress=lambda done, total, what: calls.append((done, total)),
    )
    assert calls == [(5, 18), (10, 18), (15, 18), (18, 18)]


# -- approximate mode ------------------------------------------------------------------------


def smooth_case() -> tuple[nn.Module, torch.Tensor]:
    """A CNN with wide kernels and average pooling, on a smooth image: a smooth map."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    model = nn.Sequential(body, nn.Flatten(), nn.Linear(8, 2)).eval()
    u = torch.linspace(-1, 1, 64)
    blob = torch.exp(-((u[:, None] - 0.3) ** 2 + (u[None, :] + 0.2) ** 2) / 0.1)
    return model, blob[None, None]


def test_approximate_correlates_with_exact_on_a_smooth_case():
    model, x = smooth_case()
    options = {"window": 8, "stride": 4, "targets": 0}
    exact = xai_core.explain(model, x, method="occlusion", incremental="exact", **options)
    approx = xai_core.explain(model, x, method="occlusion", incremental="approximate", **options)
    details = approx.details["incremental"]
    assert details["mode"] == "approximate"
    assert details["approximation"] == incremental.APPROXIMATION
    assert details["estimated_cost"] < exact.details["incremental"]["estimated_cost"]
    assert spearmanr(approx.maps.flatten(), exact.maps.flatten()).statistic > 0.95
    refined = xai_core.explain(
        model,
        x,
        method="occlusion",
        incremental="approximate",
        approximation={"coarse": 2, "refine": 0.25},
        **options,
    )
    assert refined.details["evaluations"] < 0.5 * exact.details["evaluations"]
    assert spearmanr(refined.maps.flatten(), exact.maps.flatten()).statistic > 0.9


def test_approximate_without_approximations_is_exact():
    model, x = smooth_case()
    options = {"window": 8, "stride": 8, "targets": [1]}
    exact = xai_core.explain(model, x, method="occlusion", incremental="exact", **options)
    for settings in ({"threshold": 1.0, "coarse": 1}, {"threshold": 1.0, "refine": 1.0}):
        got = xai_core.explain(
            model,
            x,
            method="occlusion",
            incremental="approximate",
            approximation=settings,
            **options,
        )
        assert got.details["evaluations"] == exact.details["evaluations"]
        torch.testing.assert_close(got.maps, exact.maps, atol=1e-6, rtol=1e-5)


def test_adaptive_interpolates_a_linear_grid_exactly():
    positions = (7, 6)

    class Linear:
        device, dtype, count = torch.device("cpu"), torch.float32, 2

        def __call__(self, index):
            window = index % 42
            i, j = window // 6, window % 6
            sample = (index // 42).float()
            return torch.stack([2 * i - j + sample, 0.5 * j + 3], -1).float()

    evaluate = Linear()
    every = torch.arange(2 * 42)
    deltas, evaluated = incremental.adaptive_deltas(
        evaluate, 2, positions, 10, {"threshold": 1, "coarse": 2, "refine": 0.0}
    )
    torch.testing.assert_close(deltas, evaluate(every))
    assert evaluated == 2 * 4 * 4  # rows 0, 2, 4, 6; columns 0, 2, 4, 5
    deltas, evaluated = incremental.adaptive_deltas(
        evaluate, 2, positions, 10, {"threshold": 1, "coarse": 3, "refine": 0.5}
    )
    torch.testing.assert_close(deltas, evaluate(every))
    assert evaluated == 2 * (3 * 3 + math.ceil(0.5 * (42 - 9)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"incremental": "exakt"}, "Did you mean 'exact'"),
        ({"incremental": 1}, "'incremental' .* must be bool or one of 'auto'"),
        ({"approximation": {"treshold": 0.5}}, "Did you mean 'threshold'"),
        ({"approximation": {"threshold": 0}}, "threshold'] must be in"),
        ({"approximation": {"coarse": 1.5}}, "coarse'] must be an int"),
        ({"approximation": {"refine": 2}}, "refine'] must be in"),
        ({"approximation": 0.5}, "'approximation' .* must be a mapping of str to float"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        xai_core.explain(LAYERS["conv"], image(1, 3, SIZE), method="occlusion", **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu():
    torch.manual_seed(0)
    model = randomise(torchvision.models.resnet18(weights=None, num_classes=4)).cuda()
    x = image(2, 3, (64, 64)).cuda()
    got = xai_core.explain(model, x, method="occlusion", window=16, stride=8, incremental="exact")
    plain = xai_core.explain(model, x, method="occlusion", window=16, stride=8, incremental=False)
    assert got.maps.device.type == "cuda"
    torch.testing.assert_close(got.maps, plain.maps, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["auto", "exact", "approximate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused_before_planning(mode, value):
    """NaN scores made the tolerance of the traced-graph check NaN ('atol must be >= 0')."""
    from xai_occlusion import window_boxes

    from xai_core.core.errors import NonFiniteScoresError
    from xai_core.testing import tiny_cnn

    x = image(1, 3, (8, 8))
    scores = torch.full((1, 4), value)
    boxes = [window_boxes(8, 2, 2, x.device)] * 2
    settings = incremental.approximation_settings(None)
    with pytest.raises(NonFiniteScoresError, match="1 of 1 sample"):
        incremental.prepare(
            xai_core.adapt(tiny_cnn().eval()), x, x, boxes, (2, 2), mode, settings, scores
        )
