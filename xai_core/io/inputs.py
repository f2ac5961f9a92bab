"""Finding input files and reading them into arrays: PNG/JPEG, DICOM (files and series), NIfTI.

:func:`find_inputs` turns files and folders into :class:`InputItem` s; :func:`read_item` reads
one into a :class:`LoadedInput`:

* ``array``: float32 in [0, 1], (C, H, W) for an image or (C, D, H, W) for a volume;
* ``display``: uint8 for overlays, (H, W) grey or (H, W, 3) RGB; volumes (D, H, W) or (D, H, W, 3);
* ``meta``: what was read and how (bit depth, DICOM window, spacing, orientation...).

Scaling to [0, 1]: 8-bit images by 255, 16-bit by 65535 (so one intensity means the same in
every file of a data set); DICOM through its rescale and window (see :mod:`xai_core.io.dicom`);
NIfTI by the 0.5th and 99.5th percentiles of the volume, because MRI has no fixed intensity
scale and a few bright voxels would otherwise squash the rest.

NIfTI axis order: the volume is reoriented to the closest canonical (RAS+) orientation and
returned as (D, H, W) = (inferior -> superior, anterior -> posterior, patient's right -> left),
the layout of an axial DICOM series, so a scan reads the same from either format. Voxel
spacing follows in ``meta["spacing"]`` in the same (D, H, W) order.

A file that cannot be read raises :class:`~xai_core.core.errors.InputFileError` naming the file and
the reason, so that a batch job can report it and go on with the next input. Sizes are checked
from the header before decoding (:mod:`xai_core.io.limits`); odd but usable tags are read and
noted in ``meta["notes"]``. See docs/inputs.md.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.errors import InputError, InputFileError, InputTooLargeError, XaiError
from xai_core.core.explanation import normalize
from xai_core.core.registry import get_registry
from xai_core.io import dicom
from xai_core.io.dicom import describe_exception, to_uint8
from xai_core.io.limits import check_declared_size
from xai_core.io.limits import max_input_bytes as max_input_bytes_of
from xai_core.io.preprocess import Preprocess, find_sidecar, read_sidecar

__all__ = [
    "InputItem",
    "InputKind",
    "LoadedInput",
    "Preprocess",
    "classify",
    "find_inputs",
    "find_sidecar",
    "read_item",
    "read_sidecar",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI_PERCENTILES = (0.5, 99.5)
MAX_KEY_LENGTH = 150  # leaves room for suffixes such as ".gradcam.png" under 255 bytes


class InputKind(StrEnum):
    """What an input is; compares equal to its string ("dicom-series")."""

    IMAGE = "image"
    DICOM = "dicom"
    DICOM_SERIES = "dicom-series"
    NIFTI = "nifti"


@dataclass(frozen=True)
class InputItem:
    """One input: a file, or the slice files of one DICOM series.

    ``key`` is derived from the path relative to the folder it was found in, made safe as a file
    name; it names the input's outputs and is stable between runs over the same files.
    """

    key: str
    kind: InputKind | str  # a plugin reader's items have its name as kind
    paths: tuple[Path, ...]

    @property
    def source(self) -> Path:
        """The file, or for a series the folder that holds it (for messages)."""
        return self.paths[0].parent if self.kind is InputKind.DICOM_SERIES else self.paths[0]


@dataclass
class LoadedInput:
    """An input read into memory; see the module documentation for shapes and scaling."""

    array: np.ndarray
    display: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 4


# -- finding ---------------------------------------------------------------------------------


def classify(path: Path) -> InputKind | str | None:
    """The kind of file (the name of the first reader that claims it), or None.

    The core's readers come first (:mod:`xai_core.io.readers`): by name, and without an
    extension by the DICOM preamble; then the readers of plugins (``register_readers``), whose
    kinds are their names.
    """
    found = get_registry().reader_for(Path(path))
    if found is None:
        return None
    name = found[0]
    return InputKind(name) if name in _READ_KINDS else name


_READ_KINDS = frozenset({InputKind.IMAGE, InputKind.DICOM, InputKind.NIFTI})


def find_inputs(paths: Sequence[str | Path]) -> list[InputItem]:
    """Inputs in ``paths``: files as given, folders searched recursively in sorted order.

    Kinds are told by extension (case-insensitive): .png, .jpg, .jpeg, .dcm, .dicom, .nii,
    .nii.gz, and DICOM files without an extension by their preamble; files none of these claims
    by the readers of plugins (:mod:`xai_core.io.readers`). In folders, hidden entries
    and files of other kinds are skipped, and the slices of a DICOM series in one folder become
    one ``dicom-series`` item (see :func:`_group_dicom` for when slices are a volume). A path
    that does not exist, or a file named explicitly that is of no known kind, raises
    :class:`InputFileError`; damaged files are listed, and fail when read. A file found twice
    is listed once; keys are unique.
    """
    if isinstance(paths, str | os.PathLike):  # one path, not a sequence of characters
        paths = [paths]
    items: list[InputItem] = []
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            items.extend(_scan_folder(root))
        elif root.is_file():
            kind = classify(root)
            if kind is None:
                raise InputFileError(
                    root,
                    "not a PNG, JPEG, DICOM or NIfTI file, nor a kind an installed reader plugin "
                    "reads (see `xai plugins`)",
                )
            items.append(InputItem(_safe_key([root.name]), kind, (root,)))
        else:
            raise InputFileError(root, "no such file or folder")
    return _unique(items)


def _scan_folder(root: Path) -> list[InputItem]:
    found: list[tuple[str, InputItem]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        rel_folder = folder.relative_to(root).parts
        dicom_files: list[Path] = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = folder / name
            kind = classify(path)
            if kind is InputKind.DICOM:
                dicom_files.append(path)
            elif kind is not None:
                rel = [*rel_folder, name]
                found.append(("/".join(rel), InputItem(_safe_key(rel), kind, (path,))))
        found.extend(_group_dicom(dicom_files, root, rel_folder))
    found.sort(key=lambda pair: pair[0])
    return [item for _, item in found]


def _group_dicom(
    files: list[Path], root: Path, rel_folder: tuple[str, ...]
) -> list[tuple[str, InputItem]]:
    """The DICOM files of one folder: one item per volume, one per other image.

    Slices become one volume when they share series, size and orientation and lie at distinct
    positions (or, without positions, belong to a cross-sectional modality such as CT or MR).
    A series that repeats positions (several echoes or phases) is left as separate images:
    stacking it would interleave them. Items come with their relative path, which orders them.
    """
    groups: dict[tuple[Any, ...], list[tuple[Path, dicom.Header]]] = {}
    singles: list[Path] = []
    for path in files:
        header = dicom.scan_header(path)
        if not header.is_image:
            continue  # a report, presentation state or structure set: nothing to explain
        if header.volume is None:
            singles.append(path)
        else:
            groups.setdefault(header.volume, []).append((path, header))
    volumes = {}
    for identity, members in groups.items():
        positions = [header.position for _, header in members]
        if len(members) > 1 and (
            all(p is None for p in positions)
            or (None not in positions and len(set(positions)) == len(positions))
        ):
            volumes[identity] = [path for path, _ in members]
        else:
            singles.extend(path for path, _ in members)
    items = []
    for path in sorted(singles):
        rel = [*rel_folder, path.name]
        items.append(("/".join(rel), InputItem(_safe_key(rel), InputKind.DICOM, (path,))))
    folder_key = list(rel_folder) or [root.resolve().name]
    for identity, slices in sorted(volumes.items(), key=lambda pair: repr(pair[0])):
        # One volume keeps the folder's name; several in one folder get a hash of what tells
        # them apart (series, size, orientation), so their keys do not depend on file names.
        parts = (
            folder_key
            if len(volumes) == 1
            else [*folder_key, f"series-{_short_hash(repr(identity))}"]
        )
        item = InputItem(_safe_key(parts), InputKind.DICOM_SERIES, tuple(slices))
        items.append(("/".join(parts), item))
    return items


def _safe_key(parts: list[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(parts)).lstrip(".-") or "input"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 9]}-{_short_hash(key)}"
    return key


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _unique(items: list[InputItem]) -> list[InputItem]:
    """Drop repeated inputs; give a colliding key a suffix from its absolute path."""
    seen_sources: set[tuple[str, ...]] = set()
    keys: set[str] = set()
    unique = []
    for item in items:
        sources = tuple(sorted(str(p.resolve()) for p in item.paths))
        if sources in seen_sources:
            continue
        seen_sources.add(sources)
        if item.key in keys:
            item = InputItem(f"{item.key}-{_short_hash(sources[0])}", item.kind, item.paths)
        keys.add(item.key)
        unique.append(item)
    return unique


# -- reading ---------------------------------------------------------------------------------


def read_item(
    item: InputItem,
    *,
    window: tuple[float, float] | None = None,
    max_input_bytes: int | None = None,
) -> LoadedInput:
    """Read one input. ``window`` (centre, width) overrides a DICOM file's own window.

    ``max_input_bytes`` limits the decoded size each file may declare, checked from its header
    before decoding (default: ``XAI_CORE_MAX_INPUT_BYTES`` or 512 MiB; see
    :mod:`xai_core.io.limits`). Every failure is an :class:`~xai_core.core.errors.XaiError`: an
    unreadable, malformed or too large file an :class:`InputFileError` naming it.
    """
    from xai_core.io.readers import ReadOptions  # readers.py imports this module

    limit = max_input_bytes_of(max_input_bytes)  # a bad setting fails here, not as the file's
    try:
        if item.kind == InputKind.DICOM_SERIES:
            read = dicom.read_dicom_series(item.paths, window, max_input_bytes=limit)
            loaded = LoadedInput(**read)
        else:  # the reader registered under the item's kind: the core's or a plugin's
            options = ReadOptions(max_input_bytes=limit, window=window)
            loaded = get_registry().read(
                str(item.kind), item.paths[0], options, returns=LoadedInput
            )
    except XaiError:
        raise
    except Exception as exc:  # a case no check foresaw: still the file's error, not a crash
        raise InputFileError(
            item.source, f"unexpected error while reading ({describe_exception(exc)})"
        ) from exc
    loaded.meta.update({"key": item.key, "kind": str(item.kind), "source": str(item.source)})
    return loaded


def read_image(path: Path, *, max_input_bytes: int | None = None) -> LoadedInput:
    """A PNG or JPEG file: grey stays one channel, colour becomes RGB (alpha dropped).

    The size is checked from the header (width x height x channels, lazily opened) before
    decoding; see ``max_input_bytes`` in :func:`read_item`.
    """
    from PIL import Image, ImageOps  # decoders load when a file of theirs is read

    limit = max_input_bytes_of(max_input_bytes)
    try:
        with Image.open(path) as opened:
            mode = opened.mode
            channels = 1 if mode in _GREY_MODES else 3
            width, height = opened.size
            check_declared_size(
                path, (channels, height, width), 1, limit,
                f"{width} x {height} pixels x {channels} channel(s) ({opened.format} {mode})",
            )  # fmt: skip
            opened.load()
            # Apply EXIF rotation, as every viewer does, so maps line up with what users see.
            image = ImageOps.exif_transpose(opened)
            array, display, bits = _pil_arrays(image)
    except InputFileError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked when opening
        raise InputTooLargeError(
            path, f"Pillow refuses it as a decompression bomb ({exc}); Image.MAX_IMAGE_PIXELS "
            "is Pillow's limit, separate from xai-core's"
        ) from exc  # fmt: skip
    except Exception as exc:  # Pillow raises many types for bad files: report them all as one
        raise InputFileError(path, f"not a readable image ({describe_exception(exc)})") from exc
    meta = {"mode": mode, "bits": bits, "size": list(array.shape[-2:])}
    return LoadedInput(array, display, meta)


# Modes read as one channel (palettes may be grey too, but are checked as colour).
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _pil_arrays(image: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(array (C, H, W) in [0, 1], display uint8, bit depth) of a Pillow image."""
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit grey (or 32-bit) PNG
        values = np.asarray(image).astype(np.float32)
        if image.mode.startswith("I;16") or (values.min() >= 0 and values.max() <= 65535):
            unit = values / 65535.0
        else:
            unit = normalize(torch.from_numpy(values), values.ndim).numpy()
        # A 12-bit X-ray in a 16-bit file is nearly black at /65535: stretch it for display.
        return unit[None], to_uint8(normalize(torch.from_numpy(unit), unit.ndim).numpy()), 16
    grey = image.mode in ("1", "L", "LA", "La") or (
        image.mode in ("P", "PA") and _palette_is_grey(image)
    )
    converted = np.asarray(image.convert("L" if grey else "RGB"))  # drops alpha, resolves palette
    array = converted.astype(np.float32) / 255.0
    array = array[None] if grey else np.moveaxis(array, -1, 0)
    return np.ascontiguousarray(array), converted, 8


