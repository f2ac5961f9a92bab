"""``audit()``: look for shortcuts, places that hold a class's attribution across a dataset.

A model that learned a shortcut (a burned-in marker, a text label, a ruler, the border of one
hospital's scanner) puts the attribution of a class on the same spot in image after image,
wherever the real findings are. The audit explains every image with a local method, in batches
streamed from the data, and per class looks for regions of any size and place that hold a
disproportionate share of the class's attribution:

1. the positive part of each image's map (the evidence for the class, in the method's units) is
   averaged over the class's images; divided by its sum it is the class's share map ``P_c``,
   the share of the class's attribution on each pixel (images with more evidence weigh more, so
   images where the model sees nothing of the class add little noise);
2. a *reference* says which share is expected where, and the rest is unexplained, ``U_c``:

   * ``"masks"`` (where the evidence lies in each image, e.g. lesion outlines): attribution inside
     an image's mask, widened by ``mask_margin`` pixels, is expected; ``U_c`` is ``P_c`` counted
     outside the masks only;
   * ``"uniform"``: attribution spread evenly, ``U_c = max(P_c - 1 / pixels, 0)``;
   * ``"classes"``: the other classes, ``U_c = max(P_c - R_c, 0)`` with ``R_c`` the mean share
     map of the other classes: only what is specific to the class counts;
   * ``"auto"`` (default): masks for the classes whose images have some, uniform otherwise.
     Not ``"classes"``: a model that decides "sick" from a marker's presence decides "normal"
     from its absence, and local maps of every class then point at the same corner; subtracting
     the other classes would hide exactly that shortcut (docs/audit.md shows it on the demo).
     Every flag still reports the share the other classes put in its box;
3. regions are the connected sets of pixels whose unexplained share is at least ``min_lift``
   times a uniform share (``1 / pixels``); each becomes a box. Nothing assumes where they are or
   how large (a region holding such shares covers at most ``1 / min_lift`` of the image);
4. a box is flagged when it holds at least ``min_share`` of the class's attribution that the
   reference does not account for, and at least ``min_fraction`` of the class's images put
   ``min_lift`` times a uniform share of their own attribution on one of its pixels (outside
   their masks, with masks): the spot is consistent across images, not a few images' peaks.

A flag is a place to look at, not proof of a shortcut: see docs/audit.md for what the audit can
and cannot tell.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.adapters import torch_module_of
from xai_core.core.api import run_explainer, runnable
from xai_core.core.errors import ExecutorError, InputError, OptionError, did_you_mean
from xai_core.core.executors import DEFAULT_ENGINE, Executor, Partial, parts, run
from xai_core.core.explanation import normalize
from xai_core.core.progress import ProgressFn
from xai_core.core.tags import Scope
from xai_core.io.outputs import (
    RunLedger,
    atomic_open,
    content_digest,
    module_digest,
    request_key,
)
from xai_core.workflows.datasets import ClassMaps, DataStream, batch_targets, is_ray_dataset

REFERENCES = ("auto", "masks", "uniform", "classes")


@dataclass(frozen=True)
class Flag:
    """A region that concentrates one class's attribution across its images.

    ``box`` is ``(left, top, right, bottom)`` in input pixels, ``right`` and ``bottom`` exclusive
    (``image[top:bottom, left:right]``). ``share`` is the class's mean share of attribution
    inside the box; ``unexplained`` the part of it the reference does not account for, and
    ``reference_share`` what the reference puts there (the area's share for ``"uniform"``, the
    share lying on the masks for ``"masks"``, the other classes' mean share for ``"classes"``).
    ``other_classes_share`` is the other classes' mean share in the box whatever the reference
    (``None`` without another class): close to ``share``, the whole model looks there.
    ``images`` of the ``class_images`` put a concentrated share of their own attribution there.
    """

    class_index: int
    class_name: str
    box: tuple[int, int, int, int]
    share: float
    unexplained: float
    reference: str
    reference_share: float
    other_classes_share: float | None
    area: float  # the box's fraction of the image
    images: int
    class_images: int

    @property
    def lift(self) -> float:
        """How many times its area's share of the attribution the box holds."""
        return self.share / self.area

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_index,
            "class_name": self.class_name,
            "box": list(self.box),
            "share": self.share,
            "unexplained": self.unexplained,
            "reference": self.reference,
            "reference_share": self.reference_share,
            "other_classes_share": self.other_classes_share,
            "area": self.area,
            "lift": self.lift,
            "images": self.images,
            "class_images": self.class_images,
        }


