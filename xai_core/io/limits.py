"""How much decoded data one input file may declare, checked from its header before decoding.

A 1 MB ``.nii.gz`` of zeros can declare 1000^3 voxels, and a deflated DICOM of a few hundred KB
16000^2 pixels: decoding them first and checking afterwards already costs the gigabytes. So every
reader computes the *declared* size from the header (NIfTI dims, DICOM Rows x Columns x frames x
samples, PNG/JPEG width x height x bands) and compares it with the limit before any pixel is
decoded.

The declared size counts each value as a float32 (4 bytes, the form every reader returns) or as
its stored size when that is larger (float64 NIfTI). Reading holds a few such arrays at once
(stored pixels, physical units, windowed): peak memory measured about 2.5 times the declared size.

The limit, first match wins: the ``max_input_bytes`` argument of the reading functions, the
environment variable ``XAI_CORE_MAX_INPUT_BYTES`` (bytes, or with a unit: ``2GiB``, ``1500M``;
all units are powers of 1024), else :data:`DEFAULT_MAX_INPUT_BYTES` (512 MiB: a 512 x 512 x 512
CT, an 11,000^2 grey or 6,500^2 colour image).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from xai_core.core.errors import InputTooLargeError, OptionError

DEFAULT_MAX_INPUT_BYTES = 512 * 1024**2
ENV_VAR = "XAI_CORE_MAX_INPUT_BYTES"
DECODED_ITEMSIZE = 4  # the readers return float32
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def max_input_bytes(value: int | None = None) -> int:
    """The limit in bytes: ``value`` if given, else the environment variable, else the default."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"max_input_bytes must be a positive number of bytes; got {value!r}.")
        return value
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return DEFAULT_MAX_INPUT_BYTES
    match = _SIZE.fullmatch(text)
    if match is None or float(match[1]) <= 0:
        raise OptionError(
            f"{ENV_VAR}={text!r} is not a size; use bytes or a number with a unit, e.g. 2GiB."
        )
    return max(1, int(float(match[1]) * _UNITS[match[2].lower()]))


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def check_declared_size(
    path: Path, shape: Sequence[int], itemsize: int, limit: int | None, what: str = ""
) -> None:
    """Raise :class:`InputTooLargeError` when ``shape`` of ``itemsize``-byte values is over the
    limit (``limit`` None: the environment's or the default). ``what`` describes the shape."""
    values = math.prod(int(n) for n in shape)
    declared = values * max(int(itemsize), DECODED_ITEMSIZE)
    allowed = max_input_bytes(limit)
    if declared <= allowed:
        return
    dims = " x ".join(str(int(n)) for n in shape)
    raise InputTooLargeError(
        path,
        f"it declares {what or dims} = {values:,} values, {format_bytes(declared)} decoded, over "
        f"the input limit of {format_bytes(allowed)}. Nothing was decoded. If the file is "
        f"genuine, raise the limit: max_input_bytes= when reading, or the environment variable "
        f"{ENV_VAR} (e.g. {ENV_VAR}=4GiB).",
        declared,
        allowed,
    )
