"""Tensor operations that several explainers and metrics need, in one place.

Everything runs on the inputs' device and keeps their dtype; nothing leaves torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F

from xai_core.errors import CapabilityError
from xai_core.options import Range

# A blur wider than this is a flat image on any realistic input, while its kernel (6 sigma + 1
# taps, replicate-padded by 3 sigma per side) would grow without bound: sigma=1e6 asked for
# gigabytes. Options that feed gaussian_blur are annotated with BlurSigma.
MAX_BLUR_SIGMA = 100.0
BlurSigma = Annotated[float, Range(0, MAX_BLUR_SIGMA, min_inclusive=False)]


def gaussian_blur(inputs: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Each channel of ``(N, C, *spatial)`` blurred by a separable Gaussian, one sigma per axis.

    The kernel is cut at ``round(3 sigma)`` and edges are replicated (a zero border would add a
    dark frame the model may react to): per channel, the same as
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3)``.
    """
    rank = inputs.ndim - 2
    if len(sigma) != rank:
        raise ValueError(f"need one sigma per spatial axis ({rank}); got {list(sigma)}")
    if not all(0 < s <= MAX_BLUR_SIGMA for s in sigma):
        raise ValueError(f"each sigma must lie in (0, {MAX_BLUR_SIGMA:g}] px; got {list(sigma)}")
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    out = inputs.reshape(-1, 1, *inputs.shape[2:])  # channels never mix
    for axis, s in enumerate(sigma):
        radius = int(3 * s + 0.5)
        t = torch.arange(-radius, radius + 1, device=inputs.device, dtype=inputs.dtype)
        kernel = torch.exp(-0.5 * (t / s) ** 2)
        shape = [1, 1] + [1] * rank
        shape[2 + axis] = kernel.numel()
        pad = [0] * (2 * rank)  # F.pad lists the last axis first
        pad[2 * (rank - 1 - axis)] = pad[2 * (rank - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), (kernel / kernel.sum()).view(shape))
    return out.reshape(inputs.shape)


def target_gradients(
    scores: torch.Tensor, tensors: Sequence[torch.Tensor]
) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """For each target ``k`` in turn, ``d scores[:, k] / d t`` for every tensor ``t``.

    ``scores`` is ``(N, K)``: each sample's chosen target scores. Samples are independent in eval
    mode, so the gradient of ``scores[:, k].sum()`` holds every sample's own gradient. The K
    backward passes share one forward pass: each runs through the retained graph and the last
    one frees it. Reduce each target's gradients before asking for the next, so that no
    ``(K, *t.shape)`` tensor is ever built. (One vmapped backward, ``is_grads_batched=True``,
    gives bitwise the same gradients but was slower on CPU: convolution, batch-norm and
    attention backward still run once per target under vmap, and their results are stacked at
    every layer; docs/performance.md.) ``None`` stands for a tensor the scores do not depend on.
    """
    count = scores.shape[1]
    for k in range(count):
        yield torch.autograd.grad(
            scores[:, k].sum(), list(tensors), retain_graph=k < count - 1, allow_unused=True
        )


# -- token models (vision transformers) ------------------------------------------------------


def patch_grid(tokens: int, spatial: Sequence[int]) -> tuple[int, ...] | None:
    """The grid of ``tokens`` patches that tiles an input of size ``spatial``, or ``None``.

    A patch size ``p`` gives the grid ``s // p`` per axis (or ``ceil(s / p)`` for patchifiers that
    pad): the first ``p`` whose grid holds exactly ``tokens`` patches wins. So the grid keeps the
    input's aspect ratio, and a square input needs a perfect square.
    """
    for p in range(1, max(spatial) + 1):
        for grid in (tuple(s // p for s in spatial), tuple(-(-s // p) for s in spatial)):
            if math.prod(grid) == tokens:
                return grid
    return None


def token_layout(
    tokens: int, spatial: Sequence[int], class_token: bool | None
) -> tuple[bool, tuple[int, ...]]:
    """Whether token 0 is a class token, and the patch grid of the other tokens.

    Auto (``class_token=None``): a class token when the last ``T - 1`` tokens tile the input as a
    patch grid (``T = 197`` at 224x224 px: 196 = 14 x 14 patches), else none when all ``T`` do.
    """
    options = [class_token] if class_token is not None else [True, False]
    for has_cls in options:
        grid = patch_grid(tokens - int(has_cls), spatial)
        if grid is not None:
            return has_cls, grid
    wanted = {True: "T - 1", False: "T"}
    raise CapabilityError(
        f"Cannot lay {' or '.join(wanted[c] for c in options)} of the T={tokens} tokens out as a "
        f"patch grid of the {tuple(spatial)} input. Models with extra tokens (distillation, "
        f"registers) or patch grids that do not follow the input's shape are not supported; "
        f"pass class_token=True/False if the automatic choice is wrong."
    )
