"""Occlusion (Zeiler & Fergus 2014) as an xai-core plugin: the drop of a score when a box is hidden.

For a box ``B_p`` at window position ``p``, an input ``x``, a baseline ``b`` and a target score
``f``::

    x_p     = b inside B_p (every channel), x elsewhere
    delta_p = f(x) - f(x_p)                          positive: the box was evidence for the class
    attr(u) = mean of delta_p over {p : u in B_p}    0 where no box covers u

This is Captum's ``Occlusion`` convention, so maps are comparable. Boxes start at 0, s, 2s, ...
along each spatial axis for as long as they fit.

Only ``model.forward`` is called, so PyTorch modules and ONNX models share one path. Perturbed
inputs are built on the model's device from box masks and evaluated ``chunk_size`` at a time,
samples and windows mixed in one batch; every target comes from the same forward passes.
A box is a product of intervals, so spreading each ``delta_p`` over its box and summing is a
product with one 0/1 matrix per axis, ``boxes[p, u] = (u in interval p)``: no loop over windows.

On a PyTorch CNN the forwards are computed incrementally (:mod:`xai_occlusion.incremental`,
option ``incremental``): only the part of each layer that a box can reach is recomputed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

import xai_core
from xai_core import Attribution, Tags, Targets
from xai_core.core.adapters import ModelAdapter
from xai_core.core.errors import OptionError, did_you_mean
from xai_core.core.options import PositiveInt
from xai_core.core.progress import ProgressFn
from xai_core.torch.ops import BlurSigma, evaluate_in_chunks, gaussian_blur
from xai_occlusion.incremental import (
    adaptive_deltas,
    approximation_settings,
    incremental_mode,
    prepare,
)
from xai_occlusion.rise import Rise

__version__ = "0.1.0"

BASELINES = ("zero", "blur", "mean")


def _per_axis(value: object, name: str, rank: int, kind: type = numbers.Integral) -> tuple:
    """``value`` (one number, or one per spatial axis) as ``rank`` positive finite numbers."""
    several = isinstance(value, Sequence) and not isinstance(value, str)
    items = list(value) if several else [value] * rank
    ok = len(items) == rank and all(
        isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in items
    )
    if not ok:
        what = "int" if kind is numbers.Integral else "number"
        raise OptionError(
            f"{name} must be a positive {what} or {rank} of them (one per spatial axis); "
            f"got {value!r}."
        )
    return tuple(int(v) if kind is numbers.Integral else float(v) for v in items)


def window_boxes(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """``(positions, size)`` boolean matrix: row ``p`` marks the interval ``[p*s, p*s + w)``.

    Positions are ``0, s, 2s, ...`` while ``start + w <= size`` (as Captum's Occlusion).
    """
    starts = torch.arange(0, size - window + 1, stride, device=device)[:, None]
    u = torch.arange(size, device=device)
    return (u >= starts) & (u < starts + window)


def along_axes(grid: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of ``grid[..., p1, p2, ...]`` times the box of ``(p1, p2, ...)``, on the input grid.

    The last ``len(boxes)`` axes of ``grid`` index window positions; axis ``i`` is multiplied by
    ``boxes[i]`` (``(positions, size)``), which turns it into a spatial axis.
    """
    first = grid.ndim - len(boxes)
    for axis, box in enumerate(boxes, start=first):
        grid = (grid.movedim(axis, -1) @ box.to(grid.dtype)).movedim(-1, axis)
    return grid


def box_masks(index: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, *spatial)`` masks of the boxes at flat (row-major) window indices ``index``."""
    positions = tuple(box.shape[0] for box in boxes)
    rank = len(boxes)
    mask = torch.ones((index.shape[0],) + (1,) * rank, dtype=torch.bool, device=index.device)
    for axis, (box, i) in enumerate(zip(boxes, torch.unravel_index(index, positions), strict=True)):
        shape = [index.shape[0]] + [1] * rank
        shape[1 + axis] = box.shape[1]
        mask = mask & box[i].view(shape)
    return mask


def baseline_fill(inputs: torch.Tensor, baseline: object, sigma: object) -> torch.Tensor:
    """What a box is replaced with: a tensor broadcastable to ``inputs``, one row per sample."""
    n, spatial = inputs.shape[0], tuple(range(2, inputs.ndim))
    if isinstance(baseline, str):
        if baseline == "mean":  # per channel, per sample
            return inputs.mean(dim=spatial, keepdim=True)
        if baseline == "blur":
            return gaussian_blur(inputs, _per_axis(sigma, "sigma", len(spatial), numbers.Real))
        if baseline != "zero":
            raise OptionError(
                f"baseline must be a number or one of {BASELINES}; got "
                f"{baseline!r}.{did_you_mean(baseline, BASELINES)}"
            )
        baseline = 0.0
    if (
        isinstance(baseline, bool)
        or not isinstance(baseline, numbers.Real)
        or not math.isfinite(baseline)
    ):
        raise OptionError(
            f"baseline must be a finite number or one of {BASELINES}; got {baseline!r}."
        )
    return inputs.new_full((1,) * inputs.ndim, float(baseline)).expand(n, *[-1] * (inputs.ndim - 1))


def default_chunk_size(*, incremental: bool, device: torch.device) -> int:
    """Perturbed inputs per forward pass when the user does not say.

    Measured on a 2-core CPU, one thread, 224 px: full forward passes are fastest in batches of
    about 8 (DenseNet-121 took 44 % longer per window at 32, ViT-B/16 13 %: large batches
    outgrow the cache), while the incremental engine gains from larger chunks (ResNet-18 and
    DenseNet-121 15-40 % faster at 32 than at 8: each chunk gathers and scatters its patches
    in a few large operations). Accelerators want large batches. docs/performance.md.
    """
    return 8 if device.type == "cpu" and not incremental else 32


class Occlusion:
    """Occlusion: the drop of the target score when a sliding box is replaced by a baseline."""

    name = "occlusion"
    tags = Tags("local", "model-agnostic")  # needs only the forward capability

    @staticmethod
    def forward_images(shape: tuple[int, ...], options: Mapping[str, object]) -> int:
        """Perturbed images a batch of ``shape`` forwards with ``options`` (plain occlusion;
        incremental inference makes each cheaper): the cost estimate of ``xai compare``."""
        size = shape[2:]
        window = options.get("window") or [math.ceil(s / 8) for s in size]
        window = list(window) if isinstance(window, Sequence) else [window] * len(size)
        stride = options.get("stride") or [max(1, int(w) // 2) for w in window]
        stride = list(stride) if isinstance(stride, Sequence) else [stride] * len(size)
        axes = zip(size, window, stride, strict=False)
        positions = [max(0, (s - int(w)) // int(t) + 1) for s, w, t in axes]
        return shape[0] * (math.prod(positions) + 1)  # + the unperturbed batch

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        window: PositiveInt | Sequence[PositiveInt] | None = None,
        stride: PositiveInt | Sequence[PositiveInt] | None = None,
        baseline: float | Literal["zero", "blur", "mean"] = "zero",
        sigma: BlurSigma | Sequence[BlurSigma] = 5.0,
        chunk_size: PositiveInt | None = None,
        progress: ProgressFn | None = None,
        incremental: bool | Literal["auto", "exact", "approximate"] = "auto",
        approximation: Mapping[str, float] | None = None,
    ) -> Attribution:
        """:param window: box size, one int for every spatial axis or one per axis; default
            ``ceil(size / 8)`` per axis.
        :param stride: step between boxes, int or one per axis; default half the window (>= 1).
        :param baseline: a number (``"zero"`` = 0), ``"blur"`` (the input blurred by a Gaussian
            of ``sigma`` pixels) or ``"mean"`` (each sample's per-channel mean).
        :param sigma: the blur's standard deviation in pixels, one or one per axis.
        :param chunk_size: perturbed inputs per forward pass (bounds peak memory). Default:
            32, or 8 where full forward passes run on a CPU (see :func:`default_chunk_size`).
        :param progress: ``progress(done, total, "perturbed inputs")`` called after every
            chunk, counting perturbed inputs (the protocol of :mod:`xai_core.core.progress`).
        :param incremental: ``"auto"`` (incremental inference on a traceable PyTorch CNN, exact;
            plain occlusion otherwise), ``"exact"``, ``"approximate"`` or ``False`` (plain
            occlusion). See :mod:`xai_occlusion.incremental`.
        :param approximation: approximate mode's settings: ``threshold`` (largest patch, as a
            share of each feature map), ``coarse`` (first-pass grid step, in windows) and
            ``refine`` (share of the other windows evaluated where the first pass is high).
        """
        n, size = inputs.shape[0], tuple(inputs.shape[2:])
        rank, device = len(size), inputs.device
        if window is None:
            window = tuple(math.ceil(s / 8) for s in size)
        window = _per_axis(window, "window", rank)
        if any(w > s for w, s in zip(window, size, strict=True)):
            raise OptionError(f"window {window} is larger than the input's spatial size {size}.")
        stride = _per_axis(
            tuple(max(1, w // 2) for w in window) if stride is None else stride, "stride", rank
        )
        if chunk_size is not None:
            (chunk_size,) = _per_axis(chunk_size, "chunk_size", 1)
        if progress is not None and not callable(progress):
            raise OptionError(
                f"progress must be a callable(done, total, what); got {progress!r}."
            )
        fill = baseline_fill(inputs, baseline, sigma)
        mode, settings = incremental_mode(incremental), approximation_settings(approximation)

        boxes = [window_boxes(*dims, device) for dims in zip(size, window, stride, strict=True)]
        positions = tuple(box.shape[0] for box in boxes)
        windows = math.prod(positions)
        total = n * windows  # perturbation j occludes window j % windows of sample j // windows
        with torch.no_grad():
            scores = model.forward(inputs)
            resolved = targets.resolve(scores)
            reference = resolved.select(scores)  # (N, K) unperturbed target scores
            dtype = torch.promote_types(reference.dtype, torch.float32)
            engine, plan = prepare(model, inputs, fill, boxes, window, mode, settings, scores)
            chunk = chunk_size or default_chunk_size(incremental=engine is not None, device=device)
            if plan["mode"] == "approximate":  # every window, or a coarse grid refined where high
                drops = engine.drops(reference, resolved, windows)
                deltas, total = adaptive_deltas(drops, n, positions, chunk, settings, progress)
            else:
                deltas = torch.empty(total, resolved.count, dtype=dtype, device=device)

                def drops(index: torch.Tensor) -> torch.Tensor:
                    rows = index // windows
                    if engine is not None:  # exact incremental inference
                        outputs = engine.forward(rows, index % windows)
                    else:
                        mask = box_masks(index % windows, boxes).unsqueeze(1)  # every channel
                        occluded = torch.where(mask, fill[rows], inputs[rows])
                        outputs = model.forward(occluded)
                    return reference[rows] - resolved.select(outputs, rows)

                evaluate_in_chunks(drops, deltas, chunk, progress=progress)
            grid = deltas.view(n, *positions, resolved.count).movedim(-1, 1)  # (N, K, *positions)
            sums = along_axes(grid, boxes)
            counts = along_axes(torch.ones(positions, dtype=dtype, device=device), boxes)
            maps = torch.where(counts > 0, sums / counts.clamp(min=1), 0)
        return Attribution(
            maps=maps,
            scores=scores.detach(),
            details={
                "window": window,
                "stride": stride,
                "positions": positions,
                "baseline": baseline,
                **({"sigma": sigma} if baseline == "blur" else {}),
                "evaluations": total,
                "chunk_size": chunk,
                "uncovered": int((counts == 0).sum()),
                "incremental": plan,
            },
        )


@xai_core.hookimpl
def register_explainers(register: Callable[[type], None]) -> None:
    register(Occlusion)
    register(Rise)
