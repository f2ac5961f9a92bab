"""DICOM files and series read with pydicom into arrays in [0, 1].

Grey-scale pixels go through the modality transform (Modality LUT, or RescaleSlope and
RescaleIntercept) into physical units such as Hounsfield units, then through the linear VOI
window of DICOM PS3.3 C.11.2.1.2 (the file's first WindowCenter/WindowWidth, or an override),
mapped to [0, 1] rather than to a display range. Without a window the data range is used.
MONOCHROME1 images are inverted so that 1 is always bright. Colour images are scaled by their
bit depth and not windowed.

A series is a list of single-frame slices; they are ordered along the slice normal by
ImagePositionPatient (as DICOM viewers do), else by InstanceNumber, else by file name, and stacked
into (D, H, W). For axial CT in the usual LPS orientation this means D runs inferior to superior,
H anterior to posterior and W from the patient's right to left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xai_core.errors import InputFileError, OptionError

DICM_OFFSET = 128  # the 128-byte preamble is followed by the magic "DICM"


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` holds the DICM magic after the 128-byte preamble (no decoding)."""
    try:
        with open(path, "rb") as f:
            head = f.read(DICM_OFFSET + 4)
    except OSError:
        return False
    return head[DICM_OFFSET:] == b"DICM"


# Projection images (radiographs, mammograms, ultrasound, screen captures) share a series without
# being slices of a volume; without ImagePositionPatient they are never stacked.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "XA", "US", "OT", "SC"})
_HEADER_TAGS = [
    "SOPClassUID",
    "Modality",
    "SeriesInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


@dataclass(frozen=True)
class Header:
    """What the folder scan needs from a DICOM file, read without its pixels."""

    is_image: bool
    # (series UID, rows, columns, orientation) when the file can be one slice of a volume:
    # slices of one volume share all four.
    volume: tuple[Any, ...] | None = None
    position: tuple[float, ...] | None = None


def scan_header(path: Path) -> Header:
    """The file's :class:`Header`.

    Only a well-formed DICOM object without image rows (a report, a structure set) is said not
    to be an image. A damaged file counts as an image that belongs to no volume: it becomes an
    input of its own, so that reading it reports the error instead of the scan hiding it.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
    except Exception:
        return Header(is_image=True)
    meta = getattr(ds, "file_meta", None)
    well_formed = "SOPClassUID" in ds or (meta is not None and "MediaStorageSOPClassUID" in meta)
    if "Rows" not in ds:
        return Header(is_image=not well_formed)
    try:
        uid = str(ds.get("SeriesInstanceUID", "")) or None
        single = int(ds.get("NumberOfFrames", 1) or 1) == 1
        grey = int(ds.get("SamplesPerPixel", 1) or 1) == 1
        position = _numbers(ds.get("ImagePositionPatient"), 3)
        orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
        projection = str(ds.get("Modality", "")).upper() in PROJECTION_MODALITIES
        shape = (int(ds.Rows), int(ds.get("Columns", 0) or 0))
    except (TypeError, ValueError):
        return Header(is_image=True)
    if uid is None or not single or not grey or (projection and position is None):
        return Header(is_image=True)
    return Header(True, (uid, *shape, orientation), position)


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` numbers to 3 decimals (micrometres for positions), so float noise in the
    files does not split one series into several."""
    try:
        numbers = tuple(round(float(v), 3) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def read_dicom_file(path: Path, window: tuple[float, float] | None = None) -> dict[str, Any]:
    """One DICOM file: (C, H, W), or (C, D, H, W) for a multi-frame file. See the module doc."""
    ds = _read(path)
    pixels = _pixels(ds, path)
    meta = _common_meta(ds)
    if _is_colour(ds):
        rgb = _colour(ds, pixels, path)  # (..., H, W, 3) in [0, 1]
        array = np.moveaxis(rgb, -1, 0)  # channels first: (3, H, W) or (3, D, H, W)
        return {"array": array, "display": to_uint8(rgb), "meta": meta}
    grey, window_meta = _window(_modality(ds, pixels), ds, window)  # (H, W) or (frames, H, W)
    meta.update(window_meta)
    return {"array": grey[None], "display": to_uint8(grey), "meta": meta}


def read_dicom_series(
    paths: Sequence[Path], window: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Single-frame grey-scale slices sharing a series, stacked into (1, D, H, W)."""
    slices = [(Path(p), _read(Path(p))) for p in paths]
    order, sort_by, positions = _slice_order(slices)
    slices = [slices[i] for i in order]
    first_path, first = slices[0]
    if _is_colour(first):
        raise InputFileError(first_path, "colour DICOM series are not supported")
    planes = []
    for path, ds in slices:
        pixels = _pixels(ds, path)
        if pixels.ndim != 2:
            raise InputFileError(path, f"a series slice must be one 2D frame, got {pixels.shape}")
        if planes and pixels.shape != planes[0].shape:
            raise InputFileError(
                path, f"slice is {pixels.shape} but {first_path.name} is {planes[0].shape}"
            )
        # Each slice has its own rescale (PET, some MR), so transform before stacking.
        planes.append(_modality(ds, pixels))
    volume = np.stack(planes)
    grey, window_meta = _window(volume, first, window)
    meta = _common_meta(first)
    meta.update(window_meta)
    meta.update({"slices": len(slices), "sorted_by": sort_by})
    if positions is not None and len(positions) > 1:
        meta["slice_spacing"] = float(np.median(np.diff(np.sort(positions))))
    return {"array": grey[None], "display": to_uint8(grey), "meta": meta}


# -- reading ---------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    import pydicom

    try:
        # force=True: many exporters omit the preamble; a non-DICOM file then fails below.
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InputFileError(
            path, f"not a readable DICOM file ({describe_exception(exc)})"
        ) from exc
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputFileError(path, "no pixel data: not a DICOM image (or not DICOM at all)")
    return ds


def _pixels(ds: Any, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # truncated data, or a compressed syntax without its decoder
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise InputFileError(
            path, f"cannot decode the pixel data ({name}): {describe_exception(exc)}"
        ) from exc


def describe_exception(exc: BaseException) -> str:
    """'TypeName: first line of the message', short enough for a batch report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _shared_group(ds: Any, sequence: str) -> Any:
    """The first item of ``sequence`` in the shared functional groups of an enhanced file."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and shared[0][sequence].value:
        return shared[0][sequence][0]
    return None


def _first(value: Any) -> float | None:
    """The first number of a possibly multi-valued element, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    return float(value)


# -- grey-scale pipeline ---------------------------------------------------------------------


def _modality(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Stored values to physical units (Hounsfield units for CT), as float32."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    source = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:  # enhanced multi-frame files
        source = _shared_group(ds, "PixelValueTransformationSequence") or ds
    slope = _first(source.get("RescaleSlope")) or 1.0  # a slope of 0 is invalid: treat as 1
    intercept = _first(source.get("RescaleIntercept")) or 0.0
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _file_window(ds: Any) -> tuple[float, float] | None:
    source = ds if "WindowCenter" in ds else _shared_group(ds, "FrameVOILUTSequence") or ds
    center = _first(source.get("WindowCenter"))
    width = _first(source.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The linear VOI function of DICOM PS3.3 C.11.2.1.2.1, mapped onto [0, 1].

    Values up to ``center - width/2`` give 0, values from ``center + width/2 - 1`` give 1.
    """
    if width <= 0:
        raise OptionError(f"A DICOM window width must be positive; got {width}.")
    scale = max(width - 1.0, 1e-6)  # width 1 is allowed by the standard: a threshold
    out = (values - (center - 0.5)) / scale + 0.5
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _window(
    values: np.ndarray, ds: Any, override: tuple[float, float] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    window = override if override is not None else _file_window(ds)
    if window is not None:
        grey = apply_window(values, float(window[0]), float(window[1]))
        meta: dict[str, Any] = {
            "window": [float(window[0]), float(window[1])],
            "window_source": "override" if override is not None else "file",
        }
    else:
        low, high = float(values.min()), float(values.max())
        span = high - low
        grey = (values - low) / span if span > 0 else np.zeros_like(values)
        grey = grey.astype(np.float32, copy=False)
        meta = {"window": None, "window_source": "data range", "data_range": [low, high]}
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 1.0 - grey  # MONOCHROME1 shows low values bright; make 1 mean bright
    return grey, meta


# -- colour ----------------------------------------------------------------------------------


def _is_colour(ds: Any) -> bool:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"


def _colour(ds: Any, pixels: np.ndarray, path: Path) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = np.asarray(apply_color_lut(pixels, ds))
        except Exception as exc:
            raise InputFileError(path, f"bad colour palette: {describe_exception(exc)}") from exc
        top = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else 1.0
    else:
        # pydicom 3 already converts YBR_* to RGB; scale by the stored bit depth.
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
    if pixels.shape[-1] != 3:
        raise InputFileError(path, f"expected 3 colour samples, got shape {pixels.shape}")
    return np.clip(pixels.astype(np.float32) / top, 0.0, 1.0)


# -- series ----------------------------------------------------------------------------------


def _slice_order(slices: list[tuple[Path, Any]]) -> tuple[list[int], str, np.ndarray | None]:
    """Indices that sort the slices, what they were sorted by, and the positions if known."""
    datasets = [ds for _, ds in slices]
    names = [path.name for path, _ in slices]
    positions = _positions_along_normal(datasets)
    if positions is not None:
        order = sorted(range(len(slices)), key=lambda i: (positions[i], names[i]))
        return order, "ImagePositionPatient", positions
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    if all(n is not None and n != "" for n in numbers):
        order = sorted(range(len(slices)), key=lambda i: (int(numbers[i]), names[i]))
        return order, "InstanceNumber", None
    return sorted(range(len(slices)), key=lambda i: names[i]), "file name", None


def _positions_along_normal(datasets: list[Any]) -> np.ndarray | None:
    """Each slice's position projected on the slice normal (row x column direction)."""
    try:
        ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError):
        return None
    if ipp.shape != (len(datasets), 3):
        return None
    try:
        iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:6])
    except (AttributeError, TypeError, ValueError, IndexError):
        normal = np.array([0.0, 0.0, 1.0])  # no orientation: assume axial slices
    if not np.any(normal):
        normal = np.array([0.0, 0.0, 1.0])
    return ipp @ normal


# -- shared ----------------------------------------------------------------------------------


def _common_meta(ds: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "modality": str(ds.get("Modality", "")) or None,
        "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
    }
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        meta["pixel_spacing"] = [float(spacing[0]), float(spacing[1])]
    return meta


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
