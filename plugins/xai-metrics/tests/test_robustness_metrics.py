"""ROAD, max-sensitivity, local Lipschitz and eMPRT: the exact solve and hand computations that
always run, compare() on the demo, and agreement with Quantus 0.6.0 (test-only) when installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import nn
from xai_metrics import EfficientMPRT, LocalLipschitz, MaxSensitivity, Road
from xai_metrics.road import NEIGHBOURS, linear_imputation, neighbour_sum
from xai_metrics.robustness import perturbations

import xai_core
from xai_core.core.adapters import torch_module_of
from xai_core.core.errors import CapabilityError, OptionError
from xai_core.core.explanation import Explanation
from xai_core.core.metrics import MetricContext

NEW = ("road", "max_sensitivity", "local_lipschitz", "emprt")


# -- a tiny model and an explainer both libraries can run -------------------------------------


def tiny_cnn(channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def grad_x_input(module: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)``: input times the gradient of the target logit, summed over channels."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    (grad,) = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), x)
    return (grad * x).sum(1).detach()


def context(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, calls: list | None = None):
    """A MetricContext whose rerun explains with ``grad_x_input`` on the model it is given, and
    records the size of each batch it was asked to explain."""
    adapter = xai_core.adapt(model)

    def explanation(module: nn.Module, inputs: torch.Tensor, t: torch.Tensor) -> Explanation:
        with torch.no_grad():
            scores = module(inputs)
        return Explanation(
            method="grad_x_input",
            raw=[grad_x_input(module, inputs, t).unsqueeze(1)],
            layers=[],
            targets=t[:, None],
            scores=scores,
            input_shape=tuple(inputs.shape),
        )

    def rerun(inputs=x, model=adapter, targets=targets):
        if calls is not None:
            calls.append(inputs.shape[0])
        return explanation(torch_module_of(model), inputs, torch.as_tensor(targets))

    return MetricContext(
        model=adapter,
        inputs=x,
        explanation=explanation(model, x, targets),
        method="grad_x_input",
        rerun=rerun,
        chunk_size=8,
    )


def inputs(n: int = 3, channels: int = 1, size: int = 12) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(3))


# -- ROAD --------------------------------------------------------------------------------------


def exact_imputation(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The linear system solved exactly by scipy's sparse LU, one pixel equation at a time
    (a loop over pixels: the reference, not the implementation), for ``x`` ``(C, H, W)``."""
    h, w = removed.shape
    ids = -np.ones((h, w), dtype=int)
    where = np.argwhere(removed)
    ids[removed] = np.arange(len(where))
    a = scipy.sparse.lil_matrix((len(where), len(where)))
    rhs = np.zeros((len(where), x.shape[0]))
    for row, (i, j) in enumerate(where):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                weight = NEIGHBOURS[di + 1][dj + 1]
                u, v = i + di, j + dj
                if not weight or not (0 <= u < h and 0 <= v < w):
                    continue
                a[row, row] += weight
                if removed[u, v]:
                    a[row, ids[u, v]] -= weight
                else:
                    rhs[row] += weight * x[:, u, v]
    out = x.copy()
    out[:, removed] = scipy.sparse.linalg.spsolve(a.tocsc(), rhs).reshape(len(where), -1).T
    return out


@pytest.mark.parametrize("share", [0.05, 0.5, 0.97])
def test_imputation_equals_the_exact_sparse_solve(share):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 9, 13, generator=g, dtype=torch.float64)
    removed = torch.rand(3, 9, 13, generator=g) < share
    removed[0, :5, :6] = True  # a block touching two borders
    ours = linear_imputation(x, removed, tol=1e-10)
    for i in range(3):
        expected = exact_imputation(x[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), expected, atol=1e-8)
    kept = ~removed.unsqueeze(1).expand_as(x)
    assert torch.equal(ours[kept], x[kept])


def test_neighbour_weights_are_rong_et_al_in_2d_and_binomial_in_3d():
    delta = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    delta[0, 0, 1, 1] = 1  # the kernel is symmetric: the response to a point is the kernel
    torch.testing.assert_close(neighbour_sum(delta)[0, 0], torch.tensor(NEIGHBOURS).double())
    point = torch.zeros(1, 1, 3, 3, 3, dtype=torch.float64)
    point[0, 0, 1, 1, 1] = 1
    k = neighbour_sum(point)[0, 0]
    assert k[1, 1, 1] == 0 and float(k.sum()) == pytest.approx(1.0)
    assert (float(k[0, 1, 1]), float(k[0, 0, 1]), float(k[0, 0, 0])) == pytest.approx(
        (4 / 56, 2 / 56, 1 / 56)
    )


