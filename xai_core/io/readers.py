"""Input readers: what turns one file into a :class:`~xai_core.io.inputs.LoadedInput`.

Readers are registered through the ``register_readers`` hook. The core registers its own
(:data:`BUILTIN_READERS`: NIfTI, PNG/JPEG, DICOM, asked in this order); a plugin adds readers for
other formats (whole-slide images, Zarr, video frames...). :func:`~xai_core.io.find_inputs` asks
each reader's cheap ``claims(path)`` in turn, the core's first, and
:func:`~xai_core.io.read_item` calls the claiming reader's ``read(path, options)``. The slices of
a DICOM series in one folder stay grouped by the core (one volume per series).

``options`` is a :class:`ReadOptions`: the input size limit (:mod:`xai_core.io.limits`) every
reader must check from the header before decoding, and the DICOM window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from xai_core.io import dicom
from xai_core.io.inputs import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    LoadedInput,
    read_image,
    read_nifti,
)
from xai_core.io.limits import check_declared_size


@dataclass(frozen=True)
class ReadOptions:
    """How to read one input: ``max_input_bytes`` is the limit on the decoded size a file may
    declare (already resolved from the argument, ``XAI_CORE_MAX_INPUT_BYTES`` or the default);
    ``window`` a DICOM window (centre, width) overriding a file's own."""

    max_input_bytes: int
    window: tuple[float, float] | None = None

    def check_size(
        self, path: Path, shape: Sequence[int], itemsize: int = 4, what: str = ""
    ) -> None:
        """Raise :class:`~xai_core.core.errors.InputTooLargeError` if ``shape`` of ``itemsize``-byte
        values is over the limit: call it with the header's shape before decoding."""
        check_declared_size(path, shape, itemsize, self.max_input_bytes, what)


@runtime_checkable
class Reader(Protocol):
    """What ``register_readers`` takes (a class with these, or an instance)."""

    name: str

    def claims(self, path: Path) -> bool:
        """Whether this reader reads ``path``: by name or a few header bytes, never decoding."""
        ...

    def read(self, path: Path, options: ReadOptions) -> LoadedInput:
        """The file as a ``LoadedInput``: ``array`` float32 in [0, 1], (C, H, W) or
        (C, D, H, W); ``display`` uint8; ``meta`` a dict. Raise ``InputFileError`` for a bad
        file and check ``options.max_input_bytes`` before decoding."""
        ...


class NiftiReader:
    """NIfTI volumes (``.nii``, ``.nii.gz``)."""

    name = "nifti"

    @staticmethod
    def claims(path: Path) -> bool:

        return path.name.lower().endswith(NIFTI_SUFFIXES)

    @staticmethod
    def read(path: Path, options: ReadOptions) -> LoadedInput:

        return read_nifti(path, max_input_bytes=options.max_input_bytes)


class ImageReader:
    """PNG and JPEG images."""

    name = "image"

    @staticmethod
    def claims(path: Path) -> bool:

        return path.suffix.lower() in IMAGE_SUFFIXES

    @staticmethod
    def read(path: Path, options: ReadOptions) -> LoadedInput:

        return read_image(path, max_input_bytes=options.max_input_bytes)


class DicomReader:
    """DICOM files: by extension, or without one by the 128-byte preamble and ``DICM``."""

    name = "dicom"

    @staticmethod
    def claims(path: Path) -> bool:

        suffix = path.suffix.lower()
        if suffix in DICOM_SUFFIXES:
            return True
        # Scanners often name files by their UID ("1.2.840.113619.2.55.3"): a numeric suffix is
        # no extension. DICOMDIR is an index of a CD, not an image.
        no_extension = suffix == "" or suffix[1:].isdigit()
        return no_extension and path.name.lower() != "dicomdir" and dicom.has_dicom_preamble(path)

    @staticmethod
    def read(path: Path, options: ReadOptions) -> LoadedInput:
        from xai_core.io.inputs import LoadedInput

        read = dicom.read_dicom_file(path, options.window, max_input_bytes=options.max_input_bytes)
        return LoadedInput(**read)


BUILTIN_READERS = (NiftiReader, ImageReader, DicomReader)
