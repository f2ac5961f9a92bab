"""Tensor operations that several explainers and metrics need, in one place.

Everything runs on the inputs' device and keeps their dtype; nothing leaves torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F

from xai_core.core.errors import CapabilityError
from xai_core.core.options import Range
from xai_core.core.progress import ProgressFn

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


def evaluate_in_chunks(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    chunk: int,
    index: torch.Tensor | None = None,
    *,
    progress: ProgressFn | None = None,
    done: int = 0,
    total: int | None = None,
    what: str = "perturbed inputs",
) -> int:
    """Fill ``out[index]`` with ``evaluate(part)``, ``chunk`` indices at a time: the one loop
    that runs a model on many perturbed copies of a batch with peak memory bounded by ``chunk``
    (occlusion, the perturbation metrics, occlusion's adaptive refinement).

    ``index`` holds flat row indices of ``out`` (default: every row, in order); ``evaluate``
    builds the perturbed inputs of those rows and returns their ``(len(part), ...)`` results.
    ``progress(done, total, what)`` is called after each chunk, counting from ``done``
    (for work done in several calls) up to ``total`` (default: ``done`` + this call's rows).
    Returns the count done after this call.
    """
    rows = out.shape[0] if index is None else index.numel()
    total = done + rows if total is None else total
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        if index is None:  # a plain slice: no gather, no scatter
            out[start:stop] = evaluate(torch.arange(start, stop, device=out.device))
        else:
            part = index[start:stop]
            out[part] = evaluate(part)
        done += stop - start
        if progress is not None:
            progress(done, total, what)
    return done


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


# Leading tokens that are not patches: a class token, DeiT's distillation token, up to 8 or so
# register tokens (DINOv2-reg, EVA-02). More than this is not taken for a vision transformer.
MAX_EXTRA_TOKENS = 16


def token_layout(
    tokens: int, spatial: Sequence[int], class_token: bool | int | None
) -> tuple[int, tuple[int, ...]]:
    """How many leading tokens are not patches (class, distillation, register tokens), and the
    patch grid of the others.

    ``class_token``: ``None`` decides from the token count: a class token when the last ``T - 1``
    tokens tile the input as a patch grid (``T = 197`` at 224x224 px: 196 = 14 x 14 patches),
    else none when all ``T`` do, else the fewest leading extra tokens (2: class and distillation,
    5: class and 4 registers, ...) after which the rest tile it. ``True``: a class token first,
    possibly followed by more extra tokens; ``False``: none; an ``int``: exactly that many.
    The count is ``0`` or more; as a flag, ``bool(count)`` says whether token 0 is not a patch.
    """
    extra = range(2, MAX_EXTRA_TOKENS + 1)
    if class_token is None:
        options = [1, 0, *extra]
    elif isinstance(class_token, bool):
        options = [1, *extra] if class_token else [0]
    else:
        options = [int(class_token)]
    for prefix in options:
        grid = patch_grid(tokens - prefix, spatial) if tokens > prefix else None
        if grid is not None:
            return prefix, grid
    raise CapabilityError(
        f"Cannot lay the T={tokens} tokens out as a patch grid of the {tuple(spatial)} input "
        f"after {_counts(options)} leading class/extra token(s). Patch grids that do not "
        f"follow the input's shape (windows, pooled stages) are not supported; pass "
        f"class_token=True/False (or the number of leading non-patch tokens) if the automatic "
        f"choice is wrong."
    )


def _counts(options: Sequence[int]) -> str:
    return str(options[0]) if len(options) == 1 else f"{min(options)} to {max(options)}"


# -- layer outputs as feature maps ---------------------------------------------------------------


class Layout(NamedTuple):
    """How a layer's output ``(N, ...)`` holds a feature map over the input's spatial grid.

    ``kind``: ``"channels_first"`` ``(N, C, *s)`` (CNNs), ``"channels_last"`` ``(N, *s, C)``
    (timm Swin, ConvNeXt-style norms), or ``"tokens"`` ``(N, T, C)`` whose last tokens, after
    ``extra`` class/distillation/register tokens, tile the input as ``grid``.
    """

    kind: str
    extra: int = 0
    grid: tuple[int, ...] = ()


def _is_grid(shape: Sequence[int], spatial: Sequence[int]) -> bool:
    return len(shape) == len(spatial) and patch_grid(math.prod(shape), spatial) == tuple(shape)


def feature_layout(
    shape: Sequence[int], spatial: Sequence[int], class_token: bool | int | None = None
) -> Layout:
    """The :class:`Layout` of an output of ``shape`` for an input of spatial size ``spatial``.

    An output of the input's rank is channels-first, unless only its middle dimensions (not its
    trailing ones) tile the input at some stride: then its last dimension holds the channels
    (a CNN map ``(N, 512, 7, 7)`` stays channels-first; Swin's ``(N, 7, 7, 768)`` is
    channels-last). Rank-3 outputs are tokens laid out by :func:`token_layout`.
    Raises :class:`CapabilityError` for anything else.
    """
    shape = tuple(shape)
    if len(shape) == len(spatial) + 2:
        if not _is_grid(shape[2:], spatial) and _is_grid(shape[1:-1], spatial):
            return Layout("channels_last", 0, shape[1:-1])
        return Layout("channels_first", 0, shape[2:])
    if len(shape) == 3:
        extra, grid = token_layout(shape[1], spatial, class_token)
        return Layout("tokens", extra, grid)
    raise CapabilityError(
        f"An output of shape {shape} is neither a feature map (N, C, *spatial) or (N, *spatial, "
        f"C) of the {tuple(spatial)} input nor tokens (N, T, C)."
    )


def as_feature_map(output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A layer's output (or its gradient) as the channels-first map ``(N, C, *grid)``."""
    if layout.kind == "channels_last":
        return output.movedim(-1, 1)
    if layout.kind == "tokens":
        return output[:, layout.extra :].transpose(1, 2).unflatten(2, layout.grid)
    return output
