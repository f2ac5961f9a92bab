"""RISE: an exact enumeration on a linear model, the masks, seeds, batches, ONNX, conformance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage.transform import resize
from torch import nn
from xai_occlusion.rise import Rise, random_masks, rise_saliency

import xai_core
from xai_core.core.errors import OptionError
from xai_core.core.targets import Targets
from xai_core.demo import onnx_path
from xai_core.testing import parametrize_with_checks

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


class Linear(nn.Module):
    """``f_k(x) = sum_u w[k, u] x[u]``: RISE's expectation has a closed form."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_exact_enumeration_on_a_linear_model():
    # Every binary mask of a 2 x 2 image once, p = 1/2: each pixel is kept in half of them and
    # E[M_u M_v] = p^2 for u != v, so S_k(v) = w_kv x_v (1 - p) + p f_k(x), exactly.
    p = 0.5
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 1.0, -1.0]])
    model = Linear(weight)
    x = torch.tensor([[[[2.0, 1.0], [-1.0, 3.0]]]])
    every = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 2, 2)
    resolved = Targets([[0, 1]], 1).resolve(model(x))
    maps = rise_saliency(model, x, resolved, lambda i: every[i], 16, p, chunk=5)
    f = model(x)[0]  # (2,)
    expected = weight * x.flatten() * (1 - p) + p * f[:, None]
    torch.testing.assert_close(maps[0].flatten(1), expected)


@pytest.mark.parametrize(
    ("cells", "size"), [((7, 7), (64, 64)), ((4, 3), (16, 12)), ((1, 5), (9, 23))]
)
def test_masks_are_the_authors_masks(cells, size):
    # The authors' generate_masks: grid = rand(N, *cells) < p, resized with skimage to
    # (cells + 1) * ceil(size / cells) (order 1, mode "reflect"), cropped at a random shift.
    count = 12
    ours = random_masks(count, cells, 0.5, size, seed=1)(torch.arange(count)).numpy()
    generator = torch.Generator().manual_seed(1)  # the same draws, in the same order
    grids = (torch.rand((count, *cells), generator=generator) < 0.5).numpy()
    cell = [-(-s // c) for s, c in zip(size, cells, strict=True)]
    shifts = [torch.randint(0, c, (count,), generator=generator) for c in cell]
    up = [(c + 1) * k for c, k in zip(cells, cell, strict=True)]
    for i in range(count):
        big = resize(grids[i].astype("float32"), up, order=1, mode="reflect", anti_aliasing=False)
        (y, x) = (int(shifts[0][i]), int(shifts[1][i]))
        np.testing.assert_allclose(ours[i], big[y : y + size[0], x : x + size[1]], atol=1e-6)


def test_masks_kept_with_probability_p_and_smooth():
    draw = random_masks(2000, (4, 4), 0.3, (16, 12), seed=3)
    masks = draw(torch.arange(2000))
    assert masks.shape == (2000, 16, 12)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(masks.mean().item() - 0.3) < 0.02  # upsampling keeps the mean near p
    assert ((masks > 0) & (masks < 1)).float().mean() > 0.2  # bilinear, not binary
    # the shifts differ: masks of the same grid are not all aligned
    assert not torch.equal(draw(torch.tensor([0])), draw(torch.tensor([1])))
    volume = random_masks(8, (3, 3, 3), 0.5, (6, 8, 10), seed=0)(torch.arange(8))
    assert volume.shape == (8, 6, 8, 10)


def test_random_masks_find_the_evidence():
    # The evidence of class 0 lies in the top-left 8 x 8 quadrant of a 16 x 16 image: RISE's
    # map, sum_v w_v x_v E[M_u M_v] / p, is about p f(x) = 32 far from it (masks uncorrelated)
    # and higher where the masks correlate with the evidence.
    weight = torch.zeros(2, 16, 16)
    weight[0, :8, :8] = 1.0
    weight[1, 8:, 8:] = 1.0
    model = Linear(weight.flatten(1))
    x = torch.ones(1, 1, 16, 16)
    exp = xai_core.explain(model, x, method="rise", targets=[[0, 1]], masks=1000, cells=4)
    first, second = exp.raw[0][0, 0], exp.raw[0][0, 1]
    assert first[8:, 8:].mean().item() == pytest.approx(32.0, rel=0.05)
    assert first[:8, :8].mean() > first[8:, 8:].mean() + 5
    assert second[8:, 8:].mean() > second[:8, :8].mean() + 5


def test_seed_determinism_and_batch_invariance():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 100, 4))
    x = torch.randn(3, 2, 10, 10, generator=torch.Generator().manual_seed(2))
    options = {"masks": 50, "cells": 3, "targets": [[0, 2], [1, 1], [3, 0]]}
    state = torch.random.get_rng_state()
    a = xai_core.explain(model, x, method="rise", seed=7, chunk_size=7, **options)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b = xai_core.explain(model, x, method="rise", seed=7, chunk_size=64, **options)
    torch.testing.assert_close(a.raw[0], b.raw[0])  # chunking does not change the result
    c = xai_core.explain(model, x, method="rise", seed=8, **options)
    assert not torch.allclose(a.raw[0], c.raw[0])
    alone = xai_core.explain(model, x[1:2], method="rise", seed=7, masks=50, cells=3,
                             targets=[[1, 1]])
    torch.testing.assert_close(alone.raw[0][0], a.raw[0][1])
    assert a.details["evaluations"] == 150


