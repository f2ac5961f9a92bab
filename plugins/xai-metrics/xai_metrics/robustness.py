"""How much a map moves when the input moves a little: max-sensitivity and the local Lipschitz
estimate.

Both draw ``samples`` seeded perturbations ``delta_s``, uniform in the L-infinity ball of radius
``radius`` (every channel and pixel independently in ``[-radius, radius]``), explain every
perturbed copy ``x + delta_s`` of the batch again (``context.rerun`` on batches of
``N * samples`` copies, ``context.chunk_size`` at a time, the same targets) and keep the largest
ratio over the samples:

Max-sensitivity (Yeh, Hsieh, Suggala, Inouye and Ravikumar, *On the (In)fidelity and
Sensitivity of Explanations*, NeurIPS 2019)::

    value = max_s ||e(x) - e(x + delta_s)||_F / ||e(x)||_F              lower is better

Local Lipschitz estimate (Alvarez-Melis and Jaakkola, *On the Robustness of Interpretability
Methods*, ICML WHI 2018)::

    value = max_s ||e(x) - e(x + delta_s)||_2 / ||delta_s||_2            lower is better

``e`` is the map on the input grid (one per sample, flattened). The perturbations are the same
for every sample of the batch, so a sample's value does not depend on the batch; they are drawn
on the host from ``seed`` (the same on every device) and the caller's random state is untouched.
Max-sensitivity is NaN for an all-zero map (no norm to compare with).
"""

from __future__ import annotations

import math

import torch

from xai_core.core.errors import OptionError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_core.core.progress import ProgressFn
from xai_metrics.common import exact_float, finite_float, integer, single_maps


def perturbations(inputs: torch.Tensor, samples: int, radius: float, seed: int) -> torch.Tensor:
    """``(samples, C, *spatial)`` uniform in ``[-radius, radius]``, seeded, on the inputs'
    device and dtype."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((samples, *inputs.shape[1:]), generator=g, dtype=torch.float64)
    return ((2 * u - 1) * radius).to(inputs.device, inputs.dtype)


def perturbed_maps(
    context: MetricContext,
    samples: int,
    radius: float,
    seed: int,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The perturbations and the maps ``(N, samples, P)`` of every sample plus every
    perturbation, explained again in batches of about ``context.chunk_size`` copies (row
    ``i * samples + s`` of a flat batch).

    Kept in ``context.measurements`` for the context's explanation: max-sensitivity and the
    Lipschitz estimate with the same ``samples``, ``radius`` and ``seed`` (as in ``compare()``,
    which gives each method one context) explain the perturbed copies once between them.
    """
    cache = context.measurements.setdefault("perturbed_maps", {})
    key = (id(context.explanation), samples, radius, seed)
    if key not in cache:
        deltas = perturbations(context.inputs, samples, radius, seed)
        cache[key] = deltas, _explain_perturbed(context, deltas, progress)
    return cache[key]


def _explain_perturbed(
    context: MetricContext, deltas: torch.Tensor, progress: ProgressFn | None
) -> torch.Tensor:
    inputs, targets = context.inputs, context.targets
    n, samples = inputs.shape[0], deltas.shape[0]
    total = n * samples
    flat = torch.arange(total, device=inputs.device)
    parts = []
    for start in range(0, total, context.chunk_size):
        j = flat[start : start + context.chunk_size]
        rows, s = j // samples, j % samples
        x = inputs.index_select(0, rows) + deltas.index_select(0, s)
        explained = context.rerun(inputs=x, targets=targets.index_select(0, rows))
        parts.append(single_maps(context, explained.maps, rows=len(j)))
        if progress is not None:
            progress(min(start + len(j), total), total, "perturbed explanations")
    return torch.cat(parts).flatten(1).view(n, samples, -1)


def _options(samples: object, radius: object, seed: object) -> tuple[int, float, int]:
    samples = integer(samples, "samples")
    radius = finite_float(radius, "radius", minimum=0)
    if radius == 0:
        raise OptionError(f"radius must be > 0 (the perturbation's L-inf ball); got {radius!r}.")
    return samples, radius, integer(seed, "seed", minimum=0)


def _work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
    """(images forwarded, re-explanations) for a batch of ``shape``: the cost estimate."""
    return 0, int(options.get("samples", 10))


class MaxSensitivity:
    """Largest relative change of the map under small uniform input noise (Yeh et al. 2019)."""

    name = "max_sensitivity"
    direction = Direction.LOWER
    needs: frozenset[Need] = frozenset()
    range = (0.0, math.inf)

    work = staticmethod(_work)

    def compute(
        self,
        context: MetricContext,
        *,
        samples: int = 10,
        radius: float = 0.2,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> MetricResult:
        """:param samples: perturbations per sample (Quantus's default is 200; each is one
            re-explanation of the batch).
        :param radius: half-width of the uniform noise, in the inputs' units (Quantus: 0.2).
        :param seed: seed of the perturbations.
        :param progress: ``progress(done, total, "perturbed explanations")`` after each chunk.
        """
        samples, radius, seed = _options(samples, radius, seed)
        original = single_maps(context).flatten(1)
        _, moved = perturbed_maps(context, samples, radius, seed, progress)
        dtype = exact_float(original.device)
        a = original.to(dtype)
        change = (a.unsqueeze(1) - moved.to(dtype)).norm(dim=2)  # (N, samples)
        norm = a.norm(dim=1, keepdim=True)
        ratio = change / norm.clamp_min(torch.finfo(dtype).tiny)
        values = torch.where(norm[:, 0] > 0, ratio.amax(dim=1), math.nan)
        return MetricResult(
            values, {"per_perturbation": ratio.cpu(), "radius": radius, "samples": samples}
        )


class LocalLipschitz:
    """Largest ratio of the map's change to the input's change under small uniform noise
    (Alvarez-Melis and Jaakkola 2018)."""

    name = "local_lipschitz"
    direction = Direction.LOWER
    needs: frozenset[Need] = frozenset()
    range = (0.0, math.inf)

    work = staticmethod(_work)

    def compute(
        self,
        context: MetricContext,
        *,
        samples: int = 10,
        radius: float = 0.2,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> MetricResult:
        """:param samples: perturbations per sample (each is one re-explanation of the batch).
        :param radius: half-width of the uniform noise, in the inputs' units.
        :param seed: seed of the perturbations.
        :param progress: ``progress(done, total, "perturbed explanations")`` after each chunk.
        """
        samples, radius, seed = _options(samples, radius, seed)
        original = single_maps(context).flatten(1)
        deltas, moved = perturbed_maps(context, samples, radius, seed, progress)
        dtype = exact_float(original.device)
        change = (original.to(dtype).unsqueeze(1) - moved.to(dtype)).norm(dim=2)  # (N, samples)
        step = deltas.flatten(1).to(dtype).norm(dim=1)  # (samples,), > 0 almost surely
        ratio = change / step.clamp_min(torch.finfo(dtype).tiny)
        return MetricResult(
            ratio.amax(dim=1),
            {"per_perturbation": ratio.cpu(), "radius": radius, "samples": samples},
        )