@dataclass
class AuditResult:
    """Flags, the per-class maps they come from, and how the audit was run.

    Per-class tensors are ``(C, H, W)`` float32 on the CPU: ``mean`` and ``std`` of the normalised
    maps (what ``aggregate`` gives), ``share`` the mean share map ``P_c``, ``unexplained`` the
    share the reference does not account for, ``mean_image`` the mean input (channel mean).
    """

    method: str
    class_names: list[str]
    flags: list[Flag]
    counts: list[int]  # images per class
    mean: torch.Tensor
    std: torch.Tensor
    share: torch.Tensor
    unexplained: torch.Tensor
    mean_image: torch.Tensor
    references: list[str]
    skipped_classes: dict[str, str] = field(default_factory=dict)
    images: int = 0
    without_attribution: int = 0  # images whose map had no positive value
    failed: dict[str, str] = field(default_factory=dict)  # unreadable files
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: int = 0  # images whose batches a rerun took from the saved sum (resume=)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: flags, counts, settings (no maps)."""
        return {
            "method": self.method,
            "images": self.images,
            "without_attribution": self.without_attribution,
            "classes": [
                {"class": c, "name": name, "images": n, "reference": ref}
                for c, (name, n, ref) in enumerate(
                    zip(self.class_names, self.counts, self.references, strict=True)
                )
            ],
            "flags": [f.as_dict() for f in self.flags],
            "skipped_classes": self.skipped_classes,
            "failed": self.failed,
            "settings": self.settings,
            "seconds": self.seconds,
            "resumed": self.resumed,
        }

    def summary(self) -> str:
        """The flags as a Markdown table (or a sentence saying there are none)."""
        if not self.flags:
            return f"No region flagged ({self.images} images, method {self.method})."
        lines = [
            "| class | box (left, top, right, bottom) | share | unexplained | reference | images |",
            "| --- | --- | ---: | ---: | --- | ---: |",
        ]
        for f in self.flags:
            lines.append(
                f"| {f.class_name} | {f.box} | {f.share:.2f} | {f.unexplained:.2f} | "
                f"{f.reference} | {f.images} / {f.class_images} |"
            )
        return "\n".join(lines)


@dataclass
class _Sums:
    """What the audit accumulates per class while it streams (all ``ClassMaps``).

    Partial sums over parts of the data merge with ``+`` into the sums over all of it (the
    executor's reduce, see :mod:`xai_core.core.executors`).
    """

    maps: ClassMaps  # normalised maps: mean and spread, as `aggregate` gives them
    positive: ClassMaps  # positive part of the raw maps: their class mean gives P_c
    hits: ClassMaps  # 1 where an image's own share >= min_lift / pixels (sums: images per pixel)
    image: ClassMaps  # inputs, channel mean, for display
    off: ClassMaps | None = None  # the positive part outside the widened mask
    off_hits: ClassMaps | None = None  # hits outside the widened mask
    masked: torch.Tensor | None = None  # (C,) images with a non-empty mask
    without: int = 0  # images whose map had no positive value

    def __add__(self, other: _Sums) -> _Sums:
        if (self.off is None) != (other.off is None):
            raise InputError("Masks were given for some batches but not for others.")

        def both(a: Any, b: Any) -> Any:
            return None if a is None else a + b.to(a.device) if torch.is_tensor(a) else a + b

        return _Sums(
            maps=self.maps + other.maps,
            positive=self.positive + other.positive,
            hits=self.hits + other.hits,
            image=self.image + other.image,
            off=both(self.off, other.off),
            off_hits=both(self.off_hits, other.off_hits),
            masked=both(self.masked, other.masked),
            without=self.without + other.without,
        )

    def __iadd__(self, other: _Sums) -> _Sums:
        """In place, for a running reduce: one set of sums in memory, as before executors."""
        if (self.off is None) != (other.off is None):
            raise InputError("Masks were given for some batches but not for others.")
        for name in ("maps", "positive", "hits", "image", "off", "off_hits"):
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name)
        if self.masked is not None:
            self.masked += other.masked.to(self.masked.device)
        self.without += other.without
        return self


