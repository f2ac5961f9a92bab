"""ROAD: remove and debias, with noisy linear imputation (Rong, Leemann, Borisov, Kasneci and
Kasneci, *A Consistent and Efficient Evaluation Strategy for Attribution Methods*, ICML 2022).

For each removal percentage ``p`` the ``floor(P p / 100)`` pixels of the ``P`` with the highest
(MoRF: most relevant first) or the lowest (LeRF: least relevant first) attribution are removed
and replaced, in every channel, by a **noisy linear imputation**: each removed pixel becomes the
weighted mean of its 8 neighbours (weight 1/6 for the 4 direct ones, 1/12 for the diagonals, the
weights of neighbours outside the image dropped), removed neighbours included, plus noise::

    S_i v_i - sum_{j removed} w_ij v_j = sum_{j kept} w_ij x_j        for each removed pixel i
    x_p = v + sigma * eps on the removed pixels, x elsewhere           (eps ~ N(0, 1), seeded)

with ``S_i`` the sum of pixel ``i``'s in-image neighbour weights. The system is symmetric and
positive definite (``S`` dominates ``W``; every removed region touches a kept pixel), and is
solved by preconditioned conjugate gradients (preconditioner ``S``, started from a pull-push
fill), whose matrix product is a separable 3x3 neighbour sum over a whole chunk of images at
once, on the model's device, to a relative residual of ``tol``: no sparse matrix is built and
no pixel is looped over. The tests compare it with the exact sparse
solve (scipy) and with Quantus's ``noisy_linear_imputation``.

Each imputed image is scored by the target's probability (or ``kind="accuracy"``: 1 when the
target is still the top class, Rong et al.'s and Quantus's measure) and the curves are averaged
over the percentages::

    morf = mean_p s(x_p^MoRF)   (lower is better)      lerf = mean_p s(x_p^LeRF)   (higher)
    value = lerf - morf                                                   higher is better

The value is the gap Rong et al. read both curves for (a faithful map loses the class fast
when its top pixels go and slowly when its bottom pixels go); both means and both curves are in
``details``. Volumes work alike with the 26 neighbours of a voxel, weighted by the same
binomial kernel (faces 4/56, edges 2/56, corners 1/56; see :func:`neighbour_sum`): the paper
defines only the 2D weights, which this reproduces exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xai_core.core.errors import OptionError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_core.core.progress import ProgressFn
from xai_core.torch.ops import evaluate_in_chunks
from xai_metrics.common import choice, exact_float, finite_float, integer, score_kind, single_maps
from xai_metrics.perturbation import pixel_ranks

# Rong et al.'s neighbour weights (their code and Quantus's): 1/6 direct, 1/12 diagonal.
NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
PERCENTAGES = tuple(range(5, 100, 10))  # 5, 15, ..., 95 (Quantus: 1, 3, ..., 99)


def neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each pixel's neighbours in ``(B, 1, *spatial)``, zero outside the
    image: the binomial kernel ``[1 2 1]`` along every spatial axis without its centre,
    normalised to 1 (in 2D Rong et al.'s 1/6 and 1/12; in 3D 4/56 for the 6 faces, 2/56 for the
    12 edges, 1/56 for the 8 corners). Separable: two shifted adds per axis instead of a
    float64 convolution, which is many times slower on CPUs."""
    rank = t.ndim - 2
    out = F.pad(t, (1, 1) * rank)
    for axis in range(2, t.ndim):
        size = t.shape[axis]
        out = out.narrow(axis, 0, size) + 2 * out.narrow(axis, 1, size) + out.narrow(axis, 2, size)
    centre = 2**rank
    return (out - centre * t) / (4**rank - centre)


