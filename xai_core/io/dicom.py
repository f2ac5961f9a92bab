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

# pydicom is imported where a file is parsed: most runs read no DICOM (start-up time).
from xai_core.core.errors import InputFileError, InputTooLargeError, OptionError
from xai_core.io.limits import ENV_VAR, check_declared_size, format_bytes
from xai_core.io.limits import max_input_bytes as max_input_bytes_of

DICM_OFFSET = 128  # the 128-byte preamble is followed by the magic "DICM"
DEFLATED = "1.2.840.10008.1.2.1.99"
HEADER_PEEK = 1024**2  # inflated bytes read for a deflated file's header
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float and DoubleFloat
_CHUNK = 1024**2


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

    Only a DICOM object of a known non-image class (a report, a structure set, a presentation
    state) is said not to be an image. Anything else without usable image rows (a file cut off
    before its Rows, a damaged or non-DICOM file) counts as an image that belongs to no volume:
    it becomes an input of its own, so that reading it reports the error instead of the scan
    hiding it. A deflated file is only inflated as far as its header (no bomb at discovery).
    """
    try:
        ds = read_header(path, tags=_HEADER_TAGS)
    except Exception:
        return Header(is_image=True)
    if "Rows" not in ds:
        return Header(is_image=not _is_non_image_class(ds))
    try:
        uid = str(ds.get("SeriesInstanceUID", "")) or None
        single = int(ds.get("NumberOfFrames", 1) or 1) == 1
        grey = int(ds.get("SamplesPerPixel", 1) or 1) == 1
        position = _numbers(ds.get("ImagePositionPatient"), 3)
        orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
        projection = str(ds.get("Modality", "")).upper() in PROJECTION_MODALITIES
        shape = (int(ds.Rows), int(ds.get("Columns", 0) or 0))
    except Exception:  # unreadable values: an input of its own, whose reading says what is wrong
        return Header(is_image=True)
    if uid is None or not single or not grey or (projection and position is None):
        return Header(is_image=True)
    return Header(True, (uid, *shape, orientation), position)


# Classes with pixels whose names lack "Image" (pydicom names every standard SOP class).
_PIXEL_CLASSES = ("RT Dose", "Segmentation", "Parametric Map", "RT Image")


def _is_non_image_class(ds: Any) -> bool:
    """True only for a standard SOP class known to hold no image (SR, RTSTRUCT, PDF...)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    try:
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        name = UID(str(sop)).name if sop else ""
    except Exception:  # an undecodable class: cannot tell, so list it
        return False
    if not sop:
        return False
    if name == str(sop):  # a private or unknown class: cannot tell, so list it
        return False
    return "Image" not in name and not any(kind in name for kind in _PIXEL_CLASSES)


def read_header(path: Path, tags: Sequence[str] | None = None) -> Any:
    """The dataset without its pixel data, reading at most a bounded amount of memory.

    A deflated file (Deflated Explicit VR Little Endian) is inflated only up to
    :data:`HEADER_PEEK` bytes, which holds any real header, so that a few hundred KB that
    inflate to gigabytes cost nothing here. Raises what pydicom raises for unreadable files.
    """
    import pydicom

    if _transfer_syntax(path) != DEFLATED:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=tags)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.tag import Tag

    with open(path, "rb") as f:
        read_preamble(f, force=True)
        meta = _read_file_meta_info(f)
        head, _ = _inflate(f, HEADER_PEEK)
    ds = read_dataset(
        DicomBytesIO(head),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
        specific_tags=[Tag(t) for t in tags] if tags is not None else None,
    )
    ds.file_meta = meta
    return ds


def _transfer_syntax(path: Path) -> str:
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:  # no file meta: pydicom guesses the syntax, which is never deflated
        return ""


