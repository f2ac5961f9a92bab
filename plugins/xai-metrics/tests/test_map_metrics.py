"""Sparseness, complexity, relevance mass and relevance rank accuracy: hand-computed pins that
always run, and agreement with Quantus (a test-only dependency) on the same maps when installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from xai_metrics import Complexity, RelevanceMassAccuracy, RelevanceRankAccuracy, Sparseness

import xai_core
from xai_core.core.errors import InputError
from xai_core.core.explanation import Explanation
from xai_core.core.metrics import MetricContext

NAN = math.nan


class Zeros(nn.Module):
    """Two constant logits: these metrics read the maps only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 2)


def _no_rerun(**_):
    raise AssertionError("this metric should not re-explain")


def context(maps: torch.Tensor, masks: torch.Tensor | None = None) -> MetricContext:
    """A context for given maps ``(N, *spatial)`` with one channel of zeros as the inputs."""
    x = torch.zeros(maps.shape[0], 1, *maps.shape[1:], device=maps.device)
    adapter = xai_core.adapt(Zeros())
    explanation = Explanation(
        method="given",
        raw=[maps.unsqueeze(1)],
        layers=[],
        targets=torch.zeros(maps.shape[0], 1, dtype=torch.long, device=maps.device),
        scores=torch.zeros(maps.shape[0], 2, device=maps.device),
        input_shape=tuple(x.shape),
    )
    return MetricContext(
        model=adapter, inputs=x, explanation=explanation, method="given", rerun=_no_rerun,
        masks=masks,
    )


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        actual.cpu(), torch.tensor(expected, dtype=torch.float64), equal_nan=True
    )


# 2x2 maps: signed, uniform, one pixel, all zero.
MAPS = torch.tensor(
    [[[0.0, -1.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 5.0]], [[0.0] * 2] * 2]
)


def test_sparseness_by_hand():
    """|map| sorted [0, 1, 1, 2], weights 2i - P - 1 = [-3, -1, 1, 3]: 6 / (4 * 4) = 0.375.
    Uniform: 0. One pixel: 1 - 1/P = 0.75. All zero: NaN (Quantus adds 1e-7 and says 0)."""
    result = Sparseness().compute(context(MAPS))
    close(result.values, [0.375, 0.0, 0.75, NAN])
    assert result.details["all_zero"] == 1


def test_complexity_by_hand():
    """p = [0, 1/4, 1/2, 1/4]: H = 2 (1/4) log 4 + (1/2) log 2 = 1.5 log 2. Uniform: log 4.
    One pixel: 0. All zero: NaN."""
    result = Complexity().compute(context(MAPS))
    close(result.values, [1.5 * math.log(2), math.log(4), 0.0, NAN])
    assert result.details["max_entropy"] == pytest.approx(math.log(4))


def test_sparseness_and_complexity_in_3d_are_those_of_the_flat_map():
    volume = torch.rand(3, 2, 3, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    flat = volume.reshape(3, 1, 24)
    for metric in (Sparseness(), Complexity()):
        torch.testing.assert_close(
            metric.compute(context(volume)).values, metric.compute(context(flat)).values
        )


def test_relevance_mass_by_hand_counts_positive_relevance_only():
    """Positive relevance 1 + 3 = 4, 1 in the mask: 0.25 (Quantus sums signed relevance:
    1 / (1 - 2 + 3) = 0.5). No positive relevance: 0. Empty mask: NaN."""
    maps = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0]] * 2])
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]]).bool()
    close(RelevanceMassAccuracy().compute(context(maps, masks)).values, [0.25, 0.0, NAN])


def test_relevance_rank_by_hand_with_ties_shared():
    """K = |mask|. [4 3; 2 1] with mask {3, 2}: top-2 {4, 3}, one inside: 0.5.
    [1 1; 1 0] with mask {top-left, bottom-right}, K = 2: three pixels tie at the cut-off for
    two places, one of them inside: (1 * 2/3) / 2 = 1/3. A constant map scores the chance level
    K / P = 1/4. Empty mask: NaN."""
    maps = torch.tensor(
        [[[4.0, 3.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]], [[7.0] * 2] * 2, [[1.0, 2.0]] * 2]
    )
    masks = torch.tensor(
        [[[0, 1], [1, 0]], [[1, 0], [0, 1]], [[0, 0], [0, 1]], [[0, 0], [0, 0]]]
    ).bool()
    result = RelevanceRankAccuracy().compute(context(maps, masks))
    close(result.values, [0.5, 1 / 3, 0.25, NAN])
    assert result.details["accuracy"] == pytest.approx((0.5 + 1 / 3 + 0.25) / 3)


