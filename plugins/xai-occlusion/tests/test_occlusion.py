"""Occlusion against a one-window-at-a-time loop, closed forms, chunking, targets, ONNX, options."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn
from xai_occlusion import Occlusion, default_chunk_size

import xai_core
from xai_core.core.errors import OptionError, UnknownOptionError
from xai_core.testing import explainer_checks

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def cnn(size: tuple[int, ...], channels: int = 2, classes: int = 3, seed: int = 0) -> nn.Module:
    """Conv, tanh, then a linear layer over every position: each pixel matters differently."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if len(size) == 2 else nn.Conv3d
    return nn.Sequential(
        conv(channels, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * math.prod(size), classes),
    )


def batch(n: int, size: tuple[int, ...], channels: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, *size, generator=torch.Generator().manual_seed(seed))


def reference_fill(x: torch.Tensor, baseline: object, sigma: object) -> torch.Tensor:
    """The baseline image of every sample, computed independently of the plugin."""
    if baseline == "mean":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if baseline == "blur":
        sig = (sigma,) * (x.ndim - 2) if isinstance(sigma, float) else tuple(sigma)
        blurred = gaussian_filter(x.double().numpy(), (0, 0, *sig), mode="nearest", truncate=3)
        return torch.from_numpy(blurred).to(x.dtype)
    return torch.full_like(x, 0.0 if baseline == "zero" else float(baseline))


def brute_force(model, x, targets, window, stride, fill) -> torch.Tensor:
    """Occlude one window of one sample at a time; average the score drops over covering boxes."""
    size = x.shape[2:]
    sums = torch.zeros(x.shape[0], *size, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    starts = [range(0, s - w + 1, st) for s, w, st in zip(size, window, stride, strict=True)]
    with torch.no_grad():
        for b, target in enumerate(targets):
            score = model(x[b : b + 1])[0, target]
            for start in itertools.product(*starts):
                box = tuple(slice(p, p + w) for p, w in zip(start, window, strict=True))
                occluded = x[b].clone()
                occluded[(slice(None), *box)] = fill[b][(slice(None), *box)]
                sums[b][box] += float(score - model(occluded[None])[0, target])
                counts[b][box] += 1
    return torch.where(counts > 0, sums / counts.clamp(min=1), 0).float()


CASES = [  # size, window, stride, baseline, sigma, n
    ((6, 7), (3, 3), (2, 2), "zero", 5.0, 1),  # stride does not divide: last row uncovered
    ((6, 7), (2, 3), (1, 2), 0.5, 5.0, 2),
    ((5, 5), (5, 1), (1, 1), "mean", 5.0, 3),  # a window as large as an axis
    ((6, 6), (3, 3), (3, 3), "blur", 1.0, 2),
    ((4, 5, 3), (2, 2, 2), (2, 1, 1), "zero", 5.0, 2),
    ((3, 4, 5), (1, 3, 2), (1, 2, 3), "blur", (0.5, 1.0, 2.0), 3),
    ((4, 4, 4), (3, 2, 4), (1, 3, 2), "mean", 5.0, 1),
]


@pytest.mark.parametrize(("size", "window", "stride", "baseline", "sigma", "n"), CASES)
def test_equals_brute_force(size, window, stride, baseline, sigma, n):
    model, x = cnn(size), batch(n, size)
    targets = [b % 3 for b in range(n)]
    got = xai_core.explain(
        model,
        x,
        method="occlusion",
        targets=targets,
        window=window,
        stride=stride,
        baseline=baseline,
        sigma=sigma,
        chunk_size=4,
    )
    expected = brute_force(model, x, targets, window, stride, reference_fill(x, baseline, sigma))
    assert got.maps.shape == (n, *size)
    torch.testing.assert_close(got.maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.scores, model(x).detach())


def test_chunk_size_does_not_change_the_result():
    size = (5, 6)
    model, x = cnn(size), batch(3, size)
    total = 3 * 4 * 5  # 4 x 5 window positions per sample
    maps = [
        xai_core.explain(
            model,
            x,
            method="occlusion",
            targets=[[0, 2]] * 3,
            window=2,
            stride=1,
            chunk_size=c,
        ).maps
        for c in (1, 2, 3, total, total + 7)
    ]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], atol=1e-6, rtol=1e-5)