def coarse_fill(z: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``z`` ``(B, 1, *spatial)`` with each removed pixel set to the mean of the kept pixels in
    the smallest power-of-two cell around it that has any (a pull-push pyramid): a starting
    point that already bridges large holes, so conjugate gradients need far fewer iterations."""
    pool = F.avg_pool2d if z.ndim == 4 else F.avg_pool3d
    levels = [(kept * z, kept)]
    while min(levels[-1][1].shape[2:]) > 1:
        total, weight = levels[-1]
        levels.append((pool(total, 2, ceil_mode=True), pool(weight, 2, ceil_mode=True)))
    total, weight = levels[-1]
    estimate = total / weight.clamp_min(torch.finfo(z.dtype).tiny)
    for total, weight in reversed(levels[:-1]):
        up = F.interpolate(estimate, size=total.shape[2:], mode="nearest")
        estimate = torch.where(weight > 0, total / weight.clamp_min(torch.finfo(z.dtype).tiny), up)
    return estimate


def linear_imputation(
    x: torch.Tensor, removed: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 2000
) -> torch.Tensor:
    """``x`` ``(B, C, *spatial)`` (2D or 3D) with the ``removed`` pixels ``(B, *spatial)``
    (every channel) replaced by the solution of the linear system above, without noise.

    Batched preconditioned conjugate gradients; every image and channel is one row of the batch,
    iterated until each row's residual is below ``tol`` times its right-hand side (or
    ``max_iter``: a removed region with no kept pixel in reach keeps converging towards 0). In
    the inputs' precision (at least float32): float32 halves the time, and the default ``tol``
    is well within its reach; float64 inputs get a float64 solve.
    """
    b, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    dtype = torch.promote_types(x.dtype, torch.float32)  # float64 inputs: float64 solve
    z = x.to(dtype).reshape(b * c, 1, *spatial)
    m = removed.to(dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, *spatial)
    neighbours = neighbour_sum

    s = neighbours(torch.ones_like(z[:1]))  # S_i: the in-image neighbour weights
    rhs = m * neighbours((1 - m) * z)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return m * (s * v - neighbours(m * v))

    rows = (b * c,) + (1,) * (z.ndim - 1)

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u * v).flatten(1).sum(dim=1).view(rows)

    v = m * coarse_fill(z, 1 - m)
    r = rhs - matvec(v)
    s = s.clamp_min(torch.finfo(dtype).tiny)  # a 1x1 image has no neighbour
    y = m * r / s
    p = y.clone()
    ry = dot(r, y)
    goal = (tol * rhs.flatten(1).norm(dim=1)).view(rows)
    tiny = torch.finfo(dtype).tiny
    for it in range(max_iter):
        if it % 10 == 0 and bool((r.flatten(1).norm(dim=1).view(rows) <= goal).all()):
            break
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = torch.where(pap > tiny, ry / pap.clamp_min(tiny), 0.0)  # converged rows stop
        v = v + alpha * p
        r = r - alpha * ap
        y = m * r / s
        ry_next = dot(r, y)
        beta = torch.where(ry > tiny, ry_next / ry.clamp_min(tiny), 0.0)
        p = y + beta * p
        ry = ry_next
    out = torch.where(m > 0, v, z)
    return out.reshape(x.shape).to(x.dtype)


def _percentages(value: object) -> tuple[float, ...]:
    several = isinstance(value, Sequence) and not isinstance(value, str)
    items = tuple(value) if several else (value,)
    out = tuple(finite_float(v, "percentages") for v in items)
    if not out or any(not 0 <= v <= 100 for v in out):
        raise OptionError(f"percentages must be numbers in [0, 100]; got {value!r}.")
    return out


class Road:
    """LeRF minus MoRF mean score of images whose pixels are removed by noisy linear
    imputation, in the map's order (Rong et al. 2022)."""

    name = "road"
    direction = Direction.HIGHER
    needs: frozenset[Need] = frozenset()
    range = (-1.0, 1.0)  # a difference of two means of probabilities (or accuracies)

    @staticmethod
    def work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
        """(images forwarded, re-explanations) for a batch of ``shape``: the cost estimate."""
        return shape[0] * 2 * len(options.get("percentages", PERCENTAGES)), 0

    def compute(
        self,
        context: MetricContext,
        *,
        percentages: Sequence[float] = PERCENTAGES,
        noise: float = 0.01,
        kind: str = "auto",
        seed: int = 0,
        tol: float = 1e-4,
        progress: ProgressFn | None = None,
    ) -> MetricResult:
        """:param percentages: shares of the pixels removed, in percent (each a point of both
            curves; Quantus's default 1, 3, ..., 99).
        :param noise: standard deviation of the Gaussian noise added to imputed pixels, in the
            inputs' units (Rong et al. and Quantus: 0.01).
        :param kind: ``auto`` (softmax, or sigmoid for one output), ``softmax``, ``sigmoid``,
            ``accuracy`` (1 where the target is still the top class).
        :param seed: seed of the noise; the same noise pattern is used for every sample, so a
            sample's value does not depend on the batch (the caller's random state is untouched).
        :param tol: relative residual at which the imputation's conjugate gradients stop (the
            default leaves imputed values within about 1e-4 of the exact solve's on inputs of
            unit scale, well below the noise).
        :param progress: ``progress(done, total, "imputed inputs")`` after each chunk.
        """
        inputs = context.inputs
        shares = _percentages(percentages)
        noise = finite_float(noise, "noise", minimum=0)
        tol = finite_float(tol, "tol", minimum=0)
        seed = integer(seed, "seed", minimum=0)
        accuracy = choice(kind, "kind", ("auto", "softmax", "sigmoid", "accuracy")) == "accuracy"
        kind = "logit" if accuracy else score_kind(context, kind, ("auto", "softmax", "sigmoid"))
        maps = single_maps(context)
        n, spatial = inputs.shape[0], inputs.shape[2:]
        pixels = spatial.numel()
        counts = torch.tensor([math.floor(pixels * p / 100) for p in shares], device=inputs.device)
        ranks = torch.stack([pixel_ranks(maps), pixel_ranks(-maps)])  # (orders, N, P)
        g = torch.Generator().manual_seed(seed)  # on the host: the same noise on every device
        eps = torch.randn((len(shares), *inputs.shape[1:]), generator=g, dtype=torch.float64)
        eps = (noise * eps).to(inputs.device, inputs.dtype)
        k = len(shares)
        total = 2 * n * k  # row j: order j // (n k), sample (j // k) % n, percentage j % k
        curves = torch.empty(total, device=inputs.device, dtype=torch.float32)
        targets = context.targets

        def scores(j: torch.Tensor) -> torch.Tensor:
            order, rows, step = j // (n * k), (j // k) % n, j % k
            removed = (ranks[order, rows] < counts[step, None]).view(-1, *spatial)
            x = linear_imputation(inputs[rows], removed, tol=tol)
            x = torch.where(removed.unsqueeze(1), x + eps[step], x)
            if not accuracy:
                return context.score(x, rows, kind).float()
            top = context.logits(x).argmax(dim=1)
            return (top == targets.index_select(0, rows)).float()

        with torch.no_grad(), context.model.session():
            evaluate_in_chunks(
                scores, curves, context.chunk_size, progress=progress, what="imputed inputs"
            )
        curves64 = curves.view(2, n, k).to(exact_float(inputs.device))
        morf, lerf = curves64.mean(dim=2)
        return MetricResult(
            lerf - morf,
            {
                "kind": "accuracy" if accuracy else kind,
                "percentages": list(shares),
                "morf": morf.cpu(),
                "lerf": lerf.cpu(),
                "morf_curves": curves64[0].cpu(),
                "lerf_curves": curves64[1].cpu(),
            },
        )