def test_relevance_rank_3d_and_a_perfect_map():
    masks = torch.zeros(2, 2, 3, 4, dtype=torch.bool)
    masks[0, 1, :2, :2] = True
    masks[1, 0, 2] = True
    maps = masks.double() * 5 + torch.rand(2, 2, 3, 4, dtype=torch.float64)  # mask on top
    close(RelevanceRankAccuracy().compute(context(maps, masks)).values, [1.0, 1.0])
    close(RelevanceRankAccuracy().compute(context(-maps, masks)).values, [0.0, 0.0])


def test_mask_metrics_need_masks_of_the_input_shape():
    maps = torch.rand(2, 4, 4)
    for metric in (RelevanceMassAccuracy(), RelevanceRankAccuracy()):
        with pytest.raises(InputError, match="needs ground-truth masks"):
            metric.compute(context(maps))
        with pytest.raises(InputError, match="masks must have shape"):
            metric.compute(context(maps, torch.ones(2, 4, 5, dtype=torch.bool)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_batched_on_the_maps_device(device):
    maps = torch.rand(5, 8, 8, device=device)
    masks = maps > 0.5
    for metric in (Sparseness(), Complexity(), RelevanceMassAccuracy(), RelevanceRankAccuracy()):
        values = metric.compute(context(maps, masks)).values
        assert values.device.type == device and values.shape == (5,)
        one = torch.cat([metric.compute(context(maps[i : i + 1], masks[i : i + 1])).values
                         for i in range(5)])
        torch.testing.assert_close(values, one)  # a sample's value ignores the others


# -- agreement with Quantus ---------------------------------------------------------------------


def _quantus(metric, a: np.ndarray, s: np.ndarray | None = None) -> np.ndarray:
    """Quantus's scores for precomputed maps ``a`` (N, H, W) and masks ``s``, as numpy."""
    n = a.shape[0]
    batch = {
        "model": None,
        "x_batch": np.zeros((n, 1, *a.shape[1:]), dtype=np.float32),
        "y_batch": np.zeros(n, dtype=np.int64),
        "a_batch": a[:, None].copy(),  # Quantus changes a_batch in place
    }
    if s is not None:
        batch["s_batch"] = s[:, None].astype(np.float32)
    return np.asarray(metric(**batch), dtype=np.float64)


@pytest.fixture(scope="module")
def quantus():
    # Installed by .ci/run with --no-deps (its opencv-python clashes with grad-cam's headless
    # cv2): see requirements-dev.txt and docs/methods/metrics.md, "Agreement with Quantus".
    return pytest.importorskip("quantus", reason="quantus==0.6.0 (test-only) is not installed")


def _signed_maps(n: int = 6, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    maps[0] = maps[0].abs() * (torch.rand(size, size, generator=g) > 0.9)  # sparse
    maps[1] = 1.0  # uniform
    return maps


def test_sparseness_and_complexity_equal_quantus(quantus):
    """abs=True, normalise=False in Quantus is our definition; Quantus adds 1e-7 to every pixel
    before the Gini index, which moves it by less than 1e-6 on these maps."""
    maps = _signed_maps()
    a = maps.numpy()
    options = {"abs": True, "normalise": False, "disable_warnings": True}
    ours = Sparseness().compute(context(maps)).values.numpy()
    np.testing.assert_allclose(ours, _quantus(quantus.Sparseness(**options), a), atol=1e-5)
    ours = Complexity().compute(context(maps)).values.numpy()
    np.testing.assert_allclose(ours, _quantus(quantus.Complexity(**options), a), atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_relevance_mass_and_rank_equal_quantus(quantus):
    """Masks of random size, one empty (NaN in both). Rank: signed maps, abs=False,
    normalise=False (no ties in continuous maps). Mass: Quantus sums signed relevance, Arras
    et al. only positive relevance: equal on maps without negative values (clamped here)."""
    maps = _signed_maps()
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(maps.shape, generator=g) < torch.rand(6, 1, 1, generator=g)
    masks[1, :4] = True
    masks[2] = False
    options = {"abs": False, "normalise": False, "disable_warnings": True}
    a, s = maps.numpy(), masks.numpy()

    ours = RelevanceRankAccuracy().compute(context(maps, masks)).values.numpy()
    theirs = _quantus(quantus.RelevanceRankAccuracy(**options), a[2:], s[2:])
    np.testing.assert_allclose(ours[2:], theirs, atol=1e-5)  # uniform map 1: ties, see below
    assert math.isnan(ours[2]) and math.isnan(theirs[0])
    # A uniform map scores the chance level |mask| / P; Quantus orders the ties by argsort.
    assert ours[1] == pytest.approx(float(masks[1].double().mean()))

    positive = maps.clamp_min(0)
    ours = RelevanceMassAccuracy().compute(context(positive, masks)).values.numpy()
    theirs = _quantus(quantus.RelevanceMassAccuracy(**options), positive.numpy(), s)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
