"""Input-gradient attribution methods, as one xai-core plugin (docs/methods/gradients.md).

For a target score ``S`` (a logit) of an input ``x`` with channels ``c``::

    saliency              M = max_c |dS/dx_c|                     (Simonyan et al. 2014)
    gradient-x-input      M = sum_c x_c dS/dx_c                    (Shrikumar et al. 2016)
    integrated-gradients  M = sum_c (x_c - b_c) sum_i w_i dS/dx_c (b + a_i (x - b))
                                                                   (Sundararajan et al. 2017)
    smoothgrad            M = mean_s  m(x + e_s),  e_s ~ N(0, sigma^2)  (Smilkov et al. 2017)
    vargrad               M = var_s   m(x + e_s)                    (Adebayo et al. 2018)

with ``(a_i, w_i)`` the nodes and weights of a quadrature rule on [0, 1] and ``m`` any installed
local method. Gradients are taken with respect to the input only, so every adapter whose
``forward`` torch autograd can differentiate (capability ``gradients``) gets these methods.
Several targets share one forward pass, each with one backward pass through the retained graph
(:func:`xai_core.torch.ops.target_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import torch

import xai_core
from xai_core import Attribution, Capability, Scope, Tags, Targets
from xai_core.core.adapters import ModelAdapter
from xai_core.core.api import run_explainer, runnable
from xai_core.core.errors import OptionError, TargetError
from xai_core.core.options import PositiveInt, Range
from xai_core.core.progress import ProgressFn
from xai_core.core.targets import ResolvedTargets
from xai_core.torch.ops import BlurSigma, gaussian_blur, target_gradients

__version__ = "0.1.0"
__all__ = [
    "GradientXInput",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "VarGrad",
    "noisy_copies",
    "quadrature",
]

GRADIENT_TAGS = Tags("local", "model-specific", requires={Capability.GRADIENTS})
Rule = Literal[
    "riemann-left", "riemann-right", "riemann-middle", "riemann-trapezoid", "gauss-legendre"
]


def _each_target(points: torch.Tensor, chosen: torch.Tensor) -> Iterator[torch.Tensor]:
    """``d chosen[:, k] / d points`` for each target ``k`` in turn; zeros where the scores do not
    depend on the input."""
    for (g,) in target_gradients(chosen, [points]):
        yield torch.zeros_like(points) if g is None else g


def input_gradients(
    model: ModelAdapter,
    points: torch.Tensor,
    resolved: ResolvedTargets,
    rows: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Lazily, target by target, ``dS_k / d points`` (``(B, C, *s)`` each); ``rows[b]`` names
    the sample whose targets row ``b`` explains (default: row ``b``'s own)."""
    points = points.detach().requires_grad_(True)
    return _each_target(points, resolved.select(model.forward(points), rows))


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise OptionError(f"progress must be a callable(done, total, what); got {progress!r}.")


def first_pass(
    model: ModelAdapter, inputs: torch.Tensor, targets: Targets
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The unperturbed forward pass (targets resolved there) and each target's input gradient."""
    points = inputs.detach().requires_grad_(True)
    scores = model.forward(points)
    chosen = targets.resolve(scores).select(scores)
    return scores.detach(), _each_target(points, chosen)


class Saliency:
    """``max_c |dS/dx_c|``: how much a small change of each pixel moves the score."""

    name = "saliency"
    tags = GRADIENT_TAGS

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        reduce: Literal["max", "mean", "sum"] = "max",
    ) -> Attribution:
        """:param reduce: how the channels' absolute gradients become one map: ``"max"``
        (Simonyan et al.), ``"mean"`` or ``"sum"``."""
        scores, grads = first_pass(model, inputs, targets)
        reduction = {"max": torch.amax, "mean": torch.mean, "sum": torch.sum}[reduce]
        maps = torch.stack([reduction(g.abs(), dim=1) for g in grads], dim=1)
        return Attribution(maps=maps, scores=scores, details={"reduce": reduce})


class GradientXInput:
    """``sum_c x_c dS/dx_c``: signed, positive where a pixel's value raises the score."""

    name = "gradient-x-input"
    tags = GRADIENT_TAGS

    def explain(self, model: ModelAdapter, inputs: torch.Tensor, targets: Targets) -> Attribution:
        scores, grads = first_pass(model, inputs, targets)
        maps = torch.stack([(inputs.detach() * g).sum(dim=1) for g in grads], dim=1)
        return Attribution(maps=maps, scores=scores)