def test_road_curves_equal_a_brute_force_loop():
    """noise=0: each point is the model's probability on the exactly imputed image."""
    model, x = tiny_cnn(), inputs()
    targets = torch.tensor([0, 1, 2])
    ctx = context(model, x, targets)
    shares = (10, 50, 90)
    result = Road().compute(ctx, percentages=shares, noise=0.0, kind="softmax", tol=1e-10)
    maps = ctx.maps.flatten(1)
    for order, sign in (("morf", 1), ("lerf", -1)):
        curves = result.details[f"{order}_curves"]
        for i in range(3):
            ranking = torch.argsort(-sign * maps[i], stable=True)
            for p_ix, p in enumerate(shares):
                removed = torch.zeros(144, dtype=torch.bool)
                removed[ranking[: math.floor(144 * p / 100)]] = True
                image = exact_imputation(x[i].double().numpy(), removed.view(12, 12).numpy())
                with torch.no_grad():
                    prob = model(torch.from_numpy(image).float()[None]).softmax(1)[0, targets[i]]
                assert float(curves[i, p_ix]) == pytest.approx(float(prob), abs=1e-5)
    expected = result.details["lerf_curves"].mean(1) - result.details["morf_curves"].mean(1)
    torch.testing.assert_close(result.values, expected)


def test_road_noise_is_seeded_and_shared_by_the_samples_and_3d_runs():
    model, x = tiny_cnn(), inputs()
    ctx = context(model, x, torch.tensor([0, 1, 2]))
    a = Road().compute(ctx, noise=0.5, seed=1).values
    b = Road().compute(ctx, noise=0.5, seed=1).values
    c = Road().compute(ctx, noise=0.5, seed=2).values
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    one = Road().compute(context(model, x[1:2], torch.tensor([1])), noise=0.5, seed=1).values
    torch.testing.assert_close(one, a[1:2])  # a sample's value ignores the batch

    volumes = torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    removed = torch.zeros(2, 6, 6, 6, dtype=torch.bool)
    removed[:, 2:4, 2:4, 2:4] = True
    constant = torch.full_like(volumes, 0.25)
    constant[~removed.unsqueeze(1)] = 0.25
    torch.testing.assert_close(linear_imputation(constant, removed), constant)  # harmonic


def test_road_options_are_checked():
    ctx = context(tiny_cnn(), inputs(1), torch.tensor([0]))
    for bad in ({"percentages": [120]}, {"percentages": []}, {"noise": -1}, {"kind": "acc"}):
        with pytest.raises(OptionError):
            Road().compute(ctx, **bad)


# -- max-sensitivity and local Lipschitz ---------------------------------------------------------


