"""What to explain: which output score(s) of each sample.

One documented format, validated against the batch before anything runs:

* ``None``: the top class of each sample (arg-max of its scores);
* an ``int``: that class for every sample;
* a sequence / 1-D tensor of ``N`` ints: one class per sample;
* a sequence of ``N`` equal-length sequences / an ``(N, K)`` tensor: ``K`` classes per sample
  (multi-label models: all 14 findings of a chest X-ray at once);
* ``"all"``: every output class of every sample;
* a callable ``f(outputs) -> (B,) or (B, K)`` tensor of scores, computed row by row (it must not
  mix samples), for custom outputs (e.g. a sigmoid probability instead of the logit);
* a :class:`Region`: for segmentation outputs ``(N, C, *spatial)``, a class's logits summed over
  a mask, a box, or the region the model predicts for that class (Seg-Grad-CAM).

A count that does not match the batch is an error, never a silent truncation. Scores are the
pre-softmax / pre-sigmoid outputs of the model (logits).

Segmentation outputs ``(N, C, *spatial)`` (2D or 3D) are explained through regions: every target
becomes one scalar per sample, ``y = sum_{u in R} logit_c(u)`` (Vinogradova et al. 2020), so
every method works unchanged. The region ``R`` is fixed on the unperturbed batch (a perturbation
method compares the same pixels before and after). Plain class targets on such outputs mean
``Region(classes)``; ``None`` means ``Region()``: the predicted class with the largest predicted
area (ties: the lower class index), over its predicted region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch

from xai_core.core.errors import NonFiniteScoresError, TargetError, TargetTypeError

ScoreFunction: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
TargetSpec: TypeAlias = (
    int
    | Sequence[int]
    | Sequence[Sequence[int]]
    | torch.Tensor
    | ScoreFunction
    | Literal["all"]
    | "Region"
    | None
)


@dataclass(frozen=True, eq=False)
class Region:
    """A segmentation target: class logits of an ``(N, C, *spatial)`` output summed over a region.

    :param classes: the class(es) to explain, as for plain targets: ``None`` (per sample, the
        predicted class with the largest predicted area), an int, one per sample, or ``(N, K)``.
    :param mask: ``(N, *spatial)`` or ``(N, K, *spatial)`` bool, on the model's *output* grid.
    :param box: per output axis ``(start, stop)`` in output-grid pixels, stop excluded, in tensor
        order (2D: ``((row0, row1), (col0, col1))``); ``(rank, 2)`` for every sample or
        ``(N, rank, 2)`` one per sample.
    :param ignore: classes the default never picks (e.g. ``[0]``, the background).

    Without ``mask`` and ``box`` the region of class ``c`` is where the model predicts ``c``
    (``argmax`` over classes equals ``c``) on the unperturbed batch. An empty region is an error.
    """

    classes: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None
    mask: torch.Tensor | None = None
    box: Sequence[Sequence[int]] | torch.Tensor | None = None
    ignore: Sequence[int] = ()


@dataclass(frozen=True)
class ResolvedTargets:
    """Targets fixed against the model's scores on the unperturbed batch.

    ``indices`` is an ``(N, K)`` long tensor of class indices on the model's device, or ``None``
    for a callable target. ``count`` is ``K``, the number of targets per sample. ``region`` is
    ``(N, K, *spatial)`` bool for segmentation outputs (each target's logits are summed over it),
    else ``None``.
    """

    indices: torch.Tensor | None
    count: int
    function: ScoreFunction | None = None
    region: torch.Tensor | None = None

    def select(self, outputs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, K)`` target scores of ``outputs``.

        ``rows[b]`` names the sample that row ``b`` of ``outputs`` comes from (perturbation
        methods evaluate many copies of one sample); by default row ``b`` is sample ``b``.
        """
        if self.function is not None:
            return _checked_scores(self.function(outputs), outputs.shape[0], self.count)
        assert self.indices is not None  # invariant of the constructor, not user input
        index = self.indices if rows is None else self.indices.index_select(0, rows)
        if self.region is None:
            return outputs.flatten(1).gather(1, index)
        region = self.region if rows is None else self.region.index_select(0, rows)
        if outputs.shape[2:] != region.shape[2:]:
            raise TargetError(
                f"The model returned outputs of shape {tuple(outputs.shape)}, but the target "
                f"regions were fixed on a grid of {tuple(region.shape[2:])}."
            )
        spread = index.view(*index.shape, *[1] * (outputs.ndim - 2))
        logits = outputs.gather(1, spread.expand(-1, -1, *outputs.shape[2:]))  # (B, K, *spatial)
        return torch.where(region, logits, 0).flatten(2).sum(-1)


class Targets:
    """A validated target request for a batch of ``n`` samples, resolved once scores exist.

    Explainers call :meth:`resolve` on the scores of their first (unperturbed) forward pass;
    the result is remembered so the core can report it in the :class:`Explanation`.
    """

    def __init__(self, spec: TargetSpec, n: int, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.n = n
        self.device = torch.device(device)
        self.multi = False  # several targets per sample were asked for: keep the target axis
        self.function: ScoreFunction | None = None
        self._indices: torch.Tensor | None = None  # fixed before seeing scores, if possible
        self._all = False
        self.region: Region | None = None  # a Region spec, its mask/box checked against n
        self.resolved: ResolvedTargets | None = None
        self._parse(spec)

    def _parse(self, spec: Any) -> None:
        if isinstance(spec, Region):
            self._parse_region(spec)
            return
        if spec is None:
            return
        if isinstance(spec, str):
            if spec != "all":
                raise TargetTypeError(f"The only string target is 'all'; got {spec!r}.")
            self._all = self.multi = True
            return
        if callable(spec) and not isinstance(spec, torch.Tensor):
            self.function = spec
            return
        if isinstance(spec, bool):
            raise TargetTypeError("A target must be a class index, not a bool.")
        if isinstance(spec, bytes | bytearray | memoryview):
            # bytes are a Sequence of ints: b"3" would silently mean class 51.
            raise TargetTypeError(
                f"Targets cannot be {type(spec).__name__}: bytes are not class indices. Pass an "
                f"int, a list of ints (one per sample) or a tensor."
            )
        if isinstance(spec, int):
            _check_int64(spec)
            self._indices = torch.full((self.n, 1), spec, dtype=torch.long)
            self._check_nonnegative()
            return
        tensor = self._as_tensor(spec)
        if tensor.ndim == 0:
            tensor = tensor.reshape(1).expand(self.n)
        if tensor.ndim > 2:
            raise TargetError(
                f"Targets must be 1-D (one class per sample) or 2-D (several per sample); "
                f"got shape {tuple(tensor.shape)}."
            )
        if tensor.shape[0] != self.n:
            raise TargetError(
                f"Got {tensor.shape[0]} targets for a batch of {self.n} samples. Give exactly one "
                f"target (or one row of targets) per sample, or a single int for all samples."
            )
        if tensor.ndim == 2:
            if tensor.shape[1] == 0:
                raise TargetError("Each sample needs at least one target; got empty rows.")
            self.multi = True
        self._indices = tensor.reshape(self.n, -1)
        self._check_nonnegative()

    def _as_tensor(self, spec: Any) -> torch.Tensor:
        if isinstance(spec, torch.Tensor):
            if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
                raise TargetTypeError(
                    f"Target tensors must hold integer class indices; got dtype {spec.dtype}."
                )
            if spec.device.type == "meta":
                raise TargetTypeError(
                    "Target tensors must hold values; a tensor on the 'meta' device has none. "
                    "Create the targets on the CPU or the model's device."
                )
            return spec.detach().to("cpu", torch.long)
        if not isinstance(spec, Sequence):
            raise TargetTypeError(
                f"Cannot interpret targets of type {type(spec).__name__}. Use an int, a sequence "
                f"of ints (one per sample), a sequence of sequences (several per sample), a "
                f"tensor, 'all', or a callable on the model outputs."
            )
        rows = list(spec)
        text = str | bytes | bytearray | memoryview  # sequences, but never a row of classes
        if rows and all(isinstance(r, Sequence) and not isinstance(r, text) for r in rows):
            lengths = {len(r) for r in rows}
            if len(lengths) != 1:
                raise TargetError(
                    f"Every sample needs the same number of targets; got row lengths "
                    f"{sorted(lengths)}."
                )
            rows = [list(r) for r in rows]
            flat = [v for r in rows for v in r]
        else:
            flat = rows
        for value in flat:
            integer_scalar = isinstance(value, torch.Tensor) and (
                value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
            )
            if not integer_scalar and (isinstance(value, bool) or not isinstance(value, int)):
                raise TargetTypeError(
                    f"Targets must be integer class indices; got {value!r} "
                    f"({type(value).__name__})."
                )
            if isinstance(value, int):
                _check_int64(value)
        return torch.as_tensor(rows, dtype=torch.long)

    def _parse_region(self, region: Region) -> None:
        classes = region.classes
        function = callable(classes) and not isinstance(classes, torch.Tensor)
        if isinstance(classes, str) or function:
            raise TargetTypeError(
                f"Region classes are class indices (an int, one per sample, or (N, K)); got "
                f"{classes!r}."
            )
        self._parse(classes)
        if region.mask is not None and region.box is not None:
            raise TargetError("Give a Region either a mask or a box, not both.")
        mask = region.mask
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TargetTypeError(
                    f"A Region mask must be a bool tensor (N, *spatial) on the output grid; got "
                    f"{what}. Use mask > 0.5 or mask.bool()."
                )
            if mask.ndim < 2 or mask.shape[0] != self.n:
                raise TargetError(
                    f"A Region mask needs one row per sample, (N={self.n}, *spatial) or "
                    f"(N, K, *spatial); got shape {tuple(mask.shape)}."
                )
        box = region.box
        if box is not None:
            box = torch.as_tensor(box) if not isinstance(box, torch.Tensor) else box.detach()
            if box.is_floating_point() or box.dtype == torch.bool or box.is_complex():
                raise TargetTypeError(
                    f"A Region box holds integer output-grid pixels; got dtype {box.dtype}."
                )
            if box.ndim == 2:
                box = box.expand(self.n, -1, -1)
            if box.ndim != 3 or box.shape[0] != self.n or box.shape[2] != 2:
                raise TargetError(
                    f"A Region box is (start, stop) per output axis, shape (rank, 2) or "
                    f"(N={self.n}, rank, 2); got {tuple(box.shape)}."
                )
            box = box.to("cpu", torch.long)
        ignore = list(region.ignore) if isinstance(region.ignore, Sequence) else [region.ignore]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ignore):
            raise TargetTypeError(
                f"Region ignore lists class indices (ints >= 0); got {region.ignore!r}."
            )
        self.region = Region(None, mask, box, ignore)

    def _check_nonnegative(self) -> None:
        assert self._indices is not None
        if self._indices.numel() and int(self._indices.min()) < 0:
            raise TargetError(f"Target class indices must be >= 0; got {int(self._indices.min())}.")

    def resolve(self, scores: torch.Tensor) -> ResolvedTargets:
        """Fix the targets against the ``(N, C)`` scores of the unperturbed batch."""
        if scores.shape[0] != self.n:
            raise TargetError(
                f"The model returned {scores.shape[0]} rows of scores for {self.n} samples."
            )
        check_finite_scores(scores)
        if self.function is not None:
            raw = self.function(scores)
            _check_attached(raw, scores)
            self.multi = isinstance(raw, torch.Tensor) and raw.ndim == 2
            probe = _checked_scores(raw, scores.shape[0], None)
            self.resolved = ResolvedTargets(None, probe.shape[1], self.function)
            return self.resolved
        if scores.ndim > 2:
            self.resolved = self._resolve_region(scores)
            return self.resolved
        if self.region is not None:
            raise TargetError(
                f"A Region target needs segmentation outputs (N, classes, *spatial); the model "
                f"returned {tuple(scores.shape)}. Use class indices."
            )
        if scores.ndim != 2:
            raise TargetError(
                f"Class targets need model outputs of shape (N, classes); got "
                f"{tuple(scores.shape)}. Pass a callable target that reduces the outputs to a "
                f"score per sample."
            )
        classes = scores.shape[1]
        if self._all:
            indices = torch.arange(classes, device=scores.device).expand(self.n, classes)
        elif self._indices is None:
            indices = scores.detach().argmax(dim=1, keepdim=True)
        else:
            indices = self._checked_indices(classes, scores.device)
        self.resolved = ResolvedTargets(indices.contiguous(), indices.shape[1])
        return self.resolved

    def _checked_indices(self, classes: int, device: torch.device) -> torch.Tensor:
        assert self._indices is not None
        largest = int(self._indices.max())
        if largest >= classes:
            raise TargetError(
                f"Target class {largest} is out of range: the model has {classes} outputs "
                f"(valid classes are 0..{classes - 1})."
            )
        return self._indices.to(device)

    def _resolve_region(self, scores: torch.Tensor) -> ResolvedTargets:
        """Targets on ``(N, C, *spatial)`` outputs: classes and ``(N, K, *spatial)`` regions."""
        region = self.region or Region()
        n, classes, spatial = scores.shape[0], scores.shape[1], tuple(scores.shape[2:])
        if self._all:
            raise TargetError(
                "targets='all' is not defined for segmentation outputs (most classes are "
                "predicted nowhere); list the classes: Region([...], mask=...)."
            )
        predicted = scores.detach().argmax(dim=1)  # (N, *spatial)
        if self._indices is None:  # the predicted class with the largest area
            area = torch.zeros(n, classes, device=scores.device)
            pixels = predicted.flatten(1)
            area.scatter_add_(1, pixels, torch.ones_like(pixels, dtype=area.dtype))
            ignore = [c for c in region.ignore if 0 <= c < classes]
            area[:, ignore] = -1
            indices = area.argmax(dim=1, keepdim=True)
            if bool((area.gather(1, indices) <= 0).any()):
                raise TargetError(
                    f"No class outside ignore={list(region.ignore)} is predicted anywhere in "
                    f"sample {int((area.amax(1) <= 0).nonzero()[0])}; name the class to explain."
                )
        else:
            indices = self._checked_indices(classes, scores.device)
        k, ones = indices.shape[1], (1,) * len(spatial)
        if region.mask is not None:
            mask = region.mask.to(scores.device)
            if mask.ndim == len(spatial) + 1:
                mask = mask.unsqueeze(1)
            if tuple(mask.shape[2:]) != spatial or mask.shape[1] not in (1, k):
                raise TargetError(
                    f"A Region mask must be (N, *spatial) or (N, K={k}, *spatial) on the model's "
                    f"output grid {spatial}; got {tuple(region.mask.shape)}."
                )
            where = mask.expand(n, k, *spatial)
        elif region.box is not None:
            where = _box_region(region.box, spatial).to(scores.device).unsqueeze(1)
            where = where.expand(n, k, *spatial)
        else:  # where the model predicts each target class
            where = predicted.unsqueeze(1) == indices.view(n, k, *ones)
        empty = (~where.flatten(2).any(-1)).nonzero()
        if len(empty):
            i, j = (int(v) for v in empty[0])
            raise TargetError(
                f"The region of target class {int(indices[i, j])} in sample {i} is empty (the "
                f"model predicts it nowhere, or the mask/box is empty); explain another class or "
                f"give a mask or box."
            )
        return ResolvedTargets(indices.contiguous(), k, region=where.contiguous())


def _box_region(box: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(N, *spatial)`` bool masks of ``(N, rank, 2)`` half-open boxes, checked on the grid."""
    if box.shape[1] != len(spatial):
        raise TargetError(
            f"A Region box needs (start, stop) for each of the {len(spatial)} output axes "
            f"{spatial}; got {box.shape[1]}."
        )
    size = torch.tensor(spatial)
    start, stop = box[..., 0], box[..., 1]
    if bool(((start < 0) | (stop > size) | (start >= stop)).any()):
        raise TargetError(
            f"Region boxes must satisfy 0 <= start < stop <= size per axis on the output grid "
            f"{spatial}; got {box.tolist()}."
        )
    mask = torch.ones(box.shape[0], *spatial, dtype=torch.bool)
    for axis, length in enumerate(spatial):
        u = torch.arange(length)
        inside = (u >= start[:, axis, None]) & (u < stop[:, axis, None])  # (N, length)
        shape = [box.shape[0]] + [1] * len(spatial)
        shape[1 + axis] = length
        mask = mask & inside.view(shape)
    return mask


def _checked_scores(result: Any, rows: int, count: int | None) -> torch.Tensor:
    """A callable target's result as ``(rows, K)``, or a :class:`TargetError` saying what is off."""
    if not isinstance(result, torch.Tensor):
        raise TargetError(
            f"A callable target must return a tensor of scores; got {type(result).__name__}."
        )
    if result.ndim == 1:
        result = result.unsqueeze(1)
    if result.ndim != 2 or result.shape[0] != rows:
        raise TargetError(
            f"A callable target must return shape (B,) or (B, K) for {rows} rows of outputs; "
            f"got {tuple(result.shape)}."
        )
    if count is not None and result.shape[1] != count:
        raise TargetError(
            f"The callable target returned {result.shape[1]} scores per row, but {count} on the "
            f"unperturbed batch: it must return the same number every time."
        )
    return result


def check_finite_scores(scores: torch.Tensor) -> None:
    """Raise :class:`NonFiniteScoresError` when any sample's scores hold NaN or an infinity.

    Every map would be NaN or meaningless (occlusion subtracts scores, gradients of an overflowed
    score are NaN), so the first forward pass stops the explanation instead.
    """
    finite = torch.isfinite(scores.detach()).reshape(scores.shape[0], -1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise NonFiniteScoresError(
            f"The model returned NaN or infinite scores for {len(bad)} of {scores.shape[0]} "
            f"sample(s) (sample {shown}); no explanation of them means anything. Check the "
            f"inputs' scale and normalisation (e.g. pixel values in 0..255 where the model was "
            f"trained on 0..1, or huge values that overflow inside the network), and the model's "
            f"weights and normalisation statistics (NaN weights, BatchNorm running_var <= 0)."
        )


def _check_int64(value: int) -> None:
    if not -(2**63) <= value < 2**63:
        raise TargetError(
            f"Target class {value} does not fit in a 64-bit integer; class indices are small "
            f"non-negative ints (0 .. number of outputs - 1)."
        )


def _check_attached(result: Any, scores: torch.Tensor) -> None:
    """A callable target computed under autograd must stay in the graph of ``scores``: a result
    detached from it gives gradient methods zero or no gradients, i.e. blank maps."""
    if (
        isinstance(result, torch.Tensor)
        and torch.is_grad_enabled()
        and scores.requires_grad
        and not result.requires_grad
    ):
        raise TargetError(
            "The callable target returned a tensor detached from the model's outputs (it does "
            "not require grad although the outputs do), so gradient methods would get no "
            "gradients. Compute the scores from the given outputs with differentiable torch "
            "operations, without .detach(), .item(), .numpy(), torch.no_grad() or new tensors."
        )