def quadrature(
    rule: str, steps: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``a_i`` in [0, 1] and weights ``w_i`` (summing to 1) of ``rule`` with ``steps``
    points, float64: Riemann sums as Captum places them, or Gauss-Legendre (exact for
    polynomials of degree ``2 steps - 1``), its nodes the eigenvalues of the Jacobi matrix
    (Golub-Welsch), so no NumPy."""
    if rule == "gauss-legendre":
        k = torch.arange(1, steps, dtype=torch.float64)
        beta = k / torch.sqrt(4 * k * k - 1)
        jacobi = torch.diag(beta, 1) + torch.diag(beta, -1)
        nodes, vectors = torch.linalg.eigh(jacobi)
        alphas, weights = (nodes + 1) / 2, vectors[0] ** 2  # 2 v0^2 on [-1, 1], halved
    else:
        weights = torch.full((steps,), 1 / steps, dtype=torch.float64)
        if rule == "riemann-trapezoid":
            if steps < 2:
                raise OptionError("The trapezoid rule needs steps >= 2 (both ends of the path).")
            alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
            weights = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
            weights[0] = weights[-1] = 0.5 / (steps - 1)
        else:
            offset = {"riemann-left": 0.0, "riemann-right": 1.0, "riemann-middle": 0.5}[rule]
            alphas = (torch.arange(steps, dtype=torch.float64) + offset) / steps
    return alphas.to(device), weights.to(device)


def baseline_of(inputs: torch.Tensor, baseline: str | float, blur_sigma: float) -> torch.Tensor:
    """The path's start: zeros, the inputs blurred, each sample's channel means, or a constant."""
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "blur":
        return gaussian_blur(inputs, [blur_sigma] * (inputs.ndim - 2))
    if baseline == "mean":
        return inputs.mean(dim=tuple(range(2, inputs.ndim)), keepdim=True).expand_as(inputs)
    return torch.full_like(inputs, float(baseline))


class IntegratedGradients:
    """``(x - b) * integral_0^1 dS/dx (b + a (x - b)) da``, summed over channels; the path
    points of all samples go through the model ``chunk`` at a time."""

    name = "integrated-gradients"
    tags = GRADIENT_TAGS

    @staticmethod
    def forward_images(shape: tuple[int, ...], options: Mapping[str, object]) -> int:
        """Images a batch of ``shape`` forwards (the cost estimate of ``xai compare``): the path
        points, the input and the baseline (each path point also goes backward)."""
        steps = options.get("steps", 32)
        return shape[0] * (int(steps) + 2)  # type: ignore[call-overload]

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        steps: PositiveInt = 32,
        rule: Rule = "gauss-legendre",
        baseline: Literal["zero", "blur", "mean"] | float = "zero",
        blur_sigma: BlurSigma = 5.0,
        chunk: PositiveInt = 64,
        progress: ProgressFn | None = None,
    ) -> Attribution:
        """:param steps: points on the straight path from the baseline to the input.
        :param rule: the quadrature rule: ``"gauss-legendre"`` (Captum's default) or a Riemann
            sum, ``"riemann-left"``, ``"-right"``, ``"-middle"``, ``"-trapezoid"``.
        :param baseline: ``"zero"``, ``"blur"`` (the input blurred by ``blur_sigma`` px),
            ``"mean"`` (each sample's channel means) or a constant value.
        :param blur_sigma: the blur baseline's sigma along every axis, in px.
        :param chunk: path points (samples x steps) per forward pass: bounds the memory.
        :param progress: ``progress(done, total, "path points")`` after every chunk.
        """
        _check_progress(progress)
        if isinstance(baseline, str) and baseline not in ("zero", "blur", "mean"):
            raise OptionError(
                f"baseline must be 'zero', 'blur', 'mean' or a number; got {baseline!r}."
            )
        x = inputs.detach()
        n = x.shape[0]
        start = baseline_of(x, baseline, blur_sigma)
        with torch.no_grad():  # the input and the baseline in one forward pass
            scores, base = model.forward(torch.cat([x, start])).split(n)
            resolved = targets.resolve(scores)
            base_scores = resolved.select(base)  # (N, K), for completeness
        alphas, weights = quadrature(rule, steps, x.device)
        alphas, weights = alphas.to(x.dtype), weights.to(x.dtype)
        delta = x - start
        total = x.new_zeros(resolved.count, *x.shape)  # (K, N, C, *s): the weighted gradients
        shape = (-1, *[1] * (x.ndim - 1))
        for first in range(0, steps * n, chunk):  # row r: step r // n of sample r % n
            last = min(first + chunk, steps * n)
            rows = torch.arange(first, last, device=x.device)
            step, sample = rows // n, rows % n
            points = start[sample] + alphas[step].view(shape) * delta[sample]
            grads = input_gradients(model, points, resolved, sample)
            for k, g in enumerate(grads):
                total[k].index_add_(0, sample, g * weights[step].view(shape))
            if progress is not None:
                progress(last, steps * n, "path points")
        attributions = delta * total  # (K, N, C, *s)
        maps = attributions.sum(dim=2).transpose(0, 1)  # (N, K, *s)
        with torch.no_grad():
            gap = attributions.flatten(2).sum(-1).T - (resolved.select(scores) - base_scores)
        details = {
            "steps": steps,
            "rule": rule,
            "baseline": baseline,
            # sum of attributions - (S(x) - S(baseline)) per sample and target: 0 for an exact
            # integral (completeness); shrinks as steps grow.
            "completeness_gap": gap.tolist(),
        }
        return Attribution(maps=maps, scores=scores, details=details)


def noisy_copies(
    inputs: torch.Tensor, samples: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples * N, C, *s)`` noisy copies (row ``s * N + n`` is draw ``s`` of sample ``n``)
    and each sample's noise sigma ``(N,)``: ``noise`` times the sample's value range.

    The draws come from a ``torch.Generator`` seeded with ``seed`` (never the global RNG) and
    are one noise field per draw, shared by every sample of the batch and scaled by its sigma:
    a sample's map is the same alone as in any batch.
    """
    n = inputs.shape[0]
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    field = torch.randn(
        samples, 1, *inputs.shape[1:], generator=generator, device=inputs.device
    ).to(inputs.dtype)
    flat = inputs.detach().flatten(1)
    sigma = noise * (flat.amax(1) - flat.amin(1))
    shape = (1, n, *[1] * (inputs.ndim - 1))
    copies = inputs.detach().unsqueeze(0) + field * sigma.view(shape)
    return copies.flatten(0, 1), sigma


NoiseLevel = Annotated[float, Range(0, 10, min_inclusive=False)]


class _NoiseTunnel:
    """Any local method's maps averaged over noisy copies of the input (``statistic``)."""

    # What it needs is what `local` needs, checked by `runnable` when it runs (like `aggregate`).
    tags = Tags("local", "model-agnostic")

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        local: str = "saliency",
        local_options: dict[str, Any] | None = None,
        samples: PositiveInt = 16,
        noise: NoiseLevel = 0.15,
        seed: int = 0,
        chunk: PositiveInt = 64,
        progress: ProgressFn | None = None,
    ) -> Attribution:
        """:param local: the local method to smooth (any installed one).
        :param local_options: its options, e.g. ``{"reduce": "mean"}``.
        :param samples: noisy copies per sample.
        :param noise: the noise's standard deviation as a fraction of each sample's value range
            (max - min); Smilkov et al. found 0.1-0.2 best.
        :param seed: seeds the noise's own generator; the same seed gives the same maps.
        :param chunk: noisy copies per call of the local method: bounds the memory.
        :param progress: ``progress(done, total, "noisy copies")`` after every chunk.
        """
        _check_progress(progress)
        if local_options is not None and not isinstance(local_options, dict):
            raise OptionError(f"local_options must be a dict; got {type(local_options).__name__}.")
        options = dict(local_options or {})
        if local in (SmoothGrad.name, VarGrad.name):
            raise OptionError(f"{self.name} cannot wrap {local!r}; choose a local method.")
        info, _ = runnable(
            local, model, scope=Scope.LOCAL, wrong_scope="smooth a local one.", options=options
        )
        with torch.no_grad():
            scores = model.forward(inputs)
        classes = targets.resolve(scores).indices
        if classes is None or targets.region is not None:
            raise TargetError(
                f"{self.name} passes class indices to {local!r} for every noisy copy: targets "
                f"must be None, an int, one per sample, (N, K) or 'all', not a callable or Region."
            )
        n = inputs.shape[0]
        copies, sigma = noisy_copies(inputs, samples, noise, seed)
        spec = classes.repeat(samples, 1)  # row s * N + n explains sample n's classes
        parts: list[list[torch.Tensor]] = []
        layers: list[str] = []
        for first in range(0, copies.shape[0], chunk):
            exp = run_explainer(
                info, model, copies[first : first + chunk], spec[first : first + chunk], options
            )
            parts.append(list(exp.raw))
            layers = exp.layers
            if progress is not None:
                progress(min(first + chunk, copies.shape[0]), copies.shape[0], "noisy copies")
        maps = []
        for per_layer in zip(*parts, strict=True):
            draws = torch.cat(per_layer).unflatten(0, (samples, n))  # (S, N, K, *grid)
            maps.append(self.combine(draws))
        details = {"local": local, "samples": samples, "noise": noise, "seed": seed}
        details["sigma"] = sigma.tolist()
        return Attribution(
            maps=maps if layers else maps[0], scores=scores, layers=layers, details=details
        )

    @staticmethod
    def combine(draws: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SmoothGrad(_NoiseTunnel):
    """``mean_s m(x + e_s)``: a local method's maps averaged over noisy copies."""

    name = "smoothgrad"

    @staticmethod
    def combine(draws: torch.Tensor) -> torch.Tensor:
        return draws.mean(dim=0)


class VarGrad(_NoiseTunnel):
    """``var_s m(x + e_s)``: the variance (population, as Captum) of a local method's maps over
    noisy copies."""

    name = "vargrad"

    @staticmethod
    def combine(draws: torch.Tensor) -> torch.Tensor:
        return draws.var(dim=0, correction=0)


@xai_core.hookimpl
def register_explainers(register):
    for cls in (Saliency, GradientXInput, IntegratedGradients, SmoothGrad, VarGrad):
        register(cls)
