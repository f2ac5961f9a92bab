"""Explaining a dataset batch by batch: data sources as batches, and per-class map statistics.

Global explanations and the audit read datasets that may not fit in memory, so both stream:

* :class:`DataStream` turns a data source into :class:`Batch` es on the model's device: an
  in-memory tensor (with labels and masks), a folder or list of image files (read with
  :func:`~xai_core.io.find_inputs` / :func:`~xai_core.io.read_item` and a
  :class:`~xai_core.io.Preprocess`), or any iterable such as a ``torch.utils.data.DataLoader``
  yielding ``x``, ``(x, y)`` or ``(x, y, masks)``. Only one batch is in memory at a time.
* A stream of files is read through a :class:`ReadPlan` (:meth:`DataStream.read_plan`):
  picklable :class:`ReadChunk` s of paths that can be read anywhere (a Ray worker, here), and
  the grouping of what they gave into the batches, from sizes alone, in file order. Iterating
  the stream here and an executor reading on its workers use the same plan: the same batches.
* A Ray Data ``Dataset`` of rows (``image``, optional ``label``, ``mask``, ``id`` columns) is
  turned into batches by :class:`RowBatches` (:meth:`DataStream.ray_dataset`): here by iterating
  it, or on Ray Data's own workers when the Ray engine runs ``map_batches`` over it.
* :class:`ClassMaps` keeps running per-class sums of maps, so a class's mean and spread (standard
  deviation) over a dataset come out of any number of batches. Two are merged with ``+``: the
  result is the same (up to rounding) as one pass over all the data, whatever the batching.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.api import check_masks, run_explainer, runnable
from xai_core.core.errors import InputError, MissingDependencyError, OptionError, XaiError
from xai_core.core.executors import DEFAULT_ENGINE, Executor, Partial, run
from xai_core.core.progress import ProgressFn
from xai_core.core.registry import get_registry
from xai_core.core.tags import Scope
from xai_core.io.inputs import InputItem, MaskFolder, find_inputs, read_item
from xai_core.io.preprocess import Preprocess

# progress(images done, images in all or None if unknown, what): xai_core.core.progress
Transform = Callable[[torch.Tensor], torch.Tensor]
PathLike = str | os.PathLike


@dataclass
class Batch:
    """One batch of a :class:`DataStream`, on the stream's device.

    ``inputs`` is ``(B, C, *spatial)``; ``labels`` ``(B,)`` class indices or ``None``; ``masks``
    ``(B, *spatial)`` bool (where each image's class evidence lies; all ``False`` for an image
    without any) or ``None``; ``keys`` names the files of a folder stream.
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    keys: list[str] | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class DataStream:
    """Batches from a data source, moved to ``device`` one at a time.

    :param data: one of

        * a ``(N, C, *spatial)`` tensor, or a tuple ``(x, y)`` / ``(x, y, masks)`` of tensors,
          cut into ``batch_size`` batches (``labels`` and ``masks`` may be passed separately);
        * a folder, a file, or a list of them: every PNG/JPEG/DICOM/NIfTI input found, read and
          preprocessed with ``preprocess`` (a :class:`~xai_core.io.Preprocess`), ``batch_size``
          at a time; ``masks`` may be a folder of masks named like the inputs (non-zero = region;
          an input without a mask file has an empty mask). Unreadable files are skipped and
          listed in :attr:`failed`;
        * any other iterable (a ``DataLoader``, a generator) yielding ``x``, ``(x, y)`` or
          ``(x, y, masks)``: used batch by batch as it comes, ``batch_size`` is not used;
        * a Ray Data ``Dataset`` of rows: an ``image`` column (each a ``(C, *spatial)`` array;
          ``(H, W)`` and channels-last ``(H, W, 1|3|4)`` images, as ``ray.data.read_images``
          gives, are told from the first row and moved to ``(C, H, W)``), optional ``label``
          (class index), ``mask`` (``(*spatial)``) and ``id`` columns (without ``id``, a
          ``path`` column names the rows; rename others with ``ds.rename_columns``);
          ``batch_size`` rows at a time. A row whose
          image or mask has another shape than the first row's is skipped and listed in
          :attr:`failed` (under its ``id``). Needs ``pyarrow`` (Ray Data's).

    :param preprocess: for tensors and iterables, a callable applied to each batch of inputs
        (e.g. normalisation), or a :class:`~xai_core.io.Preprocess` applied to each sample.
    :param window: DICOM window (centre, width) overriding the files' own.
    """

    data: Any
    batch_size: int = 32
    device: torch.device | str = "cpu"
    preprocess: Any = None
    labels: torch.Tensor | Sequence[int] | None = None
    masks: torch.Tensor | PathLike | None = None
    window: tuple[float, float] | None = None
    failed: dict[str, str] = field(default_factory=dict)
    _found: list[Any] | None = field(default=None, init=False, repr=False)
    _files: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise OptionError(f"batch_size must be a positive int; got {self.batch_size!r}.")
        if self.batch_size < 1:
            raise OptionError(f"batch_size must be a positive int; got {self.batch_size}.")
        self.device = torch.device(self.device)
        data = self.data
        if isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
            if len(data) not in (2, 3):
                raise InputError(
                    f"A tuple of tensors is (x, y) or (x, y, masks); got {len(data)} items."
                )
            if self.labels is not None or self.masks is not None:
                raise OptionError("Give labels and masks inside the tuple or as options, not both.")
            self.data, self.labels = data[0], data[1]
            self.masks = data[2] if len(data) == 3 else None
        if is_ray_dataset(self.data):
            if importlib.util.find_spec("pyarrow") is None:
                raise MissingDependencyError(
                    "A Ray Data Dataset needs pyarrow, which is not installed: pip install "
                    "'xai-core[ray]' (or: pip install pyarrow)."
                )
            if self.labels is not None or self.masks is not None:
                raise OptionError(
                    "A Ray Dataset holds its own labels and masks: 'label' and 'mask' columns."
                )
        self._files = _is_paths(self.data)
        if self._files and self.masks is not None and not isinstance(self.masks, str | os.PathLike):
            raise OptionError("With files as data, masks must be a folder of mask files.")
        if not self._files and isinstance(self.masks, str | os.PathLike):
            raise OptionError("A folder of masks goes with files as data; pass a mask tensor.")

    @property
    def total(self) -> int | None:
        """How many images the stream holds, when that is known before reading it."""
        if isinstance(self.data, torch.Tensor):
            return int(self.data.shape[0])
        if self._files:
            return len(self._items())
        if is_ray_dataset(self.data):
            return None  # counting may run the dataset's whole pipeline
        dataset = getattr(self.data, "dataset", None)  # a DataLoader: count its samples
        try:
            return len(dataset) if dataset is not None else None
        except TypeError:
            return None

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.data, torch.Tensor):
            yield from self._tensor_batches()
        elif self._files:
            yield from self._file_batches()
        elif is_ray_dataset(self.data):
            dataset, rows = self.ray_dataset()  # type: ignore[misc]
            for columns in dataset.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
                batch, failed = rows(columns)
                record_failures(self.failed, failed)
                if batch is not None:
                    yield batch
        elif isinstance(self.data, Iterable):
            if self.labels is not None or self.masks is not None:
                raise OptionError("An iterable yields its own labels and masks: (x, y, masks).")
            for item in self.data:
                yield self._batch(*_unpack(item))
        else:
            raise InputError(
                f"Cannot read a dataset from a {type(self.data).__name__}: pass a tensor, (x, y), "
                f"a folder or files, or an iterable of batches such as a DataLoader."
            )

    # -- sources -------------------------------------------------------------------------------

    def _tensor_batches(self) -> Iterator[Batch]:
        x = self.data
        n = int(x.shape[0])
        labels = None if self.labels is None else torch.as_tensor(self.labels)
        masks = self.masks
        for name, value in (("labels", labels), ("masks", masks)):
            if value is not None and int(value.shape[0]) != n:
                raise InputError(f"Got {int(value.shape[0])} {name} for {n} images.")
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)

            def cut(tensor: Any, part: slice = part) -> Any:
                # A copy, not a view: a pickled view carries its whole storage, so a batch
                # sent to a worker would carry every image of the tensor.
                return None if tensor is None else torch.as_tensor(tensor)[part].clone()

            yield self._batch(cut(x), cut(labels), cut(masks))

    def _items(self) -> list[Any]:
        if self._found is None:
            paths = [self.data] if isinstance(self.data, str | os.PathLike) else list(self.data)
            self._found = find_inputs(paths)
            if not self._found:
                raise InputError(f"No readable input files were found in {self.data}.")
        return self._found

    def read_plan(self, chunk_size: int | None = None) -> ReadPlan | None:
        """For a stream of files: how to read them in chunks anywhere (each a picklable
        :class:`ReadChunk`) and group what was read into this stream's batches (``None`` for
        tensors and iterables). An executor that reads on its workers uses it; iterating the
        stream uses it here, so both give the same batches. Unreadable files go to
        :attr:`failed` as their chunks are reported (:meth:`ReadPlan.add`)."""
        if not self._files:
            return None
        items = self._items()
        size = chunk_size or self.batch_size
        preprocess = self.preprocess if self.preprocess is not None else Preprocess()
        cwd = Path.cwd()  # a worker reads relative paths from the caller's folder
        chunks = [
            ReadChunk(items[i : i + size], preprocess, self.window, cwd)
            for i in range(0, len(items), size)
        ]
        masks = None
        if self.masks is not None:
            masks = MaskFolder(Path(self.masks).absolute(), items)
        return ReadPlan(chunks, self.batch_size, self.device, masks, self.failed)

    def ray_dataset(self) -> tuple[Any, RowBatches] | None:
        """For a Ray Data ``Dataset``: it, and the picklable :class:`RowBatches` that turns its
        numpy batches into this stream's; ``None`` for other data. An executor may run the
        conversion on Ray Data's workers (``map_batches``); it adds the failures to
        :attr:`failed`. Takes the dataset's first row (the shape every image must have)."""
        if not is_ray_dataset(self.data):
            return None
        first = self.data.take(1)
        shape = None
        if first:
            if "image" not in first[0]:
                raise InputError(
                    f"A Ray Dataset needs an 'image' column (one (C, *spatial) array per row); "
                    f"it has {sorted(first[0])}. Rename yours: ds.rename_columns({{...: 'image'}})."
                )
            shape = tuple(np.shape(first[0]["image"]))
        layout = "chw" if shape is None else image_layout(shape)
        rows = RowBatches(shape, self.batch_size, self.device, self.preprocess, layout)
        return self.data, rows

    def _file_batches(self) -> Iterator[Batch]:
        plan = self.read_plan()
        assert plan is not None
        held: dict[int, list[np.ndarray]] = {}  # what was read, until its batch is out
        for index, chunk in enumerate(plan.chunks):
            meta, held[index] = chunk()
            for spec in plan.add(index, meta):
                yield spec.build(*(held[c] for c in spec.chunks))
            for done in [c for c in held if c not in plan.open_chunks()]:
                del held[done]
        for spec in plan.finish():
            yield spec.build(*(held[c] for c in spec.chunks))

    # -- one batch -----------------------------------------------------------------------------

    def _batch(self, x: Any, y: Any = None, masks: Any = None, *, transform: bool = True) -> Batch:
        return _make_batch(x, y, masks, self.preprocess if transform else None, self.device)