def test_default_chunk_size_follows_the_engine():
    """Plain forwards on a CPU run 8 at a time (faster there than 32), the incremental engine and
    accelerators 32; an explicit chunk_size always wins."""
    model, x = cnn((8, 8)), batch(1, (8, 8))

    def chunk(**options):
        exp = xai_core.explain(model, x, method="occlusion", window=2, **options)
        return exp.details["chunk_size"], exp.details["incremental"]["mode"]

    assert chunk(incremental=False) == (8, "off")
    assert chunk(incremental="exact") == (32, "exact")
    assert chunk(incremental=False, chunk_size=5) == (5, "off")
    assert default_chunk_size(incremental=False, device=torch.device("cuda")) == 32


def linear_model(weights: list[list[float]], bias: float = 0.3) -> nn.Module:
    """Scores ``w_k . x + bias`` over the pixels of a (1, 1, 1, 5) image."""
    linear = nn.Linear(5, len(weights))
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weights))
        linear.bias.fill_(bias)
    return nn.Sequential(nn.Flatten(), linear)


@pytest.mark.parametrize(
    ("target", "window", "stride", "baseline", "expected"),
    [
        # w.x per pixel = [1, -2, 6, 0, 5]; boxes {0,1} {1,2} {2,3} {3,4} drop -1, 4, 6, 5
        (0, 2, 1, "zero", [-1.0, 1.5, 5.0, 5.5, 5.0]),
        # boxes {0,1} {2,3} drop 3 and 7; pixel 4 is never covered
        (1, 2, 2, "zero", [3.0, 3.0, 7.0, 7.0, 0.0]),
        # one-pixel boxes: attr = w * (x - baseline)
        (0, 1, 1, 1.0, [0.0, -1.0, 4.0, 0.0, 4.0]),
        # the mean is 3: w * (x - 3) = [-2, 1, 0, 0, 2]; box {0,1,2} drops -1, box {2,3,4} 2
        (0, 3, 2, "mean", [-1.0, -1.0, 0.5, 2.0, 2.0]),
    ],
)
def test_linear_model_closed_form(target, window, stride, baseline, expected):
    model = linear_model([[1, -1, 2, 0, 1], [1, 1, 1, 1, 1]])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 1, 1, 5)
    got = xai_core.explain(
        model,
        x,
        method="occlusion",
        targets=target,
        window=(1, window),
        stride=(1, stride),
        baseline=baseline,
    )
    torch.testing.assert_close(got.maps, torch.tensor(expected).view(1, 1, 5))


def test_several_targets_equal_single_target_calls():
    size = (4, 3, 5)
    model, x = cnn(size), batch(2, size)
    options = {"window": (2, 2, 3), "stride": 1, "baseline": "blur", "sigma": 1.0}
    both = xai_core.explain(model, x, method="occlusion", targets=[[0, 2], [1, 0]], **options)
    assert both.maps.shape == (2, 2, *size)
    for k, single in enumerate(([0, 1], [2, 0])):
        alone = xai_core.explain(model, x, method="occlusion", targets=single, **options).maps
        torch.testing.assert_close(both.maps[:, k], alone, atol=1e-6, rtol=1e-5)
    every = xai_core.explain(model, x, method="occlusion", targets="all", **options).maps
    torch.testing.assert_close(every[:, [0, 2]][0], both.maps[0], atol=1e-6, rtol=1e-5)
    # The attribution is linear in the score: a summed score gives summed maps.
    summed = xai_core.explain(
        model, x, method="occlusion", targets=lambda out: out[:, 0] + out[:, 2], **options
    ).maps
    torch.testing.assert_close(summed, every[:, 0] + every[:, 2], atol=1e-5, rtol=1e-5)


