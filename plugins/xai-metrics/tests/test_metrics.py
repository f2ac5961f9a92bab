"""The built-in metrics against hand computations, brute-force loops and the papers' results.

Models are hand-built: a linear model over pixels (logit = sum w * x) whose true attribution is
``w * x``, and a tiny CNN for Grad-CAM. Test-only explainers (an edge detector, ``|x|``, the true
attribution, a random map) are registered in-process, inside a fixture that resets the registry
before and after.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn
from xai_metrics import (
    METRICS,
    AvgDrop,
    AvgIncrease,
    Deletion,
    EnergyPointingGame,
    Insertion,
    PointingGame,
    Stability,
)
from xai_metrics.common import average_ranks, spearman, ssim
from xai_metrics.sanity import cascade_points, rotate

import xai_core
from xai_core import Attribution, Tags
from xai_core.core.errors import InputError, OptionError, UnknownOptionError
from xai_core.core.explanation import Explanation
from xai_core.core.metrics import Direction, MetricContext, MetricResult, check_metric_class
from xai_core.torch.ops import gaussian_blur

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
NAMES = {
    "deletion",
    "insertion",
    "pointing_game",
    "energy_pointing_game",
    "relevance_mass",
    "relevance_rank",
    "sparseness",
    "complexity",
    "randomization",
    "avg_drop",
    "avg_increase",
    "stability",
    "cost",
}
MASKED = {"pointing_game", "energy_pointing_game", "relevance_mass", "relevance_rank"}


# -- hand-built models and test-only explainers ------------------------------------------------


class LinearPixels(nn.Module):
    """logits = (sum w * x, 0): class 0's probability is sigmoid(sum w * x), its truth w * x."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.weight).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def blobs(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Two Gaussian blobs per image plus a little noise: images with edges worth finding."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    centres = torch.randint(3, size - 3, (n, 2, 2), generator=g).float()
    image = sum(
        torch.exp(
            -((yy - centres[:, k, 0, None, None]) ** 2 + (xx - centres[:, k, 1, None, None]) ** 2)
            / 6
        )
        for k in range(2)
    )
    return image[:, None] + 0.05 * torch.randn(n, 1, size, size, generator=g)