def _make_batch(x: Any, y: Any, masks: Any, preprocess: Any, device: Any) -> Batch:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"A batch of inputs must be a tensor; got {type(x).__name__}.")
    if preprocess is not None:
        x = _prepare(preprocess, x)
    x = x.to(device, non_blocking=True)
    labels = None if y is None else _labels(y, x.shape[0]).to(device)
    if masks is not None:
        masks = check_masks(torch.as_tensor(masks), x).to(device)
    return Batch(x, labels, masks)


# -- a Ray Data Dataset: its numpy batches of rows as the core's batches ------------------------


def is_ray_dataset(data: Any) -> bool:
    """Whether ``data`` is a Ray Data ``Dataset`` (told without importing Ray)."""
    return any(
        cls.__name__ == "Dataset" and cls.__module__.startswith("ray.data")
        for cls in type(data).__mro__
    )


@dataclass
class RowBatches:
    """Turns one numpy batch of a Ray Dataset's rows (``{"image": ..., "label": ...}``) into a
    :class:`Batch` and the rows that failed (key: error): picklable, so Ray Data's workers run
    it too. Every image must have ``shape`` (the first row's) and every mask its spatial shape;
    a row that does not is a failure record, never an exception.

    ``layout`` is how the images hold their channels, told from the first row
    (:func:`image_layout`): ``"chw"`` as the models take them, ``"hw"`` (one channel, e.g.
    ``ray.data.read_images`` of grayscale files) or ``"hwc"`` (channels last, as
    ``read_images`` gives colour images), moved to ``(C, H, W)`` batch by batch."""

    shape: tuple[int, ...] | None
    batch_size: int
    device: torch.device
    preprocess: Any = None
    layout: str = "chw"

    @property
    def spatial(self) -> tuple[int, ...] | None:
        """The grid of every image (and mask)."""
        if self.shape is None:
            return None
        return {"hw": self.shape, "hwc": self.shape[:-1]}.get(self.layout, self.shape[1:])

    def __call__(self, columns: dict[str, np.ndarray]) -> tuple[Batch | None, dict[str, str]]:
        images = columns.get("image")
        if images is None:
            raise InputError(
                f"A Ray Dataset needs an 'image' column; this batch has {sorted(columns)}."
            )
        labels, masks = columns.get("label"), columns.get("mask")
        ids = columns.get("id", columns.get("path"))  # read_images(include_paths=True)
        n, failed, keep = len(images), {}, []
        if self._uniform(images, masks):  # the usual case: checked as whole arrays
            keep = list(range(n))
        else:
            for i in range(n):
                mask = None if masks is None else masks[i]
                error = _row_error(images[i], mask, self.shape, self.spatial)
                if error is None:
                    keep.append(i)
                else:
                    name = str(ids[i]) if ids is not None else "a row without an 'id'"
                    record_failures(failed, {name: error})
        if not keep:
            return None, failed
        if len(keep) == n and images.dtype != object:  # the usual case: one array already
            x = torch.from_numpy(np.array(images))  # a copy: Ray's may be read-only
        else:
            x = torch.from_numpy(np.stack([np.asarray(images[i]) for i in keep]))
        if not x.is_floating_point():
            x = x.float()
        if self.layout == "hw":
            x = x.unsqueeze(1)
        elif self.layout == "hwc":  # (N, H, W, C)
            x = x.permute(0, 3, 1, 2).contiguous()
        pick = None if len(keep) == n else keep

        def column(values: Any) -> Any:
            if values is None:
                return None
            return torch.as_tensor(np.stack([np.asarray(values[i]) for i in (pick or range(n))]))

        batch = _make_batch(x, column(labels), column(masks), self.preprocess, self.device)
        if ids is not None:
            batch.keys = [str(ids[i]) for i in (pick or range(n))]
        return batch, failed

    def _uniform(self, images: np.ndarray, masks: np.ndarray | None) -> bool:
        """Whether every row is fine, told from the columns' arrays alone."""
        if self.shape is None or images.dtype.kind not in "biuf":  # ragged columns: objects
            return False
        if images.shape[1:] != self.shape:
            return False
        return masks is None or (masks.dtype != object and masks.shape[1:] == self.spatial)


