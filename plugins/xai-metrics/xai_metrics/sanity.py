"""Sanity checks that re-explain: model-parameter randomisation and stability under augmentation.

Cascading randomisation (Adebayo et al., *Sanity Checks for Saliency Maps*, NeurIPS 2018): on a
copy of the model (``ParameterRandomization``: for PyTorch a deep copy, each layer re-drawn by
its ``reset_parameters``), the parameterised layers are re-initialised one at a time from the
output down; after each chosen cascade point ``s`` the batch is explained again and compared with
the original map::

    value = mean over s of |spearman(map, map_s)|      lower is better: a method that depends on
                                                       the weights loses its map as they go

Stability: explain an augmented input ``T(x)``, carry the map back to the original frame
(``T^-1``) and compare with the original map over the pixels both frames see::

    value = mean over T of spearman(map, T^-1(explain(T(x))))          higher is better

Spearman's rank correlation (ties averaged) is computed in torch on the model's device; SSIM
(scikit-image) on the host, on min-max normalised maps, is reported in ``details``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from xai_core.core.adapters import ParameterRandomization
from xai_core.core.errors import CapabilityError, ModelError, OptionError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_core.core.progress import ProgressFn
from xai_metrics.common import choice, finite_float, integer, single_maps, spearman, ssim

AUGMENTATIONS = ("hflip", "rotate", "intensity")


# -- randomisation ---------------------------------------------------------------------------


def cascade_points(layers: int, stages: int | None) -> list[int]:
    """How many top layers are random at each comparison: every layer, or ``stages`` evenly
    spaced points from the output layer alone to all layers."""
    if stages is None or stages >= layers:
        return list(range(1, layers + 1))
    if stages == 1:
        return [layers]
    return sorted({round(1 + i * (layers - 1) / (stages - 1)) for i in range(stages)})


class Randomization:
    """Cascading model-parameter randomisation: similarity of each map to the original."""

    name = "randomization"
    direction = Direction.LOWER
    needs = frozenset({Need.TORCH_MODEL})
    range = (0.0, 1.0)  # a mean of |Spearman|

    @staticmethod
    def work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
        """(images forwarded, re-explanations) for a batch of ``shape``: the cost estimate
        (``stages=None``, every layer, is counted as 20)."""
        stages = options.get("stages", 10)
        return shape[0], 20 if stages is None else int(stages)

    def compute(
        self,
        context: MetricContext,
        *,
        stages: int | None = 10,
        seed: int = 0,
        absolute: bool = False,
        progress: ProgressFn | None = None,
    ) -> MetricResult:
        """:param stages: at most this many cascade points, evenly spaced from the output layer
            alone to every layer (each point re-explains the batch); ``None``: every layer.
        :param seed: seed of the re-initialisation (the caller's random state is left as it was).
        :param absolute: compare absolute values of the maps (Adebayo et al. show both).
        :param progress: ``progress(done, total, "randomised stages")`` after each cascade
            point (:mod:`xai_core.core.progress`); supplied by the caller, e.g. ``compare()``.
        """
        if stages is not None:
            stages = integer(stages, "stages")
        seed = integer(seed, "seed", minimum=0)
        if not isinstance(context.model, ParameterRandomization):
            raise CapabilityError(
                "randomization needs a model it can copy and re-initialise (a PyTorch model, or "
                "an adapter implementing xai_core.core.adapters.ParameterRandomization)."
            )
        shown = (lambda m: m.abs()) if absolute else (lambda m: m)
        original = shown(single_maps(context)).flatten(1)

        randomised = context.model.randomizable_copy()  # the user's model is never touched
        order = randomised.parameter_layers(context.inputs[:1])  # the output side first
        if not order:
            raise ModelError("The model has no parameterised layer that runs on these inputs.")
        points = cascade_points(len(order), stages)
        rho, sim = [], []
        device = context.inputs.device
        if progress is not None:
            progress(0, len(points), "randomised stages")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            done = 0
            for point in points:
                randomised.randomize_layers(order[done:point])
                done = point
                maps = shown(single_maps(context, context.rerun(model=randomised).maps))
                rho.append(spearman(original, maps.flatten(1)))
                sim.append(ssim(original.view_as(maps), maps))
                if progress is not None:
                    progress(len(rho), len(points), "randomised stages")
        rho_t, sim_t = torch.stack(rho), torch.stack(sim)  # (stages, N)
        # |rho|: a map that inverted (rho = -0.8) kept its structure as much as one that stayed
        # (rho = 0.8); only a map with no rank correlation left "changed with the model".
        magnitude = rho_t.abs()
        return MetricResult(
            magnitude.mean(dim=0),
            {
                "layers": list(order),  # output side first
                "stages": points,  # top layers random at each point
                "stage_layers": [order[p - 1] for p in points],  # deepest random layer
                "spearman": rho_t.nanmean(dim=1).tolist(),
                "abs_spearman": magnitude.nanmean(dim=1).tolist(),
                # the sanity check of compare()'s verdict: |rho| with every chosen layer random
                "abs_spearman_deepest": magnitude[-1].cpu(),
                "ssim": sim_t.nanmean(dim=1).tolist(),
                "spearman_per_sample": rho_t.cpu(),
                "ssim_per_sample": sim_t.cpu(),
            },
        )


# -- stability -------------------------------------------------------------------------------


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """``(N, C, *spatial)`` rotated in the plane of the last two axes about the centre
    (bilinear, zeros outside); in 3D every slice along the first spatial axis turns alike.

    ``affine_grid`` works in coordinates normalised per axis, where a rotation in pixels is
    ``S^-1 R S`` with ``S = diag(W, H) / 2``: without it a non-square image would shear.
    """
    h, w = x.shape[-2:]
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    rank = x.ndim - 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    theta = torch.eye(rank, rank + 1, dtype=dtype)  # grid axes are (W, H[, D])
    theta[:2, :2] = torch.tensor([[c, -s * h / w], [s * w / h, c]], dtype=dtype)
    grid = F.affine_grid(
        theta.to(x.device).expand(x.shape[0], -1, -1), list(x.shape), align_corners=False
    ).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


Transform = Callable[[torch.Tensor], torch.Tensor]


def augmentation(
    name: str, inputs: torch.Tensor, angle: float, brightness: float, contrast: float
) -> tuple[torch.Tensor, Transform, torch.Tensor]:
    """The augmented batch, the map transform back to the original frame, and the valid pixels.

    ``intensity`` scales the contrast about each sample's mean and shifts by ``brightness``
    standard deviations: inputs are normalised, so an absolute shift would mean nothing.
    """
    spatial = inputs.shape[2:]
    everywhere = torch.ones(spatial, dtype=torch.bool, device=inputs.device)
    if name == "hflip":
        flip = lambda t: t.flip(-1)  # noqa: E731
        return flip(inputs), flip, everywhere
    if name == "rotate":
        ones = inputs.new_ones((1, 1, *spatial))
        valid = rotate(rotate(ones, angle), -angle)[0, 0] > 0.999  # seen by both frames
        back = lambda m: rotate(m.unsqueeze(1), -angle).squeeze(1)  # noqa: E731
        return rotate(inputs, angle), back, valid
    axes = tuple(range(1, inputs.ndim))
    mean, std = inputs.mean(dim=axes, keepdim=True), inputs.std(dim=axes, keepdim=True)
    changed = mean + contrast * (inputs - mean) + brightness * std
    return changed, (lambda m: m), everywhere


class Stability:
    """Similarity of the map of an augmented input, carried back, to the original map."""

    name = "stability"
    direction = Direction.HIGHER
    needs: frozenset[Need] = frozenset()
    range = (-1.0, 1.0)  # a mean of rank correlations

    @staticmethod
    def work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
        """(images forwarded, re-explanations) for a batch of ``shape``: the cost estimate."""
        augmentations = options.get("augmentations", AUGMENTATIONS)
        return 0, 1 if isinstance(augmentations, str) else len(augmentations)

    def compute(
        self,
        context: MetricContext,
        *,
        augmentations: Sequence[str] = AUGMENTATIONS,
        angle: float = 10.0,
        brightness: float = 0.1,
        contrast: float = 1.1,
        progress: ProgressFn | None = None,
    ) -> MetricResult:
        """:param augmentations: any of ``hflip`` (last axis), ``rotate`` (in the plane of the
            last two axes) and ``intensity`` (brightness and contrast).
        :param angle: rotation in degrees.
        :param brightness: shift in standard deviations of each sample.
        :param contrast: factor about each sample's mean.
        :param progress: ``progress(done, total, "augmentations")`` before each re-explanation
            and at the end (:mod:`xai_core.core.progress`); supplied by the caller.
        """
        if isinstance(augmentations, str):
            augmentations = [augmentations]
        names = [choice(a, "augmentation", AUGMENTATIONS) for a in augmentations]
        if not names:
            raise OptionError(f"augmentations must name at least one of {AUGMENTATIONS}.")
        angle = finite_float(angle, "angle")
        brightness = finite_float(brightness, "brightness")
        contrast = finite_float(contrast, "contrast", minimum=0)
        original = single_maps(context)

        details: dict[str, dict[str, object]] = {}
        rho = []
        for done, name in enumerate(names):
            if progress is not None:
                progress(done, len(names), "augmentations")
            x, back, valid = augmentation(name, context.inputs, angle, brightness, contrast)
            maps = back(single_maps(context, context.rerun(inputs=x).maps))
            r = spearman(original[:, valid], maps[:, valid])
            s = ssim(original, maps, valid)
            rho.append(r)
            details[name] = {
                "spearman": float(r.nanmean()),
                "ssim": float(s.nanmean()),
                "spearman_per_sample": r.cpu(),
                "ssim_per_sample": s.cpu(),
                "valid_fraction": float(valid.float().mean()),
            }
        if progress is not None:
            progress(len(names), len(names), "augmentations")
        return MetricResult(torch.stack(rho).mean(dim=0), details)