@dataclass
class _AuditStep:
    """One batch of the audit: explained, then summed per class (a picklable step)."""

    info: Any
    adapter: Any
    options: dict[str, Any]
    group_by: str
    reference: str
    class_names: Sequence[str] | None
    min_lift: float
    mask_margin: int | None

    def __call__(self, batch: Any) -> Partial:
        if batch.inputs.ndim != 4:
            raise InputError(
                f"The audit works on 2D images (N, C, H, W); got {tuple(batch.inputs.shape)}."
            )
        if self.reference == "masks" and batch.masks is None:
            raise OptionError("reference='masks' needs masks: pass masks=... or (x, y, masks).")
        targets = batch_targets(batch, self.group_by)
        exp = run_explainer(self.info, self.adapter, batch.inputs, targets, self.options)
        if len(exp.raw) > 1 or exp.full.shape[1] != 1:
            raise OptionError("The audit explains one class and one layer per image.")
        raw = exp.full[:, 0, 0]  # (B, H, W) on the input grid
        classes = exp.targets[:, 0]
        # Each batch tells the number of classes and the image size; parts of another size
        # refuse to merge.
        names = _class_names(self.class_names, exp.scores.shape[1])
        sums = _new_sums(len(names), raw.shape[1:], raw.device, batch.masks)
        margin = (
            self.mask_margin if self.mask_margin is not None else round(0.05 * max(raw.shape[1:]))
        )
        sums.without = _accumulate(sums, batch, raw, classes, self.min_lift, margin)
        return Partial(sums, len(batch))