def image_layout(shape: tuple[int, ...]) -> str:
    """How an image of ``shape`` holds its channels: ``"hwc"`` when its last axis is 1, 3 or 4
    long and its first is not (grey, RGB, RGBA last), ``"hw"`` for a 2-D image, else ``"chw"``
    (volumes ``(C, D, H, W)`` included)."""
    small = {1, 3, 4}
    if len(shape) == 2:
        return "hw"
    if len(shape) == 3 and shape[-1] in small and shape[0] not in small:
        return "hwc"
    return "chw"


def record_failures(failed: dict[str, str], new: dict[str, str]) -> None:
    """Add ``new`` failure records to ``failed``; a name seen before gets `` (2)``, `` (3)``...
    (rows without an ``id``, or with the same one, are all listed)."""
    for name, error in new.items():
        key, seen = name, 2
        while key in failed:
            key, seen = f"{name} ({seen})", seen + 1
        failed[key] = error


def _row_error(
    image: Any, mask: Any, shape: tuple[int, ...] | None, spatial: tuple[int, ...] | None
) -> str | None:
    """Why a row cannot join its batch, or ``None``."""
    try:
        array = np.asarray(image)
        kind = array.dtype.kind
    except (TypeError, ValueError) as exc:
        return f"InputError: the image is not an array: {exc}"
    if kind not in "biuf":
        return f"InputError: the image is not numeric (dtype {array.dtype})."
    if array.shape != shape:
        return (
            f"InputError: the image has shape {array.shape}; the dataset's images have {shape} "
            f"(its first row's)."
        )
    if mask is not None and np.shape(mask) != spatial:
        return f"InputError: the mask has shape {np.shape(mask)}; the image's grid is {spatial}."
    return None