class Linear(nn.Module):
    """logit_k = sum w_k * x: grad x input is w_k * x, so e(x + d) - e(x) = w_k * d."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(1) * self.w).flatten(2).sum(2)


def test_sensitivity_and_lipschitz_by_hand_and_batched():
    model = Linear()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.5
    targets = torch.tensor([0, 1, 0])
    calls: list[int] = []
    ctx = context(model, x, targets, calls)
    sens = MaxSensitivity().compute(ctx, samples=5, radius=0.1, seed=4)
    lip = LocalLipschitz().compute(ctx, samples=5, radius=0.1, seed=4)
    # 15 perturbed copies, explained chunk_size (8) at a time, once for both metrics
    assert calls == [8, 7]
    LocalLipschitz().compute(ctx, samples=5, radius=0.1, seed=5)
    assert calls == [8, 7] * 2  # other perturbations: explained again
    deltas = perturbations(x, 5, 0.1, 4).double()
    assert deltas.abs().max() <= 0.1
    w = model.w.detach().double()[targets, 0]  # (N, H, W)
    change = (w[:, None] * deltas[None, :, 0]).flatten(2).norm(dim=2)  # (N, samples)
    expected = (change / (w * x[:, 0].double()).flatten(1).norm(dim=1, keepdim=True)).amax(1)
    close = {"rtol": 1e-5, "atol": 0}  # the maps are float32
    torch.testing.assert_close(sens.values, expected, **close)
    lipschitz = (change / deltas.flatten(1).norm(dim=1)).amax(1)
    torch.testing.assert_close(lip.values, lipschitz, **close)


def test_sensitivity_is_nan_for_a_zero_map_and_options_are_checked():
    model = Linear()
    x = torch.rand(2, 1, 6, 6)
    x[1] = 0  # grad x input is 0 there
    ctx = context(model, x, torch.tensor([0, 1]))
    values = MaxSensitivity().compute(ctx, samples=2).values
    assert math.isfinite(values[0]) and math.isnan(values[1])
    for bad in ({"samples": 0}, {"radius": 0}, {"radius": -1}, {"seed": -1}):
        with pytest.raises(OptionError):
            LocalLipschitz().compute(ctx, **bad)


# -- eMPRT -------------------------------------------------------------------------------------


def test_emprt_by_hand_on_given_maps():
    """Original maps [1, 1, 0, 0] (entropy log 2); the randomised model's map is uniform
    (log 4): the relative rise is 1. An all-zero original map is NaN."""
    x = torch.ones(2, 1, 2, 2)
    original = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    ctx = context(tiny_cnn(), x, torch.tensor([0, 0]))
    ctx.explanation.raw[0] = original.unsqueeze(1)
    models = []

    def rerun(inputs=x, model=ctx.model, targets=None):
        models.append(model)
        exp = ctx.explanation
        return Explanation(
            method="given", raw=[torch.ones(2, 1, 2, 2)], layers=[], targets=exp.targets,
            scores=exp.scores, input_shape=tuple(x.shape),
        )  # fmt: skip

    ctx.rerun = rerun
    result = EfficientMPRT().compute(ctx)
    torch.testing.assert_close(result.values, torch.tensor([1.0, math.nan], dtype=torch.float64),
                               equal_nan=True)  # fmt: skip
    assert len(models) == 1 and models[0] is not ctx.model  # explained again on a copy
    assert result.details["entropy"][0] == pytest.approx(math.log(2))


def test_emprt_needs_a_model_it_can_randomise():
    ctx = context(tiny_cnn(), inputs(1), torch.tensor([0]))
    ctx.model = object()
    with pytest.raises(CapabilityError, match="ParameterRandomization"):
        EfficientMPRT().compute(ctx)


# -- in compare() on the demo, and in `xai plugins` --------------------------------------------


def test_the_new_metrics_run_in_compare_on_the_demo():
    from xai_core.demo import data, load_model

    xrays = data.make_xrays(2, seed=0)
    result = xai_core.compare(
        load_model("cnn"),
        data.preprocess(xrays.images),
        methods=["gradcam", "saliency"],
        metrics=list(NEW),
        metric_options={
            "road": {"percentages": [20, 60]},
            "max_sensitivity": {"samples": 2},
            "local_lipschitz": {"samples": 2},
        },
    )
    assert not result.errors, result.errors
    for method in ("gradcam", "saliency"):
        for metric in NEW:
            values = result.values[(method, metric)]
            assert values.shape == (2,) and bool(values.isfinite().all()), (method, metric)


def test_xai_plugins_lists_the_new_metrics_with_direction_and_needs():
    from typer.testing import CliRunner

    from xai_core.cli.app import build_app

    out = CliRunner().invoke(build_app(), ["plugins"], catch_exceptions=False).output
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    for name, direction in (("road", "higher"), ("max_sensitivity", "lower"),
                            ("local_lipschitz", "lower"), ("emprt", "higher")):  # fmt: skip
        assert rows[name][1] == f"metric ({direction} is better)", out
        assert rows[name][-1] == "ok" and rows[name][-3] == "xai-metrics"
    assert rows["emprt"][4] == "torch-model" and rows["road"][4] == ""


# -- agreement with Quantus 0.6.0 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantus():
    # Installed by .ci/run with --no-deps (requirements-dev.txt says why).
    return pytest.importorskip("quantus", reason="quantus==0.6.0 (test-only) is not installed")


def _explain(model, inputs, targets, **_) -> np.ndarray:
    """Quantus's explain_func: the same grad x input as the contexts' rerun, (N, 1, H, W)."""
    maps = grad_x_input(model, torch.as_tensor(inputs), torch.as_tensor(targets))
    return maps.unsqueeze(1).numpy()


def _batch(ctx: MetricContext) -> dict:
    return {
        "model": torch_module_of(ctx.model),
        "x_batch": ctx.inputs.numpy(),
        "y_batch": ctx.targets.numpy(),
        "a_batch": ctx.maps.unsqueeze(1).numpy().copy(),  # Quantus changes it in place
        "device": "cpu",
    }


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_road_equals_quantus(quantus):
    """Quantus's ROAD is the MoRF accuracy curve averaged over samples: our ``morf_curves``
    with kind="accuracy", noise=0 (Quantus draws its noise from NumPy's global generator).
    One channel: Quantus ranks the attribution broadcast over channels, which indexes past the
    pixels for C > 1. The imputed images themselves are compared too."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    model = Linear().eval()
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = model(x).argmax(1)
    ctx = context(model, x, targets)
    shares = [10, 30, 50, 70, 90]
    ours = Road().compute(ctx, percentages=shares, noise=0.0, kind="accuracy", tol=1e-10)
    road = quantus.ROAD(percentages=shares, noise=0.0, abs=False, normalise=False,
                        disable_warnings=True)  # fmt: skip
    theirs = road(**_batch(ctx))
    np.testing.assert_allclose(ours.details["morf_curves"].mean(0), list(theirs.values()))
    assert len(set(theirs.values())) > 2  # the curve moves: not a trivial agreement

    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 10, 14, generator=g, dtype=torch.float64)
    shares = torch.tensor([0.02, 0.3, 0.7, 0.99])[:, None, None]
    removed = torch.rand(4, 10, 14, generator=g) < shares
    imputed = linear_imputation(images, removed, tol=1e-7)
    default = linear_imputation(images, removed)  # stops earlier: within 1e-3, below the noise
    for i in range(4):
        index = removed[i].flatten().nonzero()[:, 0].numpy()
        expected = noisy_linear_imputation(images[i].numpy(), index, noise=0.0)
        np.testing.assert_allclose(imputed[i].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(default[i].numpy(), expected, atol=1e-3)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_max_sensitivity_and_local_lipschitz_equal_quantus(quantus):
    """Quantus replays our perturbations (its perturb_func), explains each perturbed batch with
    the same explainer and takes the same norms: equal within 1e-5. (Quantus's default
    perturbation for the Lipschitz estimate is Gaussian; Alvarez-Melis and Jaakkola sample a
    ball: ours is uniform in the L-inf ball for both.)"""
    model, x = tiny_cnn(), inputs(4, 1, 12)
    with torch.no_grad():
        targets = model(x).argmax(1)
    ctx = context(model, x, targets)
    samples, radius, seed = 4, 0.1, 3
    deltas = perturbations(x, samples, radius, seed).numpy().reshape(samples, -1)

    def replay():
        steps = iter(deltas)
        return lambda arr, **_: arr + next(steps)[None]

    common = {"nr_samples": samples, "abs": False, "normalise": False, "disable_warnings": True}
    for ours, theirs in (
        (MaxSensitivity(), quantus.MaxSensitivity(perturb_func=replay(), **common)),
        (LocalLipschitz(), quantus.LocalLipschitzEstimate(perturb_func=replay(), **common)),
    ):
        values = ours.compute(ctx, samples=samples, radius=radius, seed=seed).values
        expected = theirs(**_batch(ctx), explain_func=_explain)
        np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_emprt_equals_quantus(quantus):
    """Quantus's EfficientMPRT with the Shannon entropy of |map| as its complexity (its default
    is a histogram entropy whose bins depend on the batch) re-draws each layer after
    ``torch.manual_seed(seed + 1)``: ours with ``seed=43`` is its ``seed=42``, weight for
    weight. (Quantus passes x=None to the complexity of the randomised maps, hence the
    wrapper.)"""
    from quantus.functions.complexity_func import entropy

    model, x = tiny_cnn(), inputs(4, 1, 12)
    with torch.no_grad():
        targets = model(x).argmax(1)
    ctx = context(model, x, targets)
    values = EfficientMPRT().compute(ctx, seed=43).values
    theirs = quantus.EfficientMPRT(
        seed=42, layer_order="bottom_up", complexity_func=lambda a, x, **_: entropy(a=a, x=a),
        abs=True, normalise=False, disable_warnings=True,
    )(**{**_batch(ctx), "a_batch": None}, explain_func=_explain)  # fmt: skip
    np.testing.assert_allclose(values.numpy(), theirs, rtol=1e-5, atol=1e-7)
    assert not np.allclose(theirs, 0)  # the randomised maps changed


def test_road_and_sensitivity_run_on_volumes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        nn.Linear(2, 3),
    ).eval()  # fmt: skip
    x = torch.rand(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    ctx = context(model, x, torch.tensor([0, 2]))
    road = Road().compute(ctx, percentages=[25, 75])
    assert road.details["morf_curves"].shape == (2, 2)
    assert bool(((road.values >= -1) & (road.values <= 1)).all())
    assert bool(MaxSensitivity().compute(ctx, samples=2).values.isfinite().all())
