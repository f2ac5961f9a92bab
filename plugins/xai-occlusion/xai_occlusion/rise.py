"""RISE (Petsiuk, Das & Saenko 2018): the target score averaged over random masks, per pixel.

For ``M`` random masks ``M_i`` whose pixels are kept with probability ``p``::

    S(u) = 1 / (M * p) * sum_i f(x * M_i) * M_i(u)

Each mask is a coarse binary grid of ``cells`` per axis (a cell is on with probability ``p``),
upsampled (linearly along each axis, edges mirrored) to ``(cells + 1) * ceil(size / cells)``
per axis and cropped to the input at a random integer shift in ``[0, ceil(size / cells))`` per
axis, exactly as the authors' code (tested against it): smooth masks not aligned to one grid.

Only ``model.forward`` is called (PyTorch and ONNX alike). Masks are drawn from a local
``torch.Generator`` seeded by ``seed`` (never the global RNG) and do not depend on the batch, so a
sample gets the same map alone or in a batch. The coarse grids and shifts are drawn once (small);
the full-size masks are built per chunk on the model's device, so memory is bounded by
``chunk_size``. Every target comes from the same forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

import torch

from xai_core import Attribution, Tags, Targets
from xai_core.core.adapters import ModelAdapter
from xai_core.core.errors import OptionError
from xai_core.core.options import PositiveInt, Range
from xai_core.core.progress import ProgressFn
from xai_core.core.targets import ResolvedTargets
from xai_core.torch.ops import evaluate_in_chunks

Probability = Annotated[float, Range(0, 1, min_inclusive=False)]
MaskFn = Callable[[torch.Tensor], torch.Tensor]  # mask indices -> (B, *spatial) masks


def _cells(value: object, rank: int) -> tuple[int, ...]:
    several = isinstance(value, Sequence) and not isinstance(value, str)
    items = list(value) if several else [value] * rank
    if len(items) != rank or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items
    ):
        raise OptionError(
            f"cells must be a positive int or {rank} of them (one per spatial axis); "
            f"got {value!r}."
        )
    return tuple(items)


def interpolation_matrix(cells: int, size: int) -> torch.Tensor:
    """``(size, cells)``: linear interpolation of ``cells`` values onto ``size`` points, pixel
    centres aligned (``align_corners=False``) and edges mirrored, as the authors' masks
    (``skimage.transform.resize(order=1, mode="reflect")``; tested to agree)."""
    at = (torch.arange(size, dtype=torch.float64) + 0.5) * cells / size - 0.5
    low = at.floor()
    frac = at - low
    matrix = torch.zeros(size, cells, dtype=torch.float64)
    for index, weight in ((low, 1 - frac), (low + 1, frac)):
        index = index.long().abs()  # mirrored about the first centre: -1 -> 1
        last = cells - 1  # and about the last: cells -> cells - 2 (clamped for one cell)
        index = torch.where(index > last, 2 * last - index, index).clamp(0, last)
        matrix.index_put_((torch.arange(size), index), weight.to(matrix.dtype), accumulate=True)
    return matrix.float()


def random_masks(
    count: int, cells: Sequence[int], p: float, size: Sequence[int], seed: int
) -> MaskFn:
    """RISE's masks for an input of spatial ``size``: a function of mask indices returning the
    ``(B, *size)`` float masks on the indices' device. The coarse grids and shifts are drawn
    here, once, on the CPU from a generator seeded by ``seed`` (same masks on every device).

    A mask is separable in its upsampling: along each axis the grid is multiplied by the rows
    ``shift .. shift + size`` of that axis's interpolation matrix, so no full-size upsampled
    mask is ever built and cropped."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.rand((count, *cells), generator=generator) < p
    cell = [math.ceil(s / c) for s, c in zip(size, cells, strict=True)]
    shifts = torch.stack(
        [torch.randint(0, c, (count,), generator=generator) for c in cell], dim=1
    )  # (count, rank)
    matrices = [
        interpolation_matrix(c, (c + 1) * k) for c, k in zip(cells, cell, strict=True)
    ]

    on: dict[torch.device, tuple] = {}  # the draws, copied once to each device asked for

    def masks(index: torch.Tensor) -> torch.Tensor:
        device = index.device
        if device not in on:
            on[device] = (grids.to(device), shifts.to(device), [m.to(device) for m in matrices])
        grid, shift, matrix = on[device]
        mask = grid[index].float()  # (B, *cells)
        shift = shift[index]
        for axis, s in enumerate(size):
            rows = shift[:, axis, None] + torch.arange(s, device=device)  # (B, s)
            crop = matrix[axis][rows]  # (B, s, cells)
            mask = torch.einsum("b...c,bsc->b...s", mask.movedim(1 + axis, -1), crop)
            mask = mask.movedim(-1, 1 + axis)
        return mask

    return masks