# -- reading files anywhere: the chunks a worker reads, the batches the driver groups -----------


@dataclass
class ChunkMeta:
    """What reading a :class:`ReadChunk` gave, without the pixels: ``files`` ``(key, images,
    shape of one image)`` for each file read, in order, and ``failed`` (key: error) for the rest."""

    files: list[tuple[str, int, tuple[int, ...]]]
    failed: dict[str, str]


@dataclass
class ReadChunk:
    """Input files read and preprocessed as one unit of work: picklable, so a worker can read
    them from paths (relative ones from ``cwd``, the caller's folder). Calling it gives the
    :class:`ChunkMeta` and one array ``(n, C, *spatial)`` per file read; an unreadable
    or corrupt file is a failure record, never an exception."""

    items: list[InputItem]
    preprocess: Any
    window: tuple[float, float] | None
    cwd: Path

    def __call__(self) -> tuple[ChunkMeta, list[np.ndarray]]:
        meta, arrays = ChunkMeta([], {}), []
        for item in self.items:
            located = replace(item, paths=tuple(self.cwd / path for path in item.paths))
            try:
                x = _prepare(self.preprocess, read_item(located, window=self.window))
            except (XaiError, OSError, ValueError) as exc:
                meta.failed[item.key] = f"{type(exc).__name__}: {exc}"
                continue
            array = x.detach().cpu().numpy()
            meta.files.append((item.key, int(array.shape[0]), tuple(array.shape[1:])))
            arrays.append(array)
        return meta, arrays