def audit(
    model: Any,
    data: Any,
    *,
    method: str = "gradcam",
    options: dict[str, Any] | None = None,
    group_by: str = "auto",
    labels: torch.Tensor | Sequence[int] | None = None,
    masks: Any = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 32,
    preprocess: Any = None,
    reference: str = "auto",
    min_share: float = 0.2,
    min_lift: float = 5.0,
    min_fraction: float = 0.5,
    min_images: int = 5,
    mask_margin: int | None = None,
    progress: ProgressFn | None = None,
    engine: str | Executor = DEFAULT_ENGINE,
    resume: str | os.PathLike | None = None,
    checkpoint_every: float = 30.0,
) -> AuditResult:
    """Explain every image of ``data`` and flag regions that hold a class's attribution.

    :param model: anything :func:`xai_core.explain` accepts.
    :param data: a ``(N, C, H, W)`` tensor, ``(x, y)`` or ``(x, y, masks)``, a folder or list of
        image files, a DataLoader / iterable yielding ``x``, ``(x, y)`` or ``(x, y, masks)``, or a
        :class:`~xai_core.workflows.datasets.DataStream` of any of those; streamed in batches on the
        model's device. Also a Ray Data ``Dataset`` of rows (``image``, optional ``label``,
        ``mask``, ``id`` columns): with ``engine="ray"`` Ray Data runs the batches
        (docs/scale.md).
    :param method: the local method that explains each image (``gradcam``, ``occlusion``...).
    :param options: that method's options, e.g. ``{"window": 8}`` for occlusion.
    :param group_by: the class each image is audited under: ``"label"``, ``"prediction"``, or
        ``"auto"`` (labels when the data has them, else the prediction).
    :param labels: class indices for tensor data (or inside ``data``).
    :param masks: where each image's class evidence lies, ``(N, H, W)`` bool for tensor data or
        a folder of mask files for file data (an image without evidence has an empty mask).
    :param reference: what share is expected where: ``"auto"``, ``"masks"``, ``"uniform"`` or
        ``"classes"`` (see the module documentation).
    :param class_names: names for the report; default ``"0"``, ``"1"``...
    :param batch_size: images per batch (a DataLoader keeps its own).
    :param preprocess: see :class:`~xai_core.workflows.datasets.DataStream`.
    :param min_share: smallest unexplained share of a class's attribution a flagged box holds.
    :param min_lift: how many times a uniform share a pixel must hold to be part of a region.
    :param min_fraction: smallest fraction of a class's images that must concentrate their own
        attribution on the region.
    :param min_images: classes with fewer images are not audited (listed as skipped).
    :param mask_margin: pixels by which masks are widened (maps are smoother than lesions);
        default 5% of the image's larger side.
    :param progress: ``progress(images_done, images_total_or_None, what)`` after each batch
        (:mod:`xai_core.core.progress`), and within a batch when the method reports its own work
        (occlusion's perturbed inputs).
    :param engine: where the batches are explained: an executor's name (``"local"``, this
        process, the default; plugins add others) or an executor (:mod:`xai_core.core.executors`).
    :param resume: a folder (``xai audit --out``) where the sum of the finished batches is kept
        (under ``.xai-run/``): a rerun with the same folder, model, method, options and data skips
        the batches it holds, and gives the result of an uninterrupted run, bitwise; anything
        else starts again. ``min_share``, ``min_fraction``, ``min_images`` and ``reference``
        act after the sums: changing them reuses every batch.
    :param checkpoint_every: with ``resume``, seconds between saves of the sum (0: after every
        batch); a kill costs at most the batches of that time. Ctrl-C saves before it stops.
    """
    _check_settings(group_by, reference, min_share, min_lift, min_fraction, min_images, mask_margin)
    if not isinstance(checkpoint_every, int | float) or not checkpoint_every >= 0:
        raise OptionError(f"checkpoint_every must be seconds >= 0; got {checkpoint_every!r}.")
    info, adapter = runnable(
        method,
        model,
        scope=Scope.LOCAL,
        wrong_scope="the audit aggregates a local one itself (e.g. 'gradcam' or 'occlusion').",
    )
    options = dict(options or {})
    if isinstance(data, DataStream):  # built by the caller, e.g. with a DICOM window
        stream = data
        stream.device = adapter.device
    else:
        stream = DataStream(
            data,
            batch_size=batch_size,
            device=adapter.device,
            preprocess=preprocess,
            labels=labels,
            masks=masks,
        )
    start = time.perf_counter()
    step = _AuditStep(
        info, adapter, options, group_by, reference, class_names, min_lift, mask_margin
    )
    what, resumed = f"{method}: images", 0
    if resume is None:
        merged = run(engine, step, stream, total=stream.total, progress=progress, what=what)
    else:
        from xai_core import __version__  # the package's version, set before any import

        request = {
            "model": model_fingerprint(adapter),
            "method": method,
            "plugin": info.distribution or info.plugin,
            "plugin_version": info.version,
            "core_version": __version__,
            "options": {k: repr(v) for k, v in sorted(options.items())},
            "group_by": group_by,
            "class_names": None if class_names is None else [str(n) for n in class_names],
            "min_lift": min_lift,
            "mask_margin": mask_margin,
        }
        merged, resumed = _run_resumable(
            engine, step, stream, Path(resume).absolute(), request,
            every=checkpoint_every, progress=progress, what=what,
        )  # fmt: skip
    if merged is None:
        raise InputError("The dataset is empty: no batch came out of it.")
    sums, done, without = merged.value, merged.images, merged.value.without
    names = _class_names(class_names, sums.maps.num_classes)
    result = _find_flags(sums, names, reference, min_share, min_lift, min_fraction, min_images)
    result.method = method
    result.images = done
    result.without_attribution = without
    result.failed = dict(stream.failed)
    result.resumed = resumed
    result.settings = {
        "method": method,
        "options": {k: repr(v) for k, v in options.items()},
        "group_by": group_by,
        "reference": reference,
        "masks": sums.off is not None,
        "min_share": min_share,
        "min_lift": min_lift,
        "min_fraction": min_fraction,
        "min_images": min_images,
        "mask_margin": mask_margin,
    }
    result.seconds = time.perf_counter() - start
    return result