def sobel(inputs: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the channel mean, 2D: a map that never looks at the model."""
    k = torch.tensor(
        [[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=inputs.dtype, device=inputs.device
    )
    padded = F.pad(inputs.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, k[None, None]), F.conv2d(padded, k.T[None, None])
    return (gx.square() + gy.square()).sqrt()


def _explainer(name: str, make_map):
    class Given:
        tags = Tags("local", "model-agnostic")

        def explain(self, model, inputs, targets):
            with torch.no_grad():
                scores = model.forward(inputs)
            targets.resolve(scores)
            return Attribution(maps=make_map(model, inputs), scores=scores)

    Given.name = name
    Given.__qualname__ = f"Given[{name}]"
    return Given


EDGES = _explainer("edges", lambda model, x: sobel(x))
ABS = _explainer("abs", lambda model, x: x.abs().sum(1, keepdim=True))
TRUTH = _explainer("truth", lambda model, x: (x * model.module.weight).sum(1, keepdim=True))
RANDOM = _explainer(
    "random",
    lambda model, x: torch.rand(
        (*x.shape[:1], 1, *x.shape[2:]), generator=torch.Generator().manual_seed(7)
    ).to(x.device),
)


class ExtraExplainers:
    @xai_core.hookimpl
    def register_explainers(self, register):
        for cls in (EDGES, ABS, TRUTH, RANDOM):
            register(cls)


@pytest.fixture
def registry():
    """The global registry with the test-only explainers, rebuilt before and after the test."""
    xai_core.reset_registry()
    registry = xai_core.get_registry()
    registry.register_plugin(ExtraExplainers(), "test-explainers")
    yield registry
    xai_core.reset_registry()


def _no_rerun(**_):
    raise AssertionError("this metric should not re-explain")


def context(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    *,
    targets: int | list[int] = 0,
    masks: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> MetricContext:
    """A context for given maps ``(N, *spatial)``, to call a metric directly."""
    adapter = xai_core.adapt(model)
    with torch.no_grad():
        scores = adapter.forward(x)
    t = torch.as_tensor(targets, device=x.device).expand(x.shape[0])
    explanation = Explanation(
        method="given",
        raw=[maps.unsqueeze(1)],
        layers=[],
        targets=t[:, None],
        scores=scores,
        input_shape=tuple(x.shape),
    )
    return MetricContext(
        model=adapter,
        inputs=x,
        explanation=explanation,
        method="given",
        rerun=_no_rerun,
        masks=masks,
        chunk_size=chunk_size,
    )


# -- registration ----------------------------------------------------------------------------


def test_every_builtin_metric_is_registered_by_entry_point(registry):
    metrics = registry.metrics()
    assert set(metrics) >= NAMES
    for cls in METRICS:
        check_metric_class(cls)
        assert metrics[cls.name] is cls
    assert not [f for f in registry.failures if "metric" in f.plugin]


def test_third_party_metric_plugin_is_used_by_compare(registry):
    class Area:
        """Share of pixels above a threshold of the normalised map."""

        name = "area"
        direction = Direction.LOWER
        needs = frozenset()

        def compute(self, context, *, threshold: float = 0.5):
            return MetricResult(
                context.explanation.normalized().flatten(1).gt(threshold).double().mean(1)
            )

    class Plugin:
        @xai_core.hookimpl
        def register_metrics(self, register):
            register(Area)

    registry.register_plugin(Plugin(), "area-plugin", distribution="area-dist", version="1")
    assert registry.metrics()["area"] is Area
    weight = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    model, x = LinearPixels(weight), torch.randn(2, 1, 4, 4)
    result = xai_core.compare(
        model,
        x,
        methods=["truth"],
        metrics=["area", "cost"],
        metric_options={"area": {"threshold": 0.25}},
    )
    maps = (x * weight).sum(1).flatten(1)
    low, high = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    expected = ((maps - low) / (high - low) > 0.25).double().mean(1)
    torch.testing.assert_close(result.values[("truth", "area")], expected)
    assert result.directions["area"] is Direction.LOWER
    every = xai_core.compare(model, x, methods=["truth"])  # metrics=None: all installed
    assert set(every.metrics) >= {"area"} | NAMES - MASKED
    assert set(every.skipped_metrics) == MASKED
    assert not every.errors


def test_unknown_metric_option_is_refused(registry):
    model, x = LinearPixels(torch.ones(1, 4, 4)), torch.randn(1, 1, 4, 4)
    with pytest.raises(UnknownOptionError, match=r"stepz.*Did you mean 'steps'"):
        xai_core.compare(
            model,
            x,
            methods=["truth"],
            metrics=["deletion"],
            metric_options={"deletion": {"stepz": 3}},
        )


# -- deletion and insertion --------------------------------------------------------------------


def test_deletion_by_hand():
    """Contributions w * x = (4, 3, 2, 1), logit 10; deleting one pixel a step to baseline 0:
    logits 10, 6, 3, 1, 0 at fractions 0, 1/4, ..., 1, AUC = (8 + 4.5 + 2 + 0.5) / 4 = 3.75."""
    x = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    model = LinearPixels(torch.ones(1, 2, 2))
    result = Deletion().compute(context(model, x, x[:, 0]), steps=4, kind="logit")
    torch.testing.assert_close(result.values, torch.tensor([3.75], dtype=torch.float64))
    torch.testing.assert_close(result.details["curves"], torch.tensor([[10.0, 6, 3, 1, 0]]))
    torch.testing.assert_close(result.details["fractions"], torch.linspace(0, 1, 5).double())


def _score(model, x, target, kind):
    out = model(x[None])[0]
    if kind == "softmax":
        out = out.softmax(0)
    elif kind == "sigmoid":
        out = out.sigmoid()
    return float(out[target])


def brute_force_auc(model, x, attribution, start, end, steps, kind, target=0):
    """One image and one pixel at a time: sort pixels by attribution (ties in raster order),
    copy ``end`` into ``start`` for the first floor(k P / steps) of them, trapezoid the scores."""
    spatial = x.shape[1:]
    pixels = math.prod(spatial)
    order = sorted(range(pixels), key=lambda i: (-float(attribution.flatten()[i]), i))
    fractions, scores = [], []
    with torch.no_grad():
        for k in range(steps + 1):
            image = start.clone()
            for i in order[: k * pixels // steps]:
                where = (slice(None), *np.unravel_index(i, spatial))
                image[where] = end[where]
            fractions.append(k * pixels // steps / pixels)
            scores.append(_score(model, image, target, kind))
    return np.trapezoid(scores, fractions)


CASES = [  # spatial, steps, kind, chunk
    ((3, 4), 12, "softmax", 64),
    ((3, 4), 5, "logit", 1),  # steps do not divide the pixels
    ((5, 5), 7, "sigmoid", 3),
    ((2, 3, 4), 6, "softmax", 5),  # 3D
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spatial", "steps", "kind", "chunk"), CASES)
def test_deletion_and_insertion_equal_brute_force(device, spatial, steps, kind, chunk):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2, *spatial, generator=g)
    x = torch.randn(2, 2, *spatial, generator=g)
    attribution = torch.randn(2, *spatial, generator=g).round(decimals=1)  # some ties
    model = LinearPixels(weight).to(device)
    ctx = context(model, x.to(device), attribution.to(device), chunk_size=chunk)
    deletion = Deletion().compute(ctx, steps=steps, kind=kind, baseline=0.5)
    insertion = Insertion().compute(ctx, steps=steps, kind=kind, sigma=1.0)

    rank = len(spatial)
    blurred = gaussian_filter(
        x.double().numpy(), (0, 0) + (1.0,) * rank, mode="nearest", truncate=3
    )
    blurred = torch.from_numpy(blurred).float()
    for b in range(2):
        expected = brute_force_auc(
            model.cpu(), x[b], attribution[b], x[b], torch.full_like(x[b], 0.5), steps, kind
        )
        assert float(deletion.values[b]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        expected = brute_force_auc(model, x[b], attribution[b], blurred[b], x[b], steps, kind)
        assert float(insertion.values[b]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        model.to(device)
    assert deletion.values.device.type == device


def test_true_attribution_beats_a_random_map(registry):
    """For a linear model deleting the largest w * x first lowers the logit fastest at every
    step, so its deletion AUC is the least of any order; insertion from the blur is won by
    w * (x - blur(x)) in the same way, and w * x (blur ~ 0 here) still beats random maps."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    model = LinearPixels(weight)
    result = xai_core.compare(
        model,
        x,
        methods=["truth", "random"],
        metrics=["deletion", "insertion"],
        targets=0,
        metric_options={"deletion": {"steps": 64}, "insertion": {"steps": 64}},
    )
    assert not result.errors
    assert result.ranking("deletion") == ["truth", "random"]
    assert result.ranking("insertion") == ["truth", "random"]
    assert (result.values[("truth", "deletion")] <= result.values[("random", "deletion")]).all()
    for order in (torch.rand(6, 8, 8, generator=g), (x * weight)[:, 0]):
        ctx = context(model, x, order)
        best = context(model, x, (weight * (x - gaussian_blur(x, (5.0, 5.0))))[:, 0])
        assert (
            Insertion().compute(best, steps=64).values
            >= Insertion().compute(ctx, steps=64).values - 1e-12
        ).all()


def test_kind_auto_and_single_output():
    """auto: softmax for several outputs, sigmoid for one; softmax over one output is refused."""
    x = torch.randn(1, 1, 2, 2)
    single = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    ctx = context(single, x, x[:, 0])
    assert Deletion().compute(ctx, steps=2).details["kind"] == "sigmoid"
    with pytest.raises(OptionError, match="sigmoid"):
        Deletion().compute(ctx, kind="softmax")
    with pytest.raises(OptionError, match="steps"):
        Deletion().compute(ctx, steps=0)
    with pytest.raises(OptionError, match="kind"):
        Deletion().compute(ctx, kind="probability")
    two = context(LinearPixels(torch.ones(1, 2, 2)), x, x[:, 0])
    assert Insertion().compute(two, steps=2).details["kind"] == "softmax"


def test_metrics_leave_the_model_as_they_found_it(registry):
    """Forwards run in the model's session: eval mode inside, training flag and BatchNorm
    statistics exactly as before afterwards; randomisation works on a copy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 2),
    ).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 6, 6)
    result = xai_core.compare(
        model,
        x,
        methods=["edges"],
        metrics=["deletion", "insertion", "avg_drop", "randomization", "stability"],
        metric_options={"deletion": {"steps": 4}, "insertion": {"steps": 4}},
    )
    assert not result.errors
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- pointing games ------------------------------------------------------------------------------


def _peak_map(spatial, peak) -> torch.Tensor:
    maps = torch.zeros(spatial)
    maps[peak] = 1.0
    return maps


def _pointing(maps, masks, **options):
    x = torch.zeros(maps.shape[0], 1, *maps.shape[1:])
    model = LinearPixels(torch.zeros(1, *maps.shape[1:]))
    return PointingGame().compute(context(model, x, maps, masks=masks), **options)


@pytest.mark.parametrize(
    ("mask_at", "hit"),
    [((10, 10), 1.0), ((10, 12), 1.0), ((11, 11), 1.0), ((10, 13), 0.0), ((12, 12), 0.0)],
)
def test_pointing_game_tolerance_in_pixels(mask_at, hit):
    """Tolerance 2 px: (0, 2) and (1, 1) away are hits; (0, 3) and (2, 2) (2.83 px) are not."""
    maps = _peak_map((32, 32), (10, 10))[None]
    masks = _peak_map((32, 32), mask_at).bool()[None]
    result = _pointing(maps, masks, tolerance=2, reference_size=None)
    assert result.values.tolist() == [hit]


@pytest.mark.parametrize(
    ("size", "offset", "hit"),
    [
        ((224, 224), (0, 15), 1.0),
        ((224, 224), (0, 16), 0.0),
        ((448, 448), (0, 30), 1.0),  # 15 px at 224 px is 30 px at 448 px
        ((448, 448), (30, 1), 0.0),
        ((112, 448), (7, 0), 1.0),  # per axis: 7.5 px along H, 30 px along W
        ((112, 448), (8, 0), 0.0),
        ((112, 448), (0, 30), 1.0),
    ],
)
def test_pointing_game_tolerance_scales_with_image_size(size, offset, hit):
    peak = (size[0] // 2, size[1] // 4)
    maps = _peak_map(size, peak)[None]
    masks = _peak_map(size, (peak[0] + offset[0], peak[1] + offset[1])).bool()[None]
    assert _pointing(maps, masks).values.tolist() == [hit]


def test_pointing_game_3d_empty_masks_constant_maps_and_classes():
    """3D, tolerance 1.5 voxels: (1, 1, 0) away is a hit, (1, 1, 1) (1.73) is not; an empty mask
    has no value; a constant map points nowhere; accuracy is averaged over classes."""
    spatial = (6, 8, 8)
    maps = torch.stack([_peak_map(spatial, (3, 4, 4))] * 4 + [torch.ones(spatial)])
    masks = torch.stack(
        [
            _peak_map(spatial, (4, 5, 4)),  # hit
            _peak_map(spatial, (4, 5, 5)),  # miss
            torch.zeros(spatial),  # no mask: NaN
            _peak_map(spatial, (3, 4, 4)),  # hit
            torch.ones(spatial),  # constant map: miss although the mask covers everything
        ]
    ).bool()
    x = torch.zeros(5, 1, *spatial)
    ctx = context(
        LinearPixels(torch.zeros(1, *spatial)), x, maps, masks=masks, targets=[0, 0, 0, 1, 1]
    )
    result = PointingGame().compute(ctx, tolerance=1.5, reference_size=None)
    torch.testing.assert_close(
        result.values,
        torch.tensor([1.0, 0.0, math.nan, 1.0, 0.0], dtype=torch.float64),
        equal_nan=True,
    )
    assert result.details["per_class"] == {0: 0.5, 1: 0.5}
    assert result.details["accuracy"] == 0.5
    assert (result.details["hits"], result.details["misses"]) == (2, 2)
    assert result.details["constant_maps"] == 1
    exact = PointingGame().compute(ctx, tolerance=0, reference_size=None)
    assert exact.values[:2].tolist() == [0.0, 0.0] and exact.values[3] == 1.0


def test_pointing_game_accuracy_is_averaged_over_classes():
    maps = torch.stack([_peak_map((8, 8), (2, 2))] * 3)
    masks = torch.stack([_peak_map((8, 8), p) for p in [(2, 2), (2, 2), (6, 6)]]).bool()
    ctx = context(
        LinearPixels(torch.zeros(1, 8, 8)),
        torch.zeros(3, 1, 8, 8),
        maps,
        masks=masks,
        targets=[0, 0, 1],
    )
    result = PointingGame().compute(ctx, tolerance=0)
    assert result.values.tolist() == [1.0, 1.0, 0.0]
    assert result.details["per_class"] == {0: 1.0, 1: 0.0}
    assert result.details["accuracy"] == 0.5  # not 2/3: every class counts once


def test_energy_pointing_game_by_hand():
    """Positive energy 1 + 3 = 4, of which 1 lies in the mask: 0.25. 3D: 2 of 2 + 6 = 0.25.
    No positive attribution: 0; empty mask: NaN."""
    maps = torch.tensor(
        [[[1.0, -2.0], [3.0, 0.0]], [[-1.0, -2.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]
    )
    masks = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]]).bool()
    ctx = context(LinearPixels(torch.zeros(1, 2, 2)), torch.zeros(3, 1, 2, 2), maps, masks=masks)
    result = EnergyPointingGame().compute(ctx)
    torch.testing.assert_close(
        result.values, torch.tensor([0.25, 0.0, math.nan], dtype=torch.float64), equal_nan=True
    )
    assert result.details["no_positive"] == 1

    volume = torch.zeros(1, 2, 3, 4)
    volume[0, 0, 0, 0], volume[0, 1, 2, 3], volume[0, 1, 1, 1] = 2.0, 6.0, -5.0
    mask = torch.zeros(1, 2, 3, 4, dtype=torch.bool)
    mask[0, 0] = True
    ctx = context(
        LinearPixels(torch.zeros(1, 2, 3, 4)), torch.zeros(1, 1, 2, 3, 4), volume, masks=mask
    )
    assert EnergyPointingGame().compute(ctx).values.tolist() == [0.25]


def test_pointing_games_through_compare_need_masks(registry):
    model, x = LinearPixels(torch.randn(1, 8, 8)), torch.randn(2, 1, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    result = xai_core.compare(
        model,
        x,
        methods=["abs"],
        metrics=["pointing_game", "energy_pointing_game"],
        masks=masks,
        metric_options={"pointing_game": {"tolerance": 0}},
    )
    energy = x[:, 0].abs()
    expected = energy[:, :4].flatten(1).sum(1) / energy.flatten(1).sum(1)
    torch.testing.assert_close(result.values[("abs", "energy_pointing_game")], expected.double())
    peak_rows = torch.stack(torch.unravel_index(energy.flatten(1).argmax(1), (8, 8)))[0]
    torch.testing.assert_close(result.values[("abs", "pointing_game")], (peak_rows < 4).double())
    with pytest.raises(InputError, match="masks"):
        PointingGame().compute(context(model, x, x[:, 0]))


# -- randomisation -----------------------------------------------------------------------------


def test_randomisation_collapses_gradcam_but_not_an_edge_detector(registry):
    """Adebayo et al. (2018), cascading randomisation: as the layers are re-initialised from the
    top, Grad-CAM's map loses its rank correlation with the original, while an edge detector,
    which ignores the model, keeps it exactly (Spearman = SSIM = 1 at every stage)."""
    pytest.importorskip("xai_gradcam")
    model, x = tiny_cnn(0), blobs(4, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = xai_core.compare(
        model,
        x,
        methods=["gradcam", "edges"],
        metrics=["randomization"],
        metric_options={"randomization": {"stages": None}},
    )
    assert not result.errors
    gradcam, edges = (result.details[(m, "randomization")] for m in ("gradcam", "edges"))
    assert gradcam["layers"] == ["6", "2", "0"]  # output side first
    assert gradcam["stages"] == [1, 2, 3]
    torch.testing.assert_close(result.values[("edges", "randomization")], torch.ones(4).double())
    assert edges["spearman"] == pytest.approx([1, 1, 1]) and edges["ssim"] == pytest.approx([1] * 3)
    assert float(result.values[("gradcam", "randomization")].mean()) < 0.3
    assert max(abs(r) for r in gradcam["spearman"][1:]) < 0.3  # below the head, nothing is left
    assert max(gradcam["ssim"][1:]) < 0.3
    assert result.ranking("randomization") == ["gradcam", "edges"]
    for key, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[key])


def test_randomisation_scores_the_magnitude_of_the_rank_correlation():
    """A map that inverts when the weights go (rho = -1) kept all of its structure: it scores as
    badly as a map that did not change (|rho| = 1), not as the best; the verdict flags it."""
    from xai_metrics import Randomization

    model, x = tiny_cnn(0), blobs(2, 0)
    maps = x[:, 0] + 0.01 * torch.arange(16.0 * 16).view(16, 16)  # no ties
    ctx = context(model, x, maps)
    inverted = Explanation(
        method="given",
        raw=[-maps.unsqueeze(1)],
        layers=[],
        targets=ctx.explanation.targets,
        scores=ctx.explanation.scores,
        input_shape=tuple(x.shape),
    )
    ctx.rerun = lambda **_: inverted
    result = Randomization().compute(ctx, stages=2)
    torch.testing.assert_close(result.values, torch.ones(2, dtype=result.values.dtype))
    assert result.details["spearman"] == pytest.approx([-1, -1])
    assert result.details["abs_spearman"] == pytest.approx([1, 1])
    torch.testing.assert_close(result.details["abs_spearman_deepest"], result.values.cpu())


def test_verdict_flags_the_edge_detector_as_untrustworthy(registry):
    pytest.importorskip("xai_gradcam")
    model, x = tiny_cnn(0), blobs(4, 0)
    result = xai_core.compare(
        model,
        x,
        methods=["gradcam", "edges"],
        metrics=["randomization", "stability"],
        metric_options={"randomization": {"stages": 2}, "stability": {"augmentations": "hflip"}},
    )
    verdict = result.verdict()
    assert result.ranking("stability")[0] == "edges"  # it wins the other metric
    assert verdict.untrusted == ["edges"] and verdict.best == ["gradcam"]
    assert [s.method for s in verdict.methods][-1] == "edges"
    assert any(line.startswith("Untrustworthy: edges") for line in verdict.lines)


def test_cascade_follows_execution_order_and_stages_are_evenly_spaced():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # declared first, runs last
            self.body = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    # the cascade order is the adapter's (ParameterRandomization.parameter_layers)
    layers = xai_core.adapt(Backwards()).parameter_layers(torch.zeros(1, 1, 2, 2))
    order = [(name, None) for name in layers]
    assert [name for name, _ in order] == ["head", "body"]
    assert cascade_points(3, None) == [1, 2, 3]
    assert cascade_points(100, 5) == [1, 26, 50, 75, 100]
    assert cascade_points(100, 1) == [100]


def test_randomisation_stages_and_seed(registry):
    pytest.importorskip("xai_gradcam")
    model, x = tiny_cnn(0), blobs(2, 0)
    run = lambda **o: xai_core.compare(  # noqa: E731
        model,
        x,
        methods=["gradcam"],
        metrics=["randomization"],
        metric_options={"randomization": o},
    )
    a, b = run(stages=2, seed=1), run(stages=2, seed=1)
    assert a.details[("gradcam", "randomization")]["stages"] == [1, 3]
    assert a.details[("gradcam", "randomization")]["stage_layers"] == ["6", "0"]
    torch.testing.assert_close(
        a.values[("gradcam", "randomization")], b.values[("gradcam", "randomization")]
    )


def test_spearman_and_ssim_against_scipy_and_skimage():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 9, 11, generator=g).round()  # ties
    b = (a + torch.randn(3, 9, 11, generator=g)).round()
    expected = [spearmanr(p.flatten(), q.flatten()).statistic for p, q in zip(a, b, strict=True)]
    torch.testing.assert_close(
        spearman(a.flatten(1), b.flatten(1)), torch.tensor(expected).double()
    )
    from scipy.stats import rankdata

    torch.testing.assert_close(
        average_ranks(a.flatten(1)), torch.from_numpy(rankdata(a.flatten(1), axis=1))
    )

    def norm(m):
        return ((m - m.min()) / (m.max() - m.min())).double().numpy()

    expected = [
        structural_similarity(norm(p), norm(q), data_range=1.0) for p, q in zip(a, b, strict=True)
    ]
    torch.testing.assert_close(ssim(a, b), torch.tensor(expected).double())
    flat = torch.zeros(1, 9, 11)  # a constant original has nothing to compare: NaN
    assert spearman(flat.flatten(1), b[:1].flatten(1)).isnan().all()
    assert ssim(flat, b[:1]).isnan().all()
    assert spearman(b[:1].flatten(1), flat.flatten(1)).tolist() == [0.0]


# -- average drop and increase -----------------------------------------------------------------


def test_avg_drop_and_increase_by_hand():
    """w = [[-1, 1], [1, 1]], class-0 probability sigmoid(sum w * x).
    Sample 1: x = [[1, 2], [3, 4]], Y = s(8); the map keeps only x[1, 1]: O = s(4), a drop.
    Sample 2: x = [[2, 1], [1, 1]], Y = s(1); the map hides only x[0, 0]: O = s(3), an increase.
    Maps are min-max normalised first, so a scaled and shifted map gives the same values."""
    model = LinearPixels(torch.tensor([[[-1.0, 1.0], [1.0, 1.0]]]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[2.0, 1.0], [1.0, 1.0]]]])
    maps = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]]) * 5 + 2
    ctx = context(model, x, maps)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    drop = AvgDrop().compute(ctx)
    torch.testing.assert_close(
        drop.values, torch.tensor([(s(8) - s(4)) / s(8), 0.0], dtype=torch.float64)
    )
    assert AvgIncrease().compute(ctx).values.tolist() == [0.0, 1.0]
    with pytest.raises(OptionError, match="kind"):
        AvgDrop().compute(ctx, kind="logit")  # Y must be a positive confidence


# -- stability and cost ------------------------------------------------------------------------


def test_stability_of_equivariant_maps_is_one_under_flip(registry):
    model, x = tiny_cnn(0), blobs(3, 1)
    result = xai_core.compare(
        model,
        x,
        methods=["edges", "abs"],
        metrics=["stability"],
        metric_options={"stability": {"augmentations": ["hflip", "rotate", "intensity"]}},
    )
    assert not result.errors
    for method in ("edges", "abs"):
        flip = result.details[(method, "stability")]["hflip"]
        assert flip["spearman"] == pytest.approx(1.0, abs=1e-6)
        assert flip["ssim"] == pytest.approx(1.0, abs=1e-6)
    rotated = result.details[("abs", "stability")]["rotate"]
    assert rotated["spearman"] > 0.9 and 0.5 < rotated["valid_fraction"] < 1
    # |x| under contrast and brightness is not |x|: below 1, but the structure remains.
    assert 0.5 < result.details[("abs", "stability")]["intensity"]["spearman"] < 1


def test_rotation_is_a_rotation_in_pixels_on_non_square_images():
    """A point 3 px right of the centre of a 9 x 13 image, turned by 90 degrees, lands 3 px
    above or below the centre (not 3 * 9 / 13 px: the grid's per-axis scaling is undone), and
    turning back restores it."""
    image = torch.zeros(1, 1, 9, 13, dtype=torch.float64)
    image[0, 0, 4, 9] = 1.0
    turned = rotate(image, 90.0)
    peak = torch.unravel_index(turned.flatten().argmax(), (9, 13))
    assert (int(peak[0]), int(peak[1])) in {(1, 6), (7, 6)}
    assert float(turned.max()) == pytest.approx(1.0)
    torch.testing.assert_close(rotate(turned, -90.0), image)


def test_stability_in_3d_and_bad_options(registry):
    """Flip and intensity work on any rank; rotation turns every slice of a volume alike."""
    model = LinearPixels(torch.randn(1, 4, 12, 12))
    x = gaussian_blur(torch.randn(2, 1, 4, 12, 12), (0.5, 1.5, 1.5))  # smooth: rotation keeps it
    volume = torch.stack([rotate(x[:, :, d], 10.0) for d in range(4)], dim=2)
    torch.testing.assert_close(rotate(x, 10.0), volume)
    result = xai_core.compare(model, x, methods=["abs"], metrics=["stability"])
    assert not result.errors
    details = result.details[("abs", "stability")]
    assert details["hflip"]["spearman"] == pytest.approx(1.0)
    assert details["rotate"]["spearman"] > 0.8
    with pytest.raises(OptionError, match="Did you mean 'rotate'"):
        Stability().compute(context(model, x, x[:, 0]), augmentations=["rotat"])


def test_cost_is_the_measured_seconds_per_image(registry):
    model, x = LinearPixels(torch.randn(1, 8, 8)), torch.randn(3, 1, 8, 8)
    result = xai_core.compare(model, x, methods=["abs"], metrics=["cost"])
    values = result.values[("abs", "cost")]
    assert (values > 0).all()
    torch.testing.assert_close(
        values, torch.full((3,), result.costs["abs"].seconds_per_image).double()
    )
    assert result.details[("abs", "cost")]["seconds"] == pytest.approx(result.costs["abs"].seconds)
    assert "peak_bytes" in result.details[("abs", "cost")]


def test_chunk_size_does_not_change_deletion():
    g = torch.Generator().manual_seed(1)
    model, x = LinearPixels(torch.randn(1, 5, 5, generator=g)), torch.randn(3, 1, 5, 5, generator=g)
    maps = torch.randn(3, 5, 5, generator=g)
    values = [
        Deletion().compute(context(model, x, maps, chunk_size=c), steps=10).values
        for c in (1, 4, 64)
    ]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0])


@pytest.mark.parametrize("name", sorted(NAMES - MASKED))
def test_every_metric_runs_on_a_batch_of_one(registry, name):
    result = xai_core.compare(
        tiny_cnn(0),
        blobs(1, 2),
        methods=["edges"],
        metrics=[name],
        metric_options={n: {"steps": 4} for n in ("deletion", "insertion") if n == name},
    )
    assert not result.errors, result.errors
    assert result.values[("edges", name)].shape == (1,)