@dataclass
class BatchSpec:
    """One batch of a file stream by reference: which files of which chunks (``chunks``, and
    ``files`` ``(position in chunks, index of the file in that chunk's arrays)``), built into a
    :class:`Batch` where the chunks' arrays are (:meth:`build`, in a worker or here)."""

    chunks: list[int]
    files: list[tuple[int, int]]
    keys: list[str]
    device: torch.device
    masks: MaskFolder | None

    def build(self, *arrays: Sequence[np.ndarray]) -> Batch:
        """The batch, from the arrays of ``chunks`` (in that order)."""
        x = torch.from_numpy(np.concatenate([arrays[c][f] for c, f in self.files]))
        masks = None
        if self.masks is not None:
            masks = check_masks(self.masks.read(self.keys, x), x).to(self.device)
        return Batch(x.to(self.device, non_blocking=True), None, masks, list(self.keys))


@dataclass
class ReadPlan:
    """A file stream as read chunks and the batches they make: the driver's side.

    :meth:`add` takes each chunk's :class:`ChunkMeta` **in chunk order** and returns the batches
    now complete (``batch_size`` images or more, whole files: the same batches whatever the chunk
    size and wherever the chunks were read), :meth:`finish` the last one. Unreadable files are
    recorded in ``failed``; files of another size than the first raise
    :class:`~xai_core.core.errors.InputError`, in file order, as one pass would.
    """

    chunks: list[ReadChunk]
    batch_size: int
    device: torch.device
    masks: MaskFolder | None
    failed: dict[str, str]
    _waiting: list[tuple[int, int, str, int]] = field(default_factory=list)
    _images: int = 0
    _first: tuple[str, tuple[int, ...]] | None = None

    def add(self, chunk: int, meta: ChunkMeta) -> list[BatchSpec]:
        self.failed.update(meta.failed)
        out = []
        for position, (key, images, shape) in enumerate(meta.files):
            self._first = self._first or (key, shape)
            if shape != self._first[1]:
                raise InputError(
                    f"{key} is {shape} after preprocessing but {self._first[0]} is "
                    f"{self._first[1]}; resize them to one size (Preprocess(size=...), --size on "
                    f"the command line)."
                )
            self._waiting.append((chunk, position, key, images))
            self._images += images
            if self._images >= self.batch_size:
                out.append(self._spec())
        return out

    def finish(self) -> list[BatchSpec]:
        return [self._spec()] if self._waiting else []

    def open_chunks(self) -> set[int]:
        """Chunks with files read but not yet in a batch: their arrays are still needed."""
        return {chunk for chunk, *_ in self._waiting}

    def _spec(self) -> BatchSpec:
        chunks = sorted({chunk for chunk, *_ in self._waiting})
        files = [(chunks.index(chunk), position) for chunk, position, _, _ in self._waiting]
        keys = [key for _, _, key, images in self._waiting for _ in range(images)]
        self._waiting, self._images = [], 0
        return BatchSpec(chunks, files, keys, self.device, self._masks_of(keys))

    def _masks_of(self, keys: list[str]) -> MaskFolder | None:
        """The mask lookup narrowed to ``keys``: a batch sent to a worker carries its own
        inputs' entries, not the whole dataset's."""
        if self.masks is None:
            return None
        narrowed = copy.copy(self.masks)
        narrowed.stems = {key: self.masks.stems[key] for key in keys}
        narrowed.by_stem = {
            stem: self.masks.by_stem[stem]
            for stem in narrowed.stems.values()
            if stem in self.masks.by_stem
        }
        return narrowed