def _palette_is_grey(image: Any) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def read_nifti(path: Path, *, max_input_bytes: int | None = None) -> LoadedInput:
    """A NIfTI volume (the first of a 4D series) as (1, D, H, W); see the module doc for axes.

    The dims and data type in the header are checked against the limit (``max_input_bytes``,
    see :func:`read_item`) before any voxel is read; a zero-length dimension is an error.
    """
    import nibabel as nib  # as PIL above

    limit = max_input_bytes_of(max_input_bytes)
    try:
        image = nib.load(str(path))  # reads the header only: the data stays on disk
        original_shape = tuple(int(n) for n in image.shape)
        if len(original_shape) < 2:
            raise InputFileError(path, f"a {len(original_shape)}D NIfTI is not an image")
        if min(original_shape) < 1:
            raise InputFileError(
                path, f"its header declares a dimension of length 0 (shape {original_shape})"
            )
        dtype = image.get_data_dtype()
        first = original_shape[:3]  # what is read: the first volume of a 4D (or 5D...) file
        check_declared_size(
            path, first, dtype.itemsize, limit,
            " x ".join(map(str, first)) + f" voxels of {dtype}"
            + (f" (first volume of {original_shape})" if len(original_shape) > 3 else ""),
        )  # fmt: skip
        while len(image.shape) > 3:  # 4D (time, diffusion): keep the first volume
            image = image.slicer[..., 0]
        orientation = "RAS+ -> (D=I->S, H=A->P, W=R->L)"
        if len(image.shape) == 3:
            try:
                image = nib.as_closest_canonical(image)
            except Exception:  # a singular affine: keep the voxel order and say so
                orientation = "voxel order (affine unusable)"
        data = np.asarray(image.get_fdata(dtype=np.float32))
        zooms = [float(z) for z in image.header.get_zooms()[:3]]
    except InputFileError:
        raise
    except Exception as exc:  # nibabel and gzip raise many types for bad or truncated files
        raise InputFileError(
            path, f"not a readable NIfTI file ({describe_exception(exc)})"
        ) from exc
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = [*zooms[:2], 1.0]
    # (x, y, z) in RAS+ -> (z, -y, -x): axial slices laid out as DICOM shows them.
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    unit = _robust_unit(volume)
    meta = {
        "shape": list(original_shape),
        "orientation": orientation,
        "spacing": [zooms[2], zooms[1], zooms[0]] if len(zooms) == 3 else None,
        "percentiles": list(NIFTI_PERCENTILES),
    }
    if len(original_shape) == 2:  # a 2D NIfTI stays an image
        return LoadedInput(unit[0][None], to_uint8(unit[0]), meta)
    return LoadedInput(unit[None], to_uint8(unit), meta)