def _check_settings(
    group_by, reference, min_share, min_lift, min_fraction, min_images, mask_margin
) -> None:
    if group_by not in ("auto", "label", "prediction"):
        raise OptionError(
            f"group_by must be 'auto', 'label' or 'prediction'; got {group_by!r} (the audit "
            f"counts each image for one class)."
        )
    if reference not in REFERENCES:
        raise OptionError(
            f"reference must be one of {REFERENCES}; got {reference!r}."
            f"{did_you_mean(str(reference), REFERENCES)}"
        )
    for name, value, low, high in (
        ("min_share", min_share, 0.0, 1.0),
        ("min_fraction", min_fraction, 0.0, 1.0),
    ):
        if not isinstance(value, int | float) or not low < value <= high:
            raise OptionError(f"{name} must be in ({low}, {high}]; got {value!r}.")
    if not isinstance(min_lift, int | float) or not math.isfinite(min_lift) or min_lift <= 1:
        raise OptionError(f"min_lift must be a number > 1 (times uniform); got {min_lift!r}.")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
        raise OptionError(f"min_images must be a positive int; got {min_images!r}.")
    if mask_margin is not None and (not isinstance(mask_margin, int) or mask_margin < 0):
        raise OptionError(f"mask_margin must be an int >= 0 (pixels); got {mask_margin!r}.")