class Counting(nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_progress_and_cost():
    size = (7, 6)
    model, x = Counting(cnn(size)), batch(2, size)
    calls: list[tuple[int, int]] = []
    got = xai_core.explain(
        model,
        x,
        method="occlusion",
        window=3,
        stride=2,
        chunk_size=5,
        progress=lambda done, total, what: calls.append((done, total)),
    )
    total = 2 * 3 * 2  # window positions: 0, 2, 4 down, 0, 2 across; per sample
    assert calls == [(5, total), (10, total), (12, total)]
    assert model.batches == [2, 5, 5, 2]  # the unperturbed batch, then one forward per window
    assert got.details["evaluations"] == total
    assert got.details["positions"] == (3, 2)
    assert got.details["uncovered"] == 7  # the last column, 7 pixels


@pytest.mark.parametrize("device", DEVICES)
def test_maps_stay_on_the_device(device):
    size = (6, 6)
    model, x = cnn(size), batch(2, size)
    on_cpu = xai_core.explain(model, x, method="occlusion", window=2, baseline="blur").maps
    got = xai_core.explain(
        model.to(device), x.to(device), method="occlusion", window=2, baseline="blur"
    )
    assert got.maps.device.type == device
    torch.testing.assert_close(got.maps.cpu(), on_cpu, atol=1e-4, rtol=1e-3)


def test_default_window_and_stride():
    size = (16, 9)
    got = xai_core.explain(cnn(size), batch(1, size), method="occlusion")
    assert got.details["window"] == (2, 2)  # ceil(size / 8)
    assert got.details["stride"] == (1, 1)  # half the window, at least 1


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """A tiny CNN exported twice: batch fixed to 2, and a dynamic batch."""
    size = (6, 5)
    model = cnn(size).eval()
    example = (batch(2, size),)
    folder = tmp_path_factory.mktemp("onnx")
    fixed, dynamic = folder / "fixed.onnx", folder / "dynamic.onnx"
    torch.onnx.export(model, example, fixed, dynamo=True, external_data=False)
    torch.onnx.export(
        model,
        example,
        dynamic,
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    return model, size, fixed, dynamic


@pytest.mark.parametrize("export", ["fixed", "dynamic"])
def test_onnx_agrees_with_torch(onnx_models, export):
    model, size, fixed, dynamic = onnx_models
    path = fixed if export == "fixed" else dynamic
    x = batch(3, size, seed=5)
    options = {"targets": [[0, 1], [2, 2], [1, 0]], "window": (3, 2), "stride": (2, 1)}
    options |= {"baseline": "mean", "chunk_size": 5}
    on_torch = xai_core.explain(model, x, method="occlusion", **options)
    on_onnx = xai_core.explain(str(path), x, method="occlusion", **options)
    assert on_onnx.model["kind"] == "onnx"
    assert on_onnx.model["fixed_batch"] == (2 if export == "fixed" else None)
    torch.testing.assert_close(on_onnx.maps, on_torch.maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(on_onnx.scores, on_torch.scores, atol=1e-4, rtol=1e-4)
    usable = [info.name for info in xai_core.list_explainers(model=str(path))]
    assert "occlusion" in usable


def test_registered_with_tags():
    info = xai_core.get_registry().get_explainer("occlusion")
    assert info.cls is Occlusion
    assert (info.scope, info.dependence) == ("local", "model-agnostic")
    assert info.tags.requires == {xai_core.Capability.FORWARD}
    assert info.distribution == "xai-occlusion"
    assert {"window", "stride", "baseline", "sigma", "chunk_size", "progress"} <= set(info.options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 0}, "'window' of method 'occlusion' must be int >= 1; got 0"),
        ({"window": (2,)}, "one per spatial axis"),
        ({"window": (2, 2, 2)}, "one per spatial axis"),
        ({"window": 2.5}, "'window' .* must be int >= 1 or a sequence"),
        ({"window": True}, "'window' .* must be int >= 1 or a sequence"),
        ({"window": (7, 2)}, "larger than the input"),
        ({"stride": 0}, "'stride' .* must be int >= 1; got 0"),
        ({"stride": -1}, "'stride' .* must be int >= 1; got -1"),
        ({"baseline": "blurr"}, "Did you mean 'blur'"),
        ({"baseline": True}, "'baseline' .* must be float or one of 'zero'"),
        ({"baseline": float("nan")}, "'baseline' .* must be a finite number"),
        ({"baseline": None}, "'baseline' .* must be float or one of 'zero'"),
        ({"baseline": "blur", "sigma": 0}, r"'sigma' .* must be float in \(0, 100\]"),
        ({"baseline": "blur", "sigma": np.inf}, "'sigma' .* must be a finite number"),
        ({"chunk_size": 0}, "'chunk_size' .* must be int >= 1"),
        ({"chunk_size": 1.5}, "'chunk_size' .* must be int >= 1 or None"),
        ({"progress": 3}, "'progress' .* must be a callable"),
    ],
)
def test_bad_options(options, message):
    size = (6, 5)
    with pytest.raises(OptionError, match=message):
        xai_core.explain(cnn(size), batch(1, size), method="occlusion", **options)


def test_unknown_option():
    size = (6, 5)
    with pytest.raises(UnknownOptionError, match="window"):
        xai_core.explain(cnn(size), batch(1, size), method="occlusion", windw=2)


@pytest.mark.parametrize(
    "check", explainer_checks(Occlusion, options={"window": 3, "stride": 2}), ids=lambda c: c.name
)
def test_conformance(check):
    check()
