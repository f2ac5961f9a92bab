"""xai_core.torch.ops: the shared tensor operations, against references."""

from __future__ import annotations

import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from xai_core.torch.ops import gaussian_blur, target_gradients


@pytest.mark.parametrize(
    ("shape", "sigma"), [((2, 3, 9, 7, 5), (1.0, 2.0, 0.5)), ((1, 2, 11, 6), (1.5, 0.7))]
)
def test_gaussian_blur_equals_scipy(shape, sigma):
    x = torch.randn(*shape, dtype=torch.float64)
    expected = gaussian_filter(x.numpy(), (0, 0, *sigma), mode="nearest", truncate=3)
    torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(expected))


def test_gaussian_blur_wants_one_sigma_per_axis():
    with pytest.raises(ValueError, match="one sigma per spatial axis"):
        gaussian_blur(torch.zeros(1, 1, 4, 4), (1.0,))


def test_target_gradients_equal_one_backward_per_sample_and_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    hidden = net[1](net[0](x))
    scores = net[3](net[2](hidden))
    targets = torch.tensor([[4, 0], [1, 1], [2, 3]])
    chosen = scores.gather(1, targets)  # (N, K)
    unused = torch.zeros(1, requires_grad=True)
    got = list(target_gradients(chosen, [hidden, x, unused]))
    assert len(got) == 2 and all(g[2] is None for g in got)
    for k in range(2):
        for n in range(3):  # the reference: a fresh forward and backward per sample and target
            xn = x[n : n + 1].detach().requires_grad_(True)
            hn = net[1](net[0](xn))
            dh, dx = torch.autograd.grad(net[3](net[2](hn))[0, targets[n, k]], [hn, xn])
            torch.testing.assert_close(got[k][0][n], dh[0])
            torch.testing.assert_close(got[k][1][n], dx[0])
    assert scores.grad_fn is not None  # the graph is freed after the last target, not before
    with pytest.raises(RuntimeError):
        torch.autograd.grad(chosen.sum(), [x])