def _class_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [str(c) for c in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise OptionError(f"Got {len(names)} class names for a model with {count} outputs.")
    return names


def _new_sums(classes: int, spatial: Sequence[int], device, masks) -> _Sums:
    def empty() -> ClassMaps:
        return ClassMaps.empty(classes, spatial, device)

    sums = _Sums(maps=empty(), positive=empty(), hits=empty(), image=empty())
    if masks is not None:
        sums.off, sums.off_hits = empty(), empty()
        sums.masked = torch.zeros(classes, dtype=torch.long, device=device)
    return sums


def _accumulate(
    sums: _Sums,
    batch: Any,
    raw: torch.Tensor,
    classes: torch.Tensor,
    min_lift: float,
    margin: int,
) -> int:
    """Add one batch; return how many of its maps had no positive attribution."""
    sums.maps.add(normalize(raw, 2), classes)
    sums.image.add(batch.inputs.mean(dim=1), classes)
    # Shares come from the evidence for the class, the positive part of the raw map: min-max
    # normalisation would lift a signed map's zero (occlusion's "no effect") to a positive share.
    positive = raw.clamp(min=0)
    sums.positive.add(positive, classes)
    totals = positive.flatten(1).sum(dim=1).view(-1, 1, 1)
    own_share = torch.where(totals > 0, positive / totals.clamp(min=1e-30), 0)
    hot = own_share * positive[0].numel() >= min_lift
    sums.hits.add(hot.to(positive.dtype), classes)
    if sums.off is not None:
        if batch.masks is None:
            raise InputError("Masks were given for some batches but not for others.")
        # Maps are smoother than lesions: attribution just around a lesion is still on it.
        widened = F.max_pool2d(batch.masks[:, None].float(), 2 * margin + 1, 1, margin)[:, 0]
        outside = widened == 0
        sums.off.add(positive * outside, classes)
        sums.off_hits.add((hot & outside).to(positive.dtype), classes)
        has_mask = batch.masks.flatten(1).any(dim=1)
        sums.masked.index_add_(0, classes[has_mask], torch.ones_like(classes[has_mask]))
    return int((totals.flatten() == 0).sum())


def _find_flags(
    sums: _Sums,
    names: list[str],
    reference: str,
    min_share: float,
    min_lift: float,
    min_fraction: float,
    min_images: int,
) -> AuditResult:
    from scipy import ndimage  # scipy comes with scikit-image; imported when flags are sought

    mean_positive = sums.positive.mean.cpu()  # (C, H, W) float64
    totals = mean_positive.flatten(1).sum(dim=1).view(-1, 1, 1)
    share = torch.where(totals > 0, mean_positive / totals.clamp(min=1e-300), 0)
    counts = sums.positive.counts.cpu()
    pixels = share[0].numel()
    skipped = {}
    for c, name in enumerate(names):
        if 0 < int(counts[c]) < min_images:
            skipped[name] = f"{int(counts[c])} image(s), fewer than min_images={min_images}"
        elif int(counts[c]) > 0 and float(totals[c]) == 0:
            skipped[name] = "no positive attribution in any of its images"
    audited = [c for c in range(len(names)) if int(counts[c]) > 0 and names[c] not in skipped]
    unexplained = torch.zeros_like(share)
    references = ["none"] * len(names)
    flags: list[Flag] = []
    for c in audited:
        others = [o for o in audited if o != c]
        kind, expected, hits = _reference(sums, c, reference, share, totals, others)
        references[c] = kind
        unexplained[c] = (share[c] - expected).clamp(min=0)
        regions, _ = ndimage.label(
            (unexplained[c] * pixels >= min_lift).numpy(), structure=np.ones((3, 3))
        )
        needed = max(1, math.ceil(min_fraction * int(counts[c])))
        for index, (rows, cols) in enumerate(ndimage.find_objects(regions), start=1):
            images = int(hits[torch.from_numpy(regions == index)].max())
            free = float(unexplained[c][rows, cols].sum())
            if free < min_share or images < needed:
                continue
            flags.append(
                Flag(
                    class_index=c,
                    class_name=names[c],
                    box=(cols.start, rows.start, cols.stop, rows.stop),
                    share=float(share[c][rows, cols].sum()),
                    unexplained=free,
                    reference=kind,
                    reference_share=float(expected[rows, cols].sum()),
                    other_classes_share=(
                        float(share[others][:, rows, cols].sum(dim=(1, 2)).mean())
                        if others
                        else None
                    ),
                    area=(rows.stop - rows.start) * (cols.stop - cols.start) / pixels,
                    images=images,
                    class_images=int(counts[c]),
                )
            )
    flags.sort(key=lambda f: -f.unexplained)
    return AuditResult(
        method="",
        class_names=names,
        flags=flags,
        counts=[int(n) for n in counts],
        mean=sums.maps.mean.float().cpu(),
        std=sums.maps.std.float().cpu(),
        share=share.float(),
        unexplained=unexplained.float(),
        mean_image=sums.image.mean.float().cpu(),
        references=references,
        skipped_classes=skipped,
    )


def _reference(
    sums: _Sums,
    c: int,
    reference: str,
    share: torch.Tensor,
    totals: torch.Tensor,
    others: list[int],
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The reference used for class ``c``: its name, expected share map, and hit counts."""
    masked = sums.masked is not None and int(sums.masked[c]) > 0
    if reference in ("auto", "masks") and masked:
        # The share lying on the (widened) masks is expected: the difference is what lies off them.
        on_evidence = share[c] - sums.off.mean[c].cpu() / totals[c]
        return "masks", on_evidence, sums.off_hits.sums[c].cpu()
    hits = sums.hits.sums[c].cpu()
    if reference == "classes" and others:
        return "classes", share[others].mean(dim=0), hits
    return "uniform", torch.full_like(share[c], 1 / share[c].numel()), hits


# -- resume: the running sum saved under the output folder --------------------------------------
#
# The reduce adds the batches' parts in batch order, one running sum. With ``resume=DIR`` the
# sum of the first k batches is saved under DIR/.xai-run/ (written atomically, then recorded in
# the folder's RunLedger, the one `xai explain` keeps), with the key of each batch it holds: a
# digest of the request (model, method, options...) and of the batch's tensors as read and
# preprocessed. A rerun reads the data again; when its first k batches have those keys, it
# loads the sum and explains only the batches after them. Adding the rest to it repeats the
# additions of an uninterrupted run in the same order: the result is bitwise the same.

RESUME_KEY = "audit"  # the ledger entry of the saved sum


def model_fingerprint(adapter: Any) -> dict[str, Any]:
    """What identifies the model's weights, for resume keys: a digest of a PyTorch module's
    parameters and buffers, of an ONNX model's file or bytes, or of the pickled adapter."""
    module = torch_module_of(adapter)
    if module is not None:
        return module_digest(module)
    source = getattr(adapter, "_source", None)  # an ONNX adapter's path or bytes
    if isinstance(source, str | os.PathLike) and Path(source).is_file():
        return {"file": content_digest(source)}
    if isinstance(source, bytes | bytearray):
        return {"bytes": hashlib.sha256(source).hexdigest()}
    try:
        return {"pickle": hashlib.sha256(pickle.dumps(adapter)).hexdigest()}
    except Exception as exc:
        raise OptionError(
            f"resume= needs a model it can identify (a PyTorch module, an ONNX file or bytes, or "
            f"a picklable adapter); this {type(adapter).__name__} is none of those ({exc})."
        ) from exc


def _batch_key(request: str, batch: Any) -> str:
    digest = hashlib.sha256(request.encode())
    for tensor in (batch.inputs, batch.labels, batch.masks):
        if tensor is None:
            digest.update(b"-")
            continue
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}{flat.dtype}".encode())
        digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class _KeyedStep:
    """The audit's step on ``(key, batch)``: the part comes back with its batch's key."""

    step: _AuditStep

    def __call__(self, item: tuple[str, Any]) -> Partial:
        key, batch = item
        part = self.step(batch)
        return Partial((key, part.value), part.images)


_MAPS = ("maps", "positive", "hits", "image", "off", "off_hits")


def _state(total: Partial) -> dict[str, Any]:
    """The running sum as tensors, numbers and strings only (loaded with weights_only=True)."""
    sums = total.value
    state: dict[str, Any] = {"images": total.images, "without": sums.without}
    for name in _MAPS:
        maps = getattr(sums, name)
        state[name] = None if maps is None else {
            "sums": maps.sums.cpu(), "squares": maps.squares.cpu(), "counts": maps.counts.cpu()
        }  # fmt: skip
    state["masked"] = None if sums.masked is None else sums.masked.cpu()
    return state


def _from_state(state: dict[str, Any], device: torch.device) -> Partial:
    def maps(name: str) -> ClassMaps | None:
        saved = state[name]
        if saved is None:
            return None
        return ClassMaps(*(saved[k].to(device) for k in ("sums", "squares", "counts")))

    masked = state["masked"]
    sums = _Sums(
        *(maps(name) for name in _MAPS),
        masked=None if masked is None else masked.to(device),
        without=int(state["without"]),
    )
    return Partial(sums, int(state["images"]))


def _reiterable(stream: DataStream) -> bool:
    data = stream.data
    if isinstance(data, torch.Tensor) or stream._files or is_ray_dataset(data):  # read again
        return True
    return iter(data) is not data


def _run_resumable(
    engine: str | Executor,
    step: _AuditStep,
    stream: DataStream,
    folder: Path,
    request: dict[str, Any],
    *,
    every: float,
    progress: ProgressFn | None,
    what: str,
) -> tuple[Partial | None, int]:
    """The merged parts, as :func:`~xai_core.core.executors.run` gives them, with the running
    sum saved under ``folder`` as it grows; also how many images came from a saved sum."""
    if not _reiterable(stream):
        raise OptionError(
            "resume= reads the data again to recognise finished batches: pass a folder, files, "
            "a tensor or a DataLoader, not a one-shot iterator."
        )
    ledger = RunLedger(folder)
    request_id = request_key(request)
    record = ledger.record(RESUME_KEY) if ledger.done(RESUME_KEY, request_id) else None
    loaded = None if record is None else _load(folder / next(iter(record["outputs"])))
    saved: list[str] = list(record["record"]["batches"]) if loaded is not None else []
    state: dict[str, Any] = {"prefix": False}
    sent: deque[str] = deque()

    def pending() -> Iterator[tuple[str, Any]]:
        batches = iter(stream)
        if saved:
            for matched, batch in enumerate(batches, start=1):
                if _batch_key(request_id, batch) != saved[matched - 1]:
                    break
                if matched == len(saved):
                    state["prefix"] = True
                    break
            if not state["prefix"]:  # other data than the saved sum's: start again
                stream.failed.clear()
                batches = iter(stream)
            elif progress:
                progress(int(loaded["images"]), stream.total, f"{what} (done before)")
        for batch in batches:
            key = _batch_key(request_id, batch)
            sent.append(key)
            yield key, batch

    def start() -> tuple[Partial | None, list[str]]:
        if not state["prefix"]:
            return None, []
        return _from_state(loaded, step.adapter.device), list(saved)

    total: Partial | None = None
    keys: list[str] = []
    started, last = False, time.monotonic()
    try:
        for part in parts(engine, _KeyedStep(step), pending()):
            if not started:
                total, keys = start()
                started = True
            key, sums = part.value
            if key != sent.popleft():
                raise ExecutorError(
                    "resume= needs an executor that yields the parts in batch order; this one "
                    "did not. Run without resume, or use the local or ray engine."
                )
            if total is None:
                total = Partial(sums, part.images)
            else:
                total += Partial(sums, part.images)
            keys.append(key)
            if progress:
                progress(total.images, stream.total, what)
            if time.monotonic() - last >= every:
                _save(ledger, request_id, total, keys)
                last = time.monotonic()
    except KeyboardInterrupt:  # Ctrl-C: keep what is merged, for the next run
        if total is not None and keys and len(keys) > len(saved):
            _save(ledger, request_id, total, keys)
        raise
    if not started:  # nothing left to explain
        total, keys = start()
    if total is not None and keys != saved:
        _save(ledger, request_id, total, keys)
    resumed = int(loaded["images"]) if state["prefix"] else 0
    return total, resumed


def _load(path: Path) -> dict[str, Any] | None:
    """A saved sum, or ``None`` when it cannot be read (damaged by something other than us:
    the batches are redone, never trusted)."""
    try:
        with open(path, "rb") as f:  # tensors only: never unpickles objects
            state = torch.load(f, map_location="cpu", weights_only=True)
        _from_state(state, torch.device("cpu"))  # every part there, of the right kind
    except Exception:
        return None
    return state


def _save(ledger: RunLedger, request_id: str, total: Partial, keys: list[str]) -> None:
    """The running sum, written atomically, then recorded; the sum it replaces, removed."""
    before = ledger.record(RESUME_KEY) or {}
    path = ledger.folder / f"audit-sums-{request_id}-{len(keys)}.pt"
    with atomic_open(path) as f:
        torch.save(_state(total), f)
    record = {"batches": keys, "images": total.images}
    ledger.mark_done(RESUME_KEY, record, outputs=[path], request=request_id)
    for name in before.get("outputs", {}):
        if ledger.root / name != path:
            with suppress(OSError):
                (ledger.root / name).unlink()