def rise_saliency(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    resolved: ResolvedTargets,
    masks: MaskFn,
    count: int,
    p: float,
    chunk: int,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """``(N, K, *spatial)``: ``sum_i f_k(x * M_i) * M_i / (count * p)`` for masks ``0..count-1``.

    Perturbation ``j`` applies mask ``j % count`` to sample ``j // count``; the scores of all
    ``N * count`` perturbations are kept (small), then multiplied by the masks chunk by chunk.
    """
    n, device = inputs.shape[0], inputs.device
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    scores = torch.empty(n * count, resolved.count, dtype=dtype, device=device)

    def evaluate(index: torch.Tensor) -> torch.Tensor:
        rows = index // count
        mask = masks(index % count).unsqueeze(1).to(inputs.dtype)  # every channel
        return resolved.select(forward(inputs[rows] * mask), rows)

    evaluate_in_chunks(evaluate, scores, chunk, progress=progress)
    scores = scores.view(n, count, resolved.count)
    maps = inputs.new_zeros((n, resolved.count, *inputs.shape[2:]), dtype=dtype)
    for start in range(0, count, chunk):
        index = torch.arange(start, min(start + chunk, count), device=device)
        part = masks(index).to(dtype).flatten(1)  # (B, pixels)
        maps += (scores[:, index].transpose(1, 2) @ part).view(maps.shape)
    return maps / (count * p)


class Rise:
    """RISE: the target score on randomly masked copies, averaged per pixel over the masks that
    keep it."""

    name = "rise"
    tags = Tags("local", "model-agnostic")  # needs only the forward capability

    @staticmethod
    def forward_images(shape: tuple[int, ...], options: Mapping[str, object]) -> int:
        """Images a batch of ``shape`` forwards with ``options`` (``xai compare``'s estimate)."""
        masks = options.get("masks") or 4000
        return shape[0] * (int(masks) + 1)  # + the unperturbed batch (targets)

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        masks: PositiveInt = 4000,
        cells: PositiveInt | Sequence[PositiveInt] = 7,
        p: Probability = 0.5,
        seed: int = 0,
        chunk_size: PositiveInt | None = None,
        progress: ProgressFn | None = None,
    ) -> Attribution:
        """:param masks: number of random masks (the paper uses 4000 for ResNet-50; fewer give
            noisier maps, the cost is ``N * masks`` forward passes).
        :param cells: cells of the coarse grid per spatial axis, one int or one per axis.
        :param p: probability that a cell is kept (not masked).
        :param seed: seed of the masks' generator: same seed, same masks, same maps.
        :param chunk_size: masked inputs per forward pass (bounds peak memory); default 8 on a
            CPU, 32 elsewhere. Does not change the result.
        :param progress: ``progress(done, total, "perturbed inputs")`` after each chunk.
        """
        size = tuple(inputs.shape[2:])
        grid = _cells(cells, len(size))
        if progress is not None and not callable(progress):
            raise OptionError(f"progress must be a callable(done, total, what); got {progress!r}.")
        chunk = chunk_size or (8 if inputs.device.type == "cpu" else 32)
        with torch.no_grad():
            scores = model.forward(inputs)
            resolved = targets.resolve(scores)
            draw = random_masks(masks, grid, p, size, seed)
            maps = rise_saliency(
                model.forward, inputs, resolved, draw, masks, p, chunk, progress
            )
        return Attribution(
            maps=maps,
            scores=scores.detach(),
            details={
                "masks": masks,
                "cells": grid,
                "p": p,
                "seed": seed,
                "evaluations": inputs.shape[0] * masks,
                "chunk_size": chunk,
            },
        )