def _is_paths(data: Any) -> bool:
    if isinstance(data, str | os.PathLike):
        return True
    return (
        isinstance(data, list | tuple)
        and bool(data)
        and all(isinstance(p, str | os.PathLike) for p in data)
    )


def _unpack(item: Any) -> tuple[Any, Any, Any]:
    """``x``, ``(x,)``, ``(x, y)`` or ``(x, y, masks)`` from a DataLoader as (x, y, masks)."""
    if isinstance(item, torch.Tensor):
        return item, None, None
    if isinstance(item, list | tuple) and 1 <= len(item) <= 3:
        return (*item, *([None] * (3 - len(item))))  # type: ignore[return-value]
    raise InputError(
        f"Each item of a data iterable must be x, (x, y) or (x, y, masks); got "
        f"{type(item).__name__}" + (f" of {len(item)} items." if hasattr(item, "__len__") else ".")
    )


def _prepare(preprocess: Any, x: Any) -> torch.Tensor:
    """A Preprocess applied per sample (it reads (C, *spatial) arrays), a callable per batch."""
    if isinstance(preprocess, Preprocess):
        if hasattr(x, "array"):  # a LoadedInput read from a file
            return preprocess.to_tensor(x)
        return torch.cat([preprocess.to_tensor(s.detach().cpu().numpy()) for s in x])
    if not callable(preprocess):
        raise OptionError(
            f"preprocess must be an xai_core.io.Preprocess or a callable on a batch tensor; got "
            f"{type(preprocess).__name__}."
        )
    if hasattr(x, "array"):
        x = Preprocess().to_tensor(x)
    return preprocess(x)


