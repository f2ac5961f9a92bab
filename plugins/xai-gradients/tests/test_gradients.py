"""The gradient methods: hand-computed tiny cases pin each equation, Captum 0.9 on a resnet18 and
a 3D CNN (several targets) checks the implementation, and the conformance kit checks the rest."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from xai_gradients import (
    GradientXInput,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    VarGrad,
    noisy_copies,
    quadrature,
)

import xai_core
from xai_core.core.errors import OptionError, TargetError
from xai_core.testing import parametrize_with_checks

captum_attr = pytest.importorskip("captum.attr")  # a test-only dependency (the `test` extra)


# -- hand-computed cases ---------------------------------------------------------------------


class Linear(nn.Module):
    """S = W . x + b: dS/dx = W everywhere, so IG from a zero baseline is x * W for any rule."""

    def __init__(self, shape: tuple[int, ...], classes: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(classes, *shape, generator=torch.Generator().manual_seed(0))
        )
        self.bias = nn.Parameter(torch.arange(classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.flatten(1).T + self.bias


class Square(nn.Module):
    """S_c = (c + 1) sum x^2: dS/dx = 2 (c + 1) x, IG from zero = (c + 1) x^2 (exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.pow(2).flatten(1).sum(1, keepdim=True)
        return total * torch.arange(1, 4, dtype=x.dtype)


X2 = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
X3 = torch.randn(2, 2, 3, 4, 5, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("x", [X2, X3], ids=["2d", "3d"])
def test_linear_model_hand_computed(x):
    model = Linear(tuple(x.shape[1:]))
    w = model.weight.detach()  # (classes, C, *s)
    targets = [[0, 2], [1, 0]]
    expected_w = torch.stack([w[[0, 2]], w[[1, 0]]])  # (N, K, C, *s)
    sal = xai_core.explain(model, x, method="saliency", targets=targets)
    torch.testing.assert_close(sal.raw[0], expected_w.abs().amax(2))
    mean = xai_core.explain(model, x, method="saliency", targets=targets, reduce="mean")
    torch.testing.assert_close(mean.raw[0], expected_w.abs().mean(2))
    gxi = xai_core.explain(model, x, method="gradient-x-input", targets=targets)
    torch.testing.assert_close(gxi.raw[0], (x.unsqueeze(1) * expected_w).sum(2))
    for rule in ("riemann-left", "riemann-trapezoid", "gauss-legendre"):
        ig = xai_core.explain(
            model, x, method="integrated-gradients", targets=targets, steps=3, rule=rule
        )
        torch.testing.assert_close(ig.raw[0], gxi.raw[0])  # gradient constant on the path
        assert torch.tensor(ig.details["completeness_gap"]).abs().max() < 1e-4
    # SmoothGrad of a constant gradient is that gradient; its variance is zero.
    sg = xai_core.explain(model, x, method="smoothgrad", targets=targets, samples=3)
    torch.testing.assert_close(sg.raw[0], sal.raw[0])
    vg = xai_core.explain(model, x, method="vargrad", targets=targets, samples=3)
    torch.testing.assert_close(vg.raw[0], torch.zeros_like(sal.raw[0]))


# IG of Square from zero: (c + 1) x^2 times sum_i w_i 2 a_i; 2 sum_i a_i / n is (n - 1) / n
# for the left sum, (n + 1) / n for the right, 1 for the midpoint, trapezoid and Gauss-Legendre.
RULES = {
    "riemann-left": 3 / 4,
    "riemann-right": 5 / 4,
    "riemann-middle": 1.0,
    "riemann-trapezoid": 1.0,
    "gauss-legendre": 1.0,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_integrated_gradients_rules_hand_computed(rule):
    x = X2[:, :1]
    exp = xai_core.explain(
        Square(),
        x,
        method="integrated-gradients",
        targets=[[0, 2]] * 2,
        steps=4,
        rule=rule,
        chunk=3,  # chunks that cut across samples and steps
    )
    factor = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(exp.raw[0], RULES[rule] * factor * x.pow(2))
    gap = torch.tensor(exp.details["completeness_gap"])
    assert (gap.abs().max() < 1e-3) == (RULES[rule] == 1.0)


def test_quadrature_is_gauss_legendre():
    nodes, weights = quadrature("gauss-legendre", 5)
    assert abs(float(weights.sum()) - 1) < 1e-12
    for degree in range(10):  # exact up to degree 2n - 1
        assert abs(float((weights * nodes**degree).sum()) - 1 / (degree + 1)) < 1e-12


def test_integrated_gradients_baselines():
    model, x = Linear((3, 5, 4)), X2
    w = model.weight.detach()[0]
    for baseline, start in [
        (0.5, torch.full_like(x, 0.5)),
        ("mean", x.mean(dim=(2, 3), keepdim=True).expand_as(x)),
    ]:
        exp = xai_core.explain(
            model, x, method="integrated-gradients", targets=0, baseline=baseline, steps=2
        )
        torch.testing.assert_close(exp.raw[0][:, 0], ((x - start) * w).sum(1))
    blur = xai_core.explain(model, x, method="integrated-gradients", targets=0, baseline="blur")
    assert torch.tensor(blur.details["completeness_gap"]).abs().max() < 1e-4
    with pytest.raises(OptionError, match="trapezoid"):
        xai_core.explain(model, x, method="integrated-gradients", steps=1, rule="riemann-trapezoid")


def test_smoothgrad_hand_computed_on_square():
    # gradient x input of Square at x + e is 2 (c + 1) (x + e)^2 summed over channels.
    x = X2
    exp = xai_core.explain(
        Square(),
        x,
        method="smoothgrad",
        targets=1,
        local="gradient-x-input",
        samples=5,
        noise=0.2,
        seed=7,
        chunk=4,
    )
    copies, sigma = noisy_copies(x, 5, 0.2, 7)
    torch.testing.assert_close(sigma, 0.2 * (x.amax((1, 2, 3)) - x.amin((1, 2, 3))))
    draws = (4 * copies.pow(2)).sum(1).unflatten(0, (5, 2))
    torch.testing.assert_close(exp.raw[0][:, 0], draws.mean(0))
    var = xai_core.explain(
        Square(),
        x,
        method="vargrad",
        targets=1,
        local="gradient-x-input",
        samples=5,
        noise=0.2,
        seed=7,
    )
    torch.testing.assert_close(var.raw[0][:, 0], draws.var(0, correction=0))


def test_noise_is_seeded_and_batch_free():
    a, _ = noisy_copies(X2, 4, 0.1, seed=3)
    b, _ = noisy_copies(X2, 4, 0.1, seed=3)
    c, _ = noisy_copies(X2, 4, 0.1, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    alone, _ = noisy_copies(X2[1:], 4, 0.1, seed=3)  # sample 1 alone: its same draws
    torch.testing.assert_close(alone, a.unflatten(0, (4, 2))[:, 1])


def test_wrapper_errors():
    model = Linear((3, 5, 4))
    with pytest.raises(OptionError, match="cannot wrap"):
        xai_core.explain(model, X2, method="smoothgrad", local="vargrad")
    with pytest.raises(TargetError, match="class indices"):
        xai_core.explain(model, X2, method="smoothgrad", targets=lambda s: s[:, :1])


# -- against Captum --------------------------------------------------------------------------


def agree(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(correlation, max abs error / range of theirs)."""
    a, b = ours.detach().flatten().double(), theirs.detach().flatten().double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return corr, float((a - b).abs().max() / (b.max() - b.min()))


def assert_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    corr, error = agree(ours, theirs)
    assert corr >= 0.999 and error <= 1e-5, (corr, error)


class CNN3D(nn.Module):
    """A 3D CNN with biases and a smooth activation: IG's integrand is not constant."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv3d(channels, 4, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(4, 6, 3, padding=1),
            nn.Tanh(),
        )
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    return model, x


CASES = ["resnet18", "cnn3d"]
TARGETS = [[1, 4], [3, 0]]


def case(name, resnet):
    if name == "resnet18":
        return resnet
    x = torch.rand(2, 2, 8, 10, 9, generator=torch.Generator().manual_seed(4))
    return CNN3D(channels=2).eval(), x


def per_target(explainer, x, **kwargs) -> torch.Tensor:
    """Captum's attributions (N, K, C, *s), one call per target column."""
    columns = [
        explainer.attribute(x, target=torch.tensor([t[k] for t in TARGETS]), **kwargs)
        for k in range(len(TARGETS[0]))
    ]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("name", CASES)
def test_saliency_and_gradient_x_input_match_captum(name, resnet):
    model, x = case(name, resnet)
    ours = xai_core.explain(model, x, method="saliency", targets=TARGETS)
    theirs = per_target(captum_attr.Saliency(model), x, abs=True).amax(2)
    assert_agree(ours.raw[0], theirs)
    ours = xai_core.explain(model, x, method="gradient-x-input", targets=TARGETS)
    theirs = per_target(captum_attr.InputXGradient(model), x).sum(2)
    assert_agree(ours.raw[0], theirs)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    ("rule", "captum_rule"),
    [("riemann-trapezoid", "riemann_trapezoid"), ("gauss-legendre", "gausslegendre")],
)
def test_integrated_gradients_match_captum(name, rule, captum_rule, resnet):
    model, x = case(name, resnet)
    baseline = torch.full_like(x, 0.25)
    ours = xai_core.explain(
        model,
        x,
        method="integrated-gradients",
        targets=TARGETS,
        steps=6,
        rule=rule,
        baseline=0.25,
        chunk=5,
    )
    theirs = per_target(
        captum_attr.IntegratedGradients(model),
        x,
        baselines=baseline,
        n_steps=6,
        method=captum_rule,
    ).sum(2)
    if rule == "riemann-trapezoid":
        # Captum's trapezoid steps are 1/n with halved ends: weights summing to (n - 1)/n, so its
        # integral of a constant falls short by 1/n. Ours are 1/(n - 1) with halved ends, the
        # textbook rule, exact on linear integrands (test_integrated_gradients_rules_...).
        theirs = theirs * 6 / 5
    assert_agree(ours.raw[0], theirs)


def with_our_noise(tunnel, x: torch.Tensor, samples: int, noise: float, seed: int):
    """Make Captum's NoiseTunnel add our draws (it interleaves: row n * S + s)."""
    copies, _ = noisy_copies(x, samples, noise, seed)
    interleaved = copies.unflatten(0, (samples, x.shape[0])).transpose(0, 1).flatten(0, 1)

    def add_noise(inputs, stdev, partition):
        assert partition == samples  # one partition: all draws at once
        return interleaved.clone()

    tunnel._add_noise_to_input = add_noise
    return tunnel


@pytest.mark.parametrize("name", CASES)
def test_smoothgrad_matches_captum_noise_tunnel(name, resnet):
    # Channels summed (gradient x input) commute with the mean over draws.
    model, x = case(name, resnet)
    ours = xai_core.explain(
        model,
        x,
        method="smoothgrad",
        targets=TARGETS,
        local="gradient-x-input",
        samples=3,
        noise=0.1,
        seed=5,
    )
    tunnel = with_our_noise(
        captum_attr.NoiseTunnel(captum_attr.InputXGradient(model)), x, 3, 0.1, 5
    )
    theirs = per_target(tunnel, x, nt_type="smoothgrad", nt_samples=3).sum(2)
    assert_agree(ours.raw[0], theirs)


def test_vargrad_and_smoothgrad_saliency_match_captum_on_one_channel():
    # One channel: the channel reduction is the identity, so it commutes with the variance.
    model = CNN3D(channels=1).eval()
    x = torch.rand(2, 1, 8, 10, 9, generator=torch.Generator().manual_seed(6))
    for kind in ("vargrad", "smoothgrad"):
        ours = xai_core.explain(model, x, method=kind, targets=TARGETS, samples=4, seed=2)
        tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(model))
        with_our_noise(tunnel, x, 4, 0.15, 2)
        theirs = per_target(tunnel, x, nt_type=kind, nt_samples=4, abs=True)[:, :, 0]
        assert_agree(ours.raw[0], theirs)


# -- conformance -----------------------------------------------------------------------------

@parametrize_with_checks(
    [
        Saliency,
        GradientXInput,
        (IntegratedGradients, {"options": {"steps": 4}}),
        (SmoothGrad, {"options": {"samples": 3}}),
        (
            VarGrad,
            {
                "options": {"samples": 3},
                "expected_failures": {
                    # a variance: near zero where the gradient does not change with the noise,
                    # as on the kit's evidence CNN, whatever the evidence
                    "sign": "maps are the spread of the local method's maps, not evidence",
                },
            },
        ),
    ]
)
def test_conformance(check):
    check()


# -- devices ---------------------------------------------------------------------------------

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
ON_DEVICE = [
    ("saliency", {}),
    ("gradient-x-input", {}),
    ("integrated-gradients", {"steps": 4, "chunk": 3, "baseline": "blur", "blur_sigma": 1.0}),
    ("smoothgrad", {"samples": 3, "chunk": 4}),
    ("vargrad", {"samples": 3, "local": "gradient-x-input"}),
]


@pytest.mark.parametrize("device", DEVICES)
def test_maps_on_the_models_device_equal_the_cpus(device):
    model = CNN3D(channels=2).eval()
    x = torch.rand(2, 2, 6, 5, 4, generator=torch.Generator().manual_seed(8))
    for method, options in ON_DEVICE:
        here = xai_core.explain(
            model.to(device), x.to(device), method=method, targets=TARGETS, **options
        )
        assert here.raw[0].device.type == device and here.raw[0].shape == (2, 2, 6, 5, 4)
        if method in ("smoothgrad", "vargrad"):
            continue  # the noise comes from the device's own generator
        cpu = xai_core.explain(model.cpu(), x, method=method, targets=TARGETS, **options)
        torch.testing.assert_close(here.raw[0].cpu(), cpu.raw[0], rtol=1e-4, atol=1e-6)


def test_smoothgrad_wraps_a_layer_method():
    # Grad-CAM's maps on the layer's grid, averaged over the same noisy copies explained directly.
    model = CNN3D(channels=2).eval()
    x = torch.rand(2, 2, 6, 5, 4, generator=torch.Generator().manual_seed(9))
    options = {"layer": "body.2", "relu": False}
    exp = xai_core.explain(
        model,
        x,
        method="smoothgrad",
        targets=TARGETS,
        local="gradcam",
        local_options=options,
        samples=3,
        chunk=4,
    )
    assert exp.layers == ["body.2"] and exp.details["local"] == "gradcam"
    copies, _ = noisy_copies(x, 3, 0.15, 0)
    direct = xai_core.explain(model, copies, method="gradcam", targets=TARGETS * 3, **options)
    torch.testing.assert_close(exp.raw[0], direct.raw[0].unflatten(0, (3, 2)).mean(0))


def test_progress_counts_path_points_and_noisy_copies():
    model, calls = Linear((3, 5, 4)), []
    xai_core.explain(
        model,
        X2,
        method="integrated-gradients",
        steps=3,
        chunk=4,
        progress=lambda *a: calls.append(a),
    )
    assert calls == [(4, 6, "path points"), (6, 6, "path points")]
    calls.clear()
    xai_core.explain(
        model, X2, method="smoothgrad", samples=3, chunk=5, progress=lambda *a: calls.append(a)
    )
    assert calls == [(5, 6, "noisy copies"), (6, 6, "noisy copies")]
    with pytest.raises(OptionError, match="progress"):
        xai_core.explain(model, X2, method="integrated-gradients", progress=3)


def test_cost_estimate_counts_the_path():
    assert IntegratedGradients.forward_images((3, 1, 8, 8), {"steps": 10}) == 36
    assert IntegratedGradients.forward_images((2, 1, 8, 8), {}) == 68