# -- scaling ---------------------------------------------------------------------------------


def _robust_unit(values: np.ndarray) -> np.ndarray:
    """Scale by percentiles into [0, 1]; non-finite voxels become 0, a constant volume 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.float32)
    low, high = np.percentile(values[finite], NIFTI_PERCENTILES)
    if high <= low:  # mostly one value (e.g. background): fall back to the full range
        low, high = values[finite].min(), values[finite].max()
    if high <= low:
        return np.zeros(values.shape, np.float32)
    unit = (np.where(finite, values, low) - low) / (high - low)
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def file_stem(path: Path) -> str:
    """A file's name without its image suffix (``.nii.gz`` counts as one): how masks are matched
    to the inputs they belong to."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class MaskFolder:
    """The masks of file inputs: a folder of mask files named like the inputs (by file stem)."""

    def __init__(self, folder: str | os.PathLike[str], items: Sequence[InputItem]) -> None:
        if not Path(folder).is_dir():
            raise InputFileError(folder, "the masks must be a folder of mask files")
        self.folder = Path(folder)
        self.by_stem = {file_stem(item.paths[0]): item for item in find_inputs([folder])}
        self.stems = {item.key: file_stem(item.source) for item in items}

    def read(self, keys: Sequence[str], x: Any, *, required: bool = False) -> Any:
        """One boolean mask per row of ``x`` (the inputs ``keys``), on its spatial grid: nonzero
        pixels of any channel, resized by nearest neighbour. An input without a mask file has an
        empty mask, or with ``required=True`` raises :class:`~xai_core.core.errors.InputError`."""
        spatial = tuple(x.shape[2:])
        masks = torch.zeros((x.shape[0], *spatial), dtype=torch.bool)
        for row, key in enumerate(keys):
            item = self.by_stem.get(self.stems[key])
            if item is None:
                if required:
                    raise InputError(
                        f"No mask for input {key!r} in {self.folder} (expected a file named "
                        f"{self.stems[key]}.png, .nii.gz, ...)."
                    )
                continue  # no lesion, no mask file
            array = torch.from_numpy(np.ascontiguousarray(read_item(item).array))
            region = (array.amax(dim=0) > 0).float()[None, None]
            masks[row] = F.interpolate(region, size=spatial, mode="nearest")[0, 0] > 0.5
        return masks