def _inflate(f: Any, cap: int, keep: bool = True) -> tuple[bytearray, int]:
    """(the first ``cap`` inflated bytes if ``keep``, total inflated size up to ``cap + 1``):
    inflates in chunks, so memory stays at ``cap`` (or a chunk) whatever the file expands to."""
    import zlib  # only for deflated transfer syntaxes

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept, total = bytearray(), 0
    while total <= cap and not inflater.eof:
        data = inflater.unconsumed_tail or f.read(_CHUNK)
        if not data:
            break
        out = inflater.decompress(data, min(_CHUNK, cap + 1 - total))
        total += len(out)
        if keep:
            kept += out[: max(0, cap - len(kept))]
    return kept, total


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` numbers to 3 decimals (micrometres for positions), so float noise in the
    files does not split one series into several."""
    try:
        numbers = tuple(round(float(v), 3) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def read_dicom_file(
    path: Path, window: tuple[float, float] | None = None, *, max_input_bytes: int | None = None
) -> dict[str, Any]:
    """One DICOM file: (C, H, W), or (C, D, H, W) for a multi-frame file. See the module doc.

    ``max_input_bytes``: the limit on the declared decoded size (see :mod:`xai_core.io.limits`).
    """
    limit = max_input_bytes_of(max_input_bytes)
    ds = _read(path, limit)
    shape, itemsize = declared_shape(ds, path)
    check_declared_size(path, shape, itemsize, limit, _describe_shape(shape, ds))
    pixels = _pixels(ds, path)
    notes: list[str] = []
    meta = _common_meta(ds, notes)
    if _is_colour(ds, path):
        rgb = _colour(ds, pixels, path)  # (..., H, W, 3) in [0, 1]
        array = np.moveaxis(rgb, -1, 0)  # channels first: (3, H, W) or (3, D, H, W)
        return {"array": array, "display": to_uint8(rgb), "meta": _noted(meta, notes)}
    if pixels.ndim not in (2, 3):
        raise InputFileError(path, f"grey pixels of shape {pixels.shape}: expected 2D frames")
    values = _modality(ds, pixels, path, notes)
    grey, window_meta = _window(values, ds, window, path)  # (H, W) or (frames, H, W)
    meta.update(window_meta)
    return {"array": grey[None], "display": to_uint8(grey), "meta": _noted(meta, notes)}


def read_dicom_series(
    paths: Sequence[Path],
    window: tuple[float, float] | None = None,
    *,
    max_input_bytes: int | None = None,
) -> dict[str, Any]:
    """Single-frame grey-scale slices sharing a series, stacked into (1, D, H, W).

    The limit (``max_input_bytes``) applies to each slice and to the stacked volume, checked
    from the headers before any slice is decoded.
    """
    limit = max_input_bytes_of(max_input_bytes)
    slices = [(Path(p), _read(Path(p), limit)) for p in paths]
    total = 0
    for path, ds in slices:
        shape, itemsize = declared_shape(ds, path)
        check_declared_size(path, shape, itemsize, limit, _describe_shape(shape, ds))
        total += int(np.prod(shape))
    series_path = slices[0][0].parent
    check_declared_size(series_path, (total,), 4, limit, f"{len(slices)} slices together")
    order, sort_by, positions = _slice_order(slices)
    slices = [slices[i] for i in order]
    first_path, first = slices[0]
    if _is_colour(first, first_path):
        raise InputFileError(first_path, "colour DICOM series are not supported")
    notes: list[str] = []
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
        planes.append(_modality(ds, pixels, path, notes))
    volume = np.stack(planes)
    del planes
    grey, window_meta = _window(volume, first, window, first_path)
    meta = _common_meta(first, notes)
    meta.update(window_meta)
    meta.update({"slices": len(slices), "sorted_by": sort_by})
    if positions is not None and len(positions) > 1:
        meta["slice_spacing"] = float(np.median(np.diff(np.sort(positions))))
    meta = _noted(meta, sorted(set(notes)))
    return {"array": grey[None], "display": to_uint8(grey), "meta": meta}


def _noted(meta: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``meta`` with the tolerated oddities of the file under "notes" (when there are any)."""
    if notes:
        meta["notes"] = list(notes)
    return meta


# -- reading ---------------------------------------------------------------------------------


def _read(path: Path, limit: int) -> Any:
    """The whole dataset. A deflated file is first checked from its header and then by its
    inflated size, counted in chunks, so that pydicom's inflating it in one piece is bounded."""
    import pydicom

    try:
        if _transfer_syntax(path) == DEFLATED:
            header = read_header(path)
            if "Rows" in header:
                shape, itemsize = declared_shape(header, path)
                check_declared_size(path, shape, itemsize, limit, _describe_shape(shape, header))
            with open(path, "rb") as f:
                pydicom.filereader.read_preamble(f, force=True)
                pydicom.filereader._read_file_meta_info(f)
                _, inflated = _inflate(f, limit, keep=False)
            if inflated > limit:
                raise InputTooLargeError(
                    path,
                    f"its deflated dataset inflates to more than the input limit of "
                    f"{format_bytes(limit)} (stopped there; nothing was decoded). If the file "
                    f"is genuine, raise the limit: max_input_bytes= or {ENV_VAR}.",
                    inflated,
                    limit,
                )
        # force=True: many exporters omit the preamble; a non-DICOM file then fails below.
        ds = pydicom.dcmread(path, force=True)
    except InputFileError:
        raise
    except Exception as exc:
        raise InputFileError(
            path, f"not a readable DICOM file ({describe_exception(exc)})"
        ) from exc
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise InputFileError(path, "no pixel data: not a DICOM image (or not DICOM at all)")
    return ds


def declared_shape(ds: Any, path: Path) -> tuple[tuple[int, ...], int]:
    """((frames, rows, columns, samples), bytes per stored value) as the header declares them.

    Raises :class:`InputFileError` naming the tag when one is missing, empty or not a number.
    """
    rows = _count(ds, "Rows", path)
    columns = _count(ds, "Columns", path)
    # NumberOfFrames of 0 is invalid but common in single-frame files; pydicom reads one frame.
    frames = _count(ds, "NumberOfFrames", path, default=1, zero_is_default=True)
    samples = _count(ds, "SamplesPerPixel", path, default=1)
    if _text(ds, "PhotometricInterpretation").upper() == "PALETTE COLOR":
        samples = 3  # the palette turns each index into three 16-bit samples
    if "DoubleFloatPixelData" in ds:
        itemsize = 8
    elif "FloatPixelData" in ds:
        itemsize = 4
    else:
        itemsize = max(1, (_count(ds, "BitsAllocated", path, default=8) + 7) // 8)
    return (frames, rows, columns, samples), itemsize


def _describe_shape(shape: tuple[int, ...], ds: Any) -> str:
    frames, rows, columns, samples = shape
    return (
        f"Rows {rows} x Columns {columns} x {frames} frame(s) x {samples} sample(s) "
        f"of {_text(ds, 'BitsAllocated') or '?'} bits"
    )


def _count(
    ds: Any, keyword: str, path: Path, default: int | None = None, zero_is_default: bool = False
) -> int:
    """A positive whole number from the header; ``default`` when the tag is absent or empty
    (or 0, with ``zero_is_default``)."""
    value = _element(ds, keyword, path)
    if value is None or value == "":
        if default is None:
            raise InputFileError(path, f"no {keyword}: the image size is unknown")
        return default
    if _is_multi(value):
        value = value[0] if len(value) == 1 else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputFileError(path, f"{keyword} {value!r} is not a whole number") from None
    if number == 0 and zero_is_default and default is not None:
        return default
    if not number.is_integer() or number < 1:
        raise InputFileError(path, f"{keyword} is {value!r}; it must be a whole number >= 1")
    return int(number)


def _element(ds: Any, keyword: str, path: Path) -> Any:
    """The value of ``keyword`` (None when absent); a value pydicom cannot decode is an error."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        raise InputFileError(
            path, f"unreadable {keyword} ({describe_exception(exc)})"
        ) from exc


def _text(ds: Any, keyword: str) -> str:
    """A tag as text ("" when absent or undecodable): for names such as the modality."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


def _is_multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


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
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and sequence in shared[0] and shared[0][sequence].value:
            return shared[0][sequence][0]
    except Exception:  # a damaged sequence: as if absent (the tags it holds are optional)
        return None
    return None


def _number(ds: Any, keyword: str, path: Path, hint: str = "") -> float | None:
    """The first number of a possibly multi-valued element; None when absent or empty.

    Text, or a value that is not finite, is an :class:`InputFileError` naming the tag.
    """
    value = _element(ds, keyword, path)
    if _is_multi(value):
        value = value[0] if len(value) else None
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number):
        raise InputFileError(path, f"{keyword} {value!r} is not a finite number{hint}")
    return number


# -- grey-scale pipeline ---------------------------------------------------------------------


def _modality(ds: Any, pixels: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """Stored values to physical units (Hounsfield units for CT), as float32.

    A Modality LUT that is empty or lacks its descriptor or data is ignored (the rescale, or
    none, is used instead) and noted; text in RescaleSlope/RescaleIntercept is an error; a
    slope of 0 (invalid) counts as 1.
    """
    lut = _element(ds, "ModalityLUTSequence", path)
    if lut:
        if "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
            from pydicom.pixels import apply_modality_lut

            try:
                values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
            except Exception as exc:
                raise InputFileError(
                    path, f"unusable Modality LUT ({describe_exception(exc)})"
                ) from exc
            return _finite(values, path, "the Modality LUT gives")
        notes.append("ModalityLUTSequence without LUTDescriptor/LUTData: ignored")
    elif lut is not None:
        notes.append("empty ModalityLUTSequence: ignored")
    source = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:  # enhanced multi-frame files
        source = _shared_group(ds, "PixelValueTransformationSequence") or ds
    slope = _number(source, "RescaleSlope", path) or 1.0  # a slope of 0 is invalid: treat as 1
    intercept = _number(source, "RescaleIntercept", path) or 0.0
    if pixels.dtype.kind == "f":  # float pixel data: say so when the file itself holds NaN
        _finite(pixels, path, "the pixel data holds")
    values = pixels.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported just below
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    return _finite(values, path, f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give")


def _finite(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InputFileError(path, f"{what} values that are not finite in float32 (NaN or inf)")
    return values


_WINDOW_HINT = "; pass a window (centre, width) to use instead of the file's"
_WINDOW_RANGE = 1e30  # beyond any pixel value; keeps the window arithmetic finite in float32


def _file_window(ds: Any, path: Path) -> tuple[float, float] | None:
    """The file's first window (several are allowed: the first is the default one), or None
    when there is none or its width is not positive. Text in it is an error."""
    source = ds if "WindowCenter" in ds else _shared_group(ds, "FrameVOILUTSequence") or ds
    center = _number(source, "WindowCenter", path, _WINDOW_HINT)
    width = _number(source, "WindowWidth", path, _WINDOW_HINT)
    if center is None or width is None or width <= 0:
        return None
    if abs(center) > _WINDOW_RANGE or width > _WINDOW_RANGE:
        raise InputFileError(
            path, f"window centre {center:g}, width {width:g} is out of range{_WINDOW_HINT}"
        )
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
    values: np.ndarray, ds: Any, override: tuple[float, float] | None, path: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    window = override if override is not None else _file_window(ds, path)
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
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        grey = 1.0 - grey  # MONOCHROME1 shows low values bright; make 1 mean bright
    return grey, meta


# -- colour ----------------------------------------------------------------------------------


def _is_colour(ds: Any, path: Path) -> bool:
    photometric = _text(ds, "PhotometricInterpretation").upper()
    return _count(ds, "SamplesPerPixel", path, default=1) > 1 or photometric == "PALETTE COLOR"


def _colour(ds: Any, pixels: np.ndarray, path: Path) -> np.ndarray:
    if _text(ds, "PhotometricInterpretation").upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = np.asarray(apply_color_lut(pixels, ds))
        except Exception as exc:
            raise InputFileError(path, f"bad colour palette: {describe_exception(exc)}") from exc
        top = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else 1.0
    else:
        # pydicom 3 already converts YBR_* to RGB; scale by the stored bit depth.
        top = float(2 ** min(_count(ds, "BitsStored", path, default=8), 64) - 1)
    if pixels.shape[-1] != 3 or pixels.ndim not in (3, 4):
        raise InputFileError(path, f"expected 3 colour samples, got shape {pixels.shape}")
    return _finite(np.clip(pixels.astype(np.float32) / top, 0.0, 1.0), path, "colour gives")


# -- series ----------------------------------------------------------------------------------


def _slice_order(slices: list[tuple[Path, Any]]) -> tuple[list[int], str, np.ndarray | None]:
    """Indices that sort the slices, what they were sorted by, and the positions if known."""
    datasets = [ds for _, ds in slices]
    names = [path.name for path, _ in slices]
    positions = _positions_along_normal(datasets)
    if positions is not None:
        order = sorted(range(len(slices)), key=lambda i: (positions[i], names[i]))
        return order, "ImagePositionPatient", positions
    try:
        numbers = [float(ds.get("InstanceNumber")) for ds in datasets]
    except Exception:  # absent, empty or text in any slice: fall back to the file names
        numbers = None
    if numbers is not None and all(np.isfinite(numbers)):
        order = sorted(range(len(slices)), key=lambda i: (numbers[i], names[i]))
        return order, "InstanceNumber", None
    return sorted(range(len(slices)), key=lambda i: names[i]), "file name", None


def _positions_along_normal(datasets: list[Any]) -> np.ndarray | None:
    """Each slice's position projected on the slice normal (row x column direction)."""
    try:
        ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except Exception:  # absent, empty or text in any slice
        return None
    if ipp.shape != (len(datasets), 3) or not np.isfinite(ipp).all():
        return None
    try:
        iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:6])
    except Exception:
        normal = np.array([0.0, 0.0, 1.0])  # no orientation: assume axial slices
    if not np.any(normal) or not np.isfinite(normal).all():
        normal = np.array([0.0, 0.0, 1.0])
    return ipp @ normal


# -- shared ----------------------------------------------------------------------------------


def _common_meta(ds: Any, notes: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "modality": _text(ds, "Modality") or None,
        "photometric": _text(ds, "PhotometricInterpretation") or None,
        "series_uid": _text(ds, "SeriesInstanceUID") or None,
    }
    try:
        spacing = ds.get("PixelSpacing")
    except Exception:
        spacing = "(undecodable)"
    if spacing is None or spacing == "":
        return meta
    # PixelSpacing is metadata, not used on the pixels: an odd value is noted, never fatal.
    try:
        numbers = [float(v) for v in (spacing if _is_multi(spacing) else [spacing])]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) == 1:  # seen in the wild: one value for square pixels
        numbers *= 2
        notes.append("one-valued PixelSpacing: taken as square pixels")
    if len(numbers) == 2 and all(np.isfinite(n) and n > 0 for n in numbers):
        meta["pixel_spacing"] = numbers
    else:
        notes.append(f"PixelSpacing {spacing!r} ignored: expected two positive numbers")
    return meta


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