def test_volume():
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 96, 2))
    x = torch.randn(2, 1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    exp = xai_core.explain(model, x, method="rise", targets=[0, 1], masks=20, cells=(2, 2, 3))
    assert exp.raw[0].shape == (2, 1, 4, 4, 6)


def test_runs_on_the_demo_onnx_model():
    path = onnx_path()
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    on_onnx = xai_core.explain(str(path), x, method="rise", targets=[0, 2], masks=40, seed=3)
    assert on_onnx.model["kind"] == "onnx"
    assert on_onnx.raw[0].shape == (2, 1, 64, 64)
    assert torch.isfinite(on_onnx.raw[0]).all()
    usable = [info.name for info in xai_core.list_explainers(model=str(path))]
    assert "rise" in usable


@pytest.mark.parametrize(
    "options",
    [{"cells": 0}, {"cells": (2, 2, 2)}, {"p": 0.0}, {"p": 1.5}, {"masks": 0},
     {"progress": 3}],
)
def test_bad_options(options):
    model = Linear(torch.ones(2, 16))
    with pytest.raises(OptionError):
        xai_core.explain(model, torch.ones(1, 1, 4, 4), method="rise", **options)


@parametrize_with_checks([(Rise, {"options": {"masks": 300, "cells": 4}})])
def test_rise_conforms(check):
    check()


def test_forward_images_is_the_cost_of_a_call():
    # xai compare's estimate: every masked input plus the unperturbed batch
    calls = []
    model = Linear(torch.ones(2, 16))
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    xai_core.explain(model, torch.ones(2, 1, 4, 4), method="rise", masks=10, cells=2)
    assert sum(calls) == Rise.forward_images((2, 1, 4, 4), {"masks": 10}) == 22
    assert Rise.forward_images((1, 1, 4, 4), {}) == 4001


@pytest.mark.parametrize("device", DEVICES)
def test_same_masks_and_maps_on_every_device(device):
    # masks are drawn on the CPU and copied: the seed means the same masks everywhere
    draw = random_masks(30, (3, 4), 0.5, (12, 16), seed=5)
    index = torch.arange(30)
    torch.testing.assert_close(draw(index.to(device)).cpu(), draw(index), atol=1e-6, rtol=0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 192, 3))
    x = torch.randn(2, 1, 12, 16, generator=torch.Generator().manual_seed(4))
    options = {"method": "rise", "targets": [[0, 2], [1, 0]], "masks": 40, "cells": (3, 4)}
    on_cpu = xai_core.explain(model, x, **options)
    here = xai_core.explain(model.to(device), x.to(device), **options)
    assert here.raw[0].device.type == device
    torch.testing.assert_close(here.raw[0].cpu(), on_cpu.raw[0], atol=1e-4, rtol=1e-4)
