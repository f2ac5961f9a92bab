"""Adaptive refinement (approximate mode): drops on a coarse grid of windows, interpolated
(multilinear) onto every window, then evaluated where the interpolated drop is highest."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from xai_core.core.explanation import normalize
from xai_core.core.progress import ProgressFn
from xai_core.torch.ops import evaluate_in_chunks


def interpolation(positions: int, coarse: Sequence[int], dtype, device) -> torch.Tensor:
    """``(coarse, positions)`` linear interpolation from the coarse indices to every index."""
    matrix = torch.zeros(len(coarse), positions, dtype=dtype)
    for j, (a, b) in enumerate(itertools.pairwise(coarse)):
        for u in range(a, b + 1):
            t = (u - a) / (b - a)
            matrix[j, u] = 1 - t
            matrix[j + 1, u] = t
    if len(coarse) == 1:
        matrix[0, :] = 1
    return matrix.to(device)


def adaptive_deltas(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    samples: int,
    positions: tuple[int, ...],
    chunk: int,
    settings: Mapping[str, float],
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, int]:
    """Score drops ``(samples * windows, K)`` of every window from a coarse grid of windows
    (every ``settings["coarse"]``-th position per axis, and the last), interpolated
    (multilinear), then evaluated where the interpolated drop is highest (the share
    ``settings["refine"]`` of the other windows, per sample). Returns the drops and how many
    perturbations were evaluated. ``evaluate(index)`` gives the ``(len(index), K)`` drops of the
    flat perturbation indices ``sample * windows + window``.
    """
    coarse, refine = int(settings["coarse"]), float(settings["refine"])
    device, dtype, count = evaluate.device, evaluate.dtype, evaluate.count
    windows = math.prod(positions)
    grids = [sorted(set(range(0, p, coarse)) | {p - 1}) for p in positions]
    axes = [torch.tensor(g, device=device) for g in grids]
    mesh = torch.meshgrid(*axes, indexing="ij")
    flat = torch.zeros_like(mesh[0])
    for axis, m in enumerate(mesh):
        flat = flat * positions[axis] + m
    coarse_windows = flat.reshape(-1)
    is_coarse = torch.zeros(windows, dtype=torch.bool, device=device)
    is_coarse[coarse_windows] = True
    rest = int((~is_coarse).sum())
    extra = min(rest, math.ceil(refine * rest))
    total = samples * (coarse_windows.numel() + extra)
    done = 0
    deltas = torch.empty(samples * windows, count, dtype=dtype, device=device)

    def run(index: torch.Tensor) -> None:  # the coarse grid, then the refined windows
        nonlocal done
        done = evaluate_in_chunks(
            evaluate, deltas, chunk, index, progress=progress, done=done, total=total
        )

    sample = torch.arange(samples, device=device)[:, None]
    run((sample * windows + coarse_windows).reshape(-1))
    grid = deltas.view(samples, windows, count)[:, coarse_windows]  # (N, coarse, K)
    grid = grid.movedim(-1, 1).reshape(samples, count, *(len(g) for g in grids))
    for axis, g in enumerate(grids):
        matrix = interpolation(positions[axis], g, dtype, device)
        dim = 2 + axis
        grid = (grid.movedim(dim, -1) @ matrix).movedim(-1, dim)
    dense = grid.reshape(samples, count, windows)  # interpolated, (N, K, windows)
    deltas.view(samples, windows, count)[:] = torch.where(
        is_coarse[None, :, None], deltas.view(samples, windows, count), dense.movedim(1, -1)
    )
    if extra:
        priority = normalize(dense, 1).amax(1)  # (N, windows): highest over the targets
        priority = priority.masked_fill(is_coarse, -1.0)
        chosen = priority.topk(extra, dim=1).indices  # (N, extra)
        run((sample * windows + chosen).reshape(-1))
    return deltas, total