def _labels(y: Any, n: int) -> torch.Tensor:
    labels = torch.as_tensor(y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InputError(
            f"Labels must be one class index per image, shape ({n},); got {tuple(labels.shape)}. "
            f"For one-hot or multi-label targets, group the maps by the model's prediction "
            f"instead (group_by='prediction')."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"Labels must be integer class indices; got dtype {labels.dtype}.")
    if labels.numel() and int(labels.min()) < 0:
        raise InputError(f"Labels must be >= 0; got {int(labels.min())}.")
    return labels.long()


@dataclass
class ClassMaps:
    """Per-class running sums of maps: count, mean and spread over every map added.

    ``sums`` and ``squares`` are ``(C, *spatial)`` float64 (so that a million small maps add up
    without losing precision), ``counts`` ``(C,)``, all on one device. The standard deviation is
    the population one (``ddof=0``): zero for a class with one map, never NaN. A class without
    any map has mean and spread 0 and count 0.
    """

    sums: torch.Tensor
    squares: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def empty(
        cls, classes: int, spatial: Sequence[int], device: torch.device | str = "cpu"
    ) -> ClassMaps:
        zeros = torch.zeros((classes, *spatial), dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), torch.zeros(classes, dtype=torch.long, device=device))

    @classmethod
    def of(cls, maps: torch.Tensor, classes: torch.Tensor, num_classes: int) -> ClassMaps:
        """Statistics of ``maps`` ``(B, *spatial)``, map ``b`` counted under ``classes[b]``."""
        out = cls.empty(num_classes, maps.shape[1:], maps.device)
        out.add(maps, classes)
        return out

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.sums.shape[1:])

    def add(self, maps: torch.Tensor, classes: torch.Tensor) -> None:
        """Add ``maps`` ``(B, *spatial)``, map ``b`` under class ``classes[b]``, in place."""
        if tuple(maps.shape[1:]) != self.spatial or classes.shape != maps.shape[:1]:
            raise InputError(
                f"Expected (B, {', '.join(map(str, self.spatial))}) maps and (B,) classes; got "
                f"{tuple(maps.shape)} and {tuple(classes.shape)}."
            )
        if classes.numel() and int(classes.max()) >= self.num_classes:
            raise InputError(f"Class {int(classes.max())} is out of range ({self.num_classes}).")
        # A one-hot matrix product sums the maps per class: BLAS-fast, unlike float64 index_add_
        # on the CPU (about 20x slower here).
        onehot = F.one_hot(classes.to(self.sums.device, torch.long), self.num_classes)
        weights = onehot.to(torch.float64).T  # (C, B)
        values = maps.detach().to(self.sums.device, torch.float64).flatten(1)
        self.sums += (weights @ values).view_as(self.sums)
        self.squares += (weights @ (values * values)).view_as(self.squares)
        self.counts += onehot.sum(dim=0)

    def __add__(self, other: ClassMaps) -> ClassMaps:
        if other.sums.shape != self.sums.shape:
            raise InputError(
                f"Cannot merge statistics of shape {tuple(self.sums.shape)} and "
                f"{tuple(other.sums.shape)}."
            )
        device = self.sums.device
        return ClassMaps(
            self.sums + other.sums.to(device),
            self.squares + other.squares.to(device),
            self.counts + other.counts.to(device),
        )

    def __iadd__(self, other: ClassMaps) -> ClassMaps:
        """Merge ``other`` into these sums in place (what a running reduce uses: no copy)."""
        if other.sums.shape != self.sums.shape:
            return self + other  # raises the error above
        self.sums += other.sums.to(self.sums.device)
        self.squares += other.squares.to(self.sums.device)
        self.counts += other.counts.to(self.sums.device)
        return self

    def _per_class(self) -> torch.Tensor:
        return self.counts.clamp(min=1).to(torch.float64).view(-1, *([1] * len(self.spatial)))

    @property
    def mean(self) -> torch.Tensor:
        """``(C, *spatial)`` mean map of each class."""
        return self.sums / self._per_class()

    @property
    def std(self) -> torch.Tensor:
        """``(C, *spatial)`` population standard deviation of each class's maps, per pixel."""
        variance = self.squares / self._per_class() - self.mean**2
        return variance.clamp(min=0).sqrt()  # rounding can make a zero variance slightly < 0

    def to(self, device: torch.device | str) -> ClassMaps:
        return ClassMaps(self.sums.to(device), self.squares.to(device), self.counts.to(device))


GROUP_BY = ("auto", "label", "prediction", "all")


def batch_targets(batch: Batch, group_by: str) -> Any:
    """The targets that put each image of ``batch`` under a class (see :func:`explain_dataset`)."""
    if group_by not in GROUP_BY:
        raise OptionError(f"group_by must be one of {GROUP_BY}; got {group_by!r}.")
    if group_by == "all":
        return "all"
    if group_by == "label" and batch.labels is None:
        raise OptionError(
            "group_by='label' needs labels: pass (x, y), labels=..., or a DataLoader yielding "
            "(x, y); or group by the model's prediction (group_by='prediction')."
        )
    if group_by == "prediction" or batch.labels is None:
        return None  # the top class of each image
    return batch.labels


def explain_dataset(
    model: Any,
    data: Any,
    *,
    method: str,
    group_by: str = "auto",
    batch_size: int = 32,
    preprocess: Any = None,
    labels: torch.Tensor | Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    engine: str | Executor = DEFAULT_ENGINE,
    **options: Any,
) -> Any:
    """Run a global method over ``data`` batch by batch and merge its per-batch summaries.

    A global explainer returns, for one batch, per-sample maps and in ``details["global"]`` a
    summary that adds with ``+`` (the ``xai-global`` methods return a :class:`ClassMaps`). This
    streams ``data`` (anything :class:`DataStream` reads) through it on the model's device, one
    batch in memory at a time, and returns the sum of the summaries.

    :param group_by: which class each image counts for: ``"label"``, ``"prediction"`` (the top
        class), ``"all"`` (every class, for every image), or ``"auto"`` (labels when the data
        has them, else the prediction).
    :param progress: ``progress(images_done, images_total_or_None, what)`` after each batch
        (:mod:`xai_core.core.progress`).
    :param engine: where the batches are explained: an executor's name (``"local"``, the
        default; plugins add others) or an executor (:mod:`xai_core.core.executors`).
    :param options: the global method's options, e.g. ``local="gradcam"`` for ``aggregate``.
    """
    global_methods = [i.name for i in get_registry().list_explainers(scope=Scope.GLOBAL)]
    info, adapter = runnable(
        method,
        model,
        scope=Scope.GLOBAL,
        wrong_scope=(
            f"explain_dataset runs global ones: "
            f"{', '.join(global_methods) or 'none installed (pip install xai-global)'}. To "
            f"average a local method per class use method='aggregate', local={method!r}."
        ),
        options=options,
    )
    stream = DataStream(
        data, batch_size=batch_size, device=adapter.device, preprocess=preprocess, labels=labels
    )
    step = _GlobalStep(info, adapter, group_by, options)
    merged = run(
        engine, step, stream, total=stream.total, progress=progress, what=f"{method}: images"
    )
    if merged is None:
        raise InputError("The dataset is empty: no batch came out of it.")
    return merged.value


@dataclass
class _GlobalStep:
    """One batch of a global explanation: its mergeable summary (a picklable step)."""

    info: Any
    adapter: Any
    group_by: str
    options: dict[str, Any]

    def __call__(self, batch: Batch) -> Partial:
        targets = batch_targets(batch, self.group_by)
        exp = run_explainer(self.info, self.adapter, batch.inputs, targets, self.options)
        part = exp.details.get("global")
        if part is None:
            raise TypeError(f"{self.info.name} returned no details['global'] summary to merge.")
        return Partial(part, len(batch))
