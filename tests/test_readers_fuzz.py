"""Fuzzing the readers: random values in the header fields that matter.

For DICOM, NIfTI and PNG headers, each reader must either return a finite float32 array in
[0, 1] of the documented shape, or raise an :class:`~xai_core.core.errors.XaiError` from one of its
checks (not the catch-all "unexpected error" of :func:`read_item`), and never hang: the limit
on declared sizes keeps every decode small. Derandomized, so that CI is reproducible.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xai_core.core.errors import XaiError
from xai_core.io import InputItem, InputKind, find_inputs, read_item

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom and Pillow warn on odd headers

LIMIT = 16 * 1024**2  # small, so that a header that passes never decodes for long
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check(path: Path, kind: InputKind, rows: int | None = None, columns: int | None = None):
    """Read ``path``; a result must be a finite unit array of the documented shape."""
    try:
        loaded = read_item(InputItem("fuzz", kind, (path,)), max_input_bytes=LIMIT)
    except XaiError as exc:
        assert "unexpected error" not in str(exc), str(exc)  # a case no check foresaw
        return None
    array = loaded.array
    assert array.dtype == np.float32 and array.ndim in (3, 4) and array.shape[0] in (1, 3)
    assert np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0
    assert loaded.display.dtype == np.uint8
    if rows is not None:
        assert array.shape[-2:] == (rows, columns)
    return loaded


# -- DICOM -------------------------------------------------------------------------------------

def pick(draw, good, wild):
    """Mostly a plausible value, one time in four a wild one, so that both the reading path
    and every check get exercised."""
    return draw(wild) if draw(st.integers(0, 3)) == 0 else draw(good)


DS_NUMBER = st.floats(-1e4, 1e4, allow_nan=False).map(lambda x: f"{x:.6g}".encode())
DS_WILD = st.sampled_from(
    [None, b"", b"abc", b"1e38", b"-1e38", b"nan", b"inf", b"0", b"40\\400", b" ", b"1\\x"]
)


WILD_BITS = st.sampled_from([0, 1, 7, 12, 16, 32, 64, 70])


@st.composite
def dicom_headers(draw):
    grey = draw(st.booleans())
    bits = pick(draw, st.sampled_from([8, 16]), WILD_BITS)
    return {
        "Rows": (pick(draw, st.integers(1, 12), st.sampled_from([0, 255, 40000, 65535])), "US"),
        "Columns": (pick(draw, st.integers(1, 12), st.sampled_from([0, 255, 65535])), "US"),
        "BitsAllocated": (bits, "US"),
        "BitsStored": (pick(draw, st.sampled_from([min(bits, 12), bits]), WILD_BITS), "US"),
        "PlanarConfiguration": (pick(draw, st.just(0), st.sampled_from([None, 1, 2])), "US"),
        "PixelRepresentation": (pick(draw, st.sampled_from([0, 1]), st.just(2)), "US"),
        "SamplesPerPixel": (pick(draw, st.just(1 if grey else 3), st.integers(0, 4)), "US"),
        "NumberOfFrames": (
            pick(draw, st.sampled_from([None, b"1", b"2", b"3"]),
                 st.sampled_from([b"", b"0", b"-1", b"xy", b"99999999", b"1.5"])),
            "IS",
        ),
        "PhotometricInterpretation": (
            pick(draw, st.sampled_from([b"MONOCHROME1", b"MONOCHROME2"] if grey else [b"RGB"]),
                 st.sampled_from([b"YBR_FULL", b"PALETTE COLOR", b"", b"FOO", b"RGB"])),
            "CS",
        ),
        "RescaleSlope": (pick(draw, st.one_of(st.none(), DS_NUMBER), DS_WILD), "DS"),
        "RescaleIntercept": (pick(draw, st.one_of(st.none(), DS_NUMBER), DS_WILD), "DS"),
        "WindowCenter": (pick(draw, st.one_of(st.none(), DS_NUMBER), DS_WILD), "DS"),
        "WindowWidth": (pick(draw, st.one_of(st.none(), DS_NUMBER), DS_WILD), "DS"),
        "PixelSpacing": (
            pick(draw, st.sampled_from([None, b"0.5\\0.5"]),
                 st.sampled_from([b"", b"0.5", b"1\\1\\1", b"abc", b"0\\0"])),
            "DS",
        ),
    }


def write_fuzzed_dicom(path: Path, header: dict, pixel_bytes: bytes) -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.tag import Tag
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    for keyword, (value, vr) in header.items():
        if value is None:
            continue
        data = struct.pack("<H", value) if vr == "US" else value
        if len(data) % 2:
            data += b" "  # DICOM values have even lengths
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
    ds.PixelData = pixel_bytes
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


@FUZZ
@given(
    header=dicom_headers(),
    exact=st.integers(0, 4).map(bool),
    extra=st.binary(max_size=99),
    cut=st.one_of(st.none(), st.none(), st.integers(0, 1200)),
)
def test_fuzzed_dicom_headers(tmp_path, header, exact, extra, cut):
    rows, columns = header["Rows"][0], header["Columns"][0]
    samples = max(1, header["SamplesPerPixel"][0])
    bits = max(8, header["BitsAllocated"][0])
    frames = header["NumberOfFrames"][0] or b"1"
    frames = int(frames) if frames.isdigit() else 1
    expected = rows * columns * samples * frames * bits // 8
    # Pixel data of the declared size when that is small, else a few random bytes.
    pixels = bytes(expected) if exact and expected <= 65536 else extra
    if exact and expected <= 65536:  # random values, so the data range is not always empty
        pixels = np.random.default_rng(len(extra)).integers(0, 256, expected, np.uint8).tobytes()
    folder = tmp_path / "dicom"
    folder.mkdir(exist_ok=True)
    path = folder / "fuzz.dcm"
    write_fuzzed_dicom(path, header, pixels + bytes(len(pixels) % 2))
    if cut is not None:  # cut off anywhere, header included
        path.write_bytes(path.read_bytes()[:cut])
    # A folder scan lists the file whatever its state (an image class): never a silent drop.
    assert [item.paths for item in find_inputs([folder])] == [(path,)]
    check(path, InputKind.DICOM, rows, columns)


# -- NIfTI -------------------------------------------------------------------------------------

DTYPES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2304, 9999]
DIM = st.one_of(st.integers(0, 9), st.sampled_from([0, 1, 255, 32767]))


@FUZZ
@given(
    ndim=st.one_of(st.integers(2, 4), st.integers(0, 8)),
    dims=st.lists(st.one_of(st.integers(1, 9), DIM), min_size=7, max_size=7),
    datatype=st.one_of(st.sampled_from([2, 4, 16, 64]), st.sampled_from(DTYPES)),
    slope=st.sampled_from([0.0, 1.0, -2.5, 1e38, float("nan"), float("inf")]),
    pixdim=st.sampled_from([1.0, 0.0, -1.0, float("nan")]),
    sform=st.sampled_from([0, 1, 2]),
    gzipped=st.booleans(),
    exact=st.integers(0, 4).map(bool),
    extra=st.binary(max_size=512),
)
def test_fuzzed_nifti_headers(
    tmp_path, ndim, dims, datatype, slope, pixdim, sform, gzipped, exact, extra
):
    import nibabel as nib

    header = nib.Nifti1Header()
    header["dim"] = [ndim, *dims]
    header["datatype"] = datatype
    header["bitpix"] = 8 * (header.get_data_dtype().itemsize if datatype in (2, 4, 8, 16) else 1)
    header["vox_offset"] = 352
    header["scl_slope"] = slope
    header["pixdim"] = [1.0, pixdim, pixdim, 2.0, 1.0, 1.0, 1.0, 1.0]
    header["sform_code"] = sform
    header["srow_x"] = [pixdim, 0, 0, 0]
    header["srow_y"], header["srow_z"] = [0, 1, 0, 0], [0, 0, 1, 0]
    size = int(np.prod([max(d, 0) for d in dims[: max(ndim, 0)]] or [0]))
    rng = np.random.default_rng(len(extra))
    body = rng.integers(0, 256, min(size, 1 << 16) * 8, np.uint8).tobytes() if exact else extra
    data = header.binaryblock + bytes(4) + body
    path = tmp_path / ("fuzz.nii.gz" if gzipped else "fuzz.nii")
    path.write_bytes(zlib.compress(data, wbits=31) if gzipped else data)
    loaded = check(path, InputKind.NIFTI)
    if loaded is not None:
        assert loaded.array.shape[0] == 1 and loaded.array.size > 0


# -- PNG ---------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@FUZZ
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    ihdr=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from([0, 1, 7, 39, 40000, 2**31 - 1]),
            st.sampled_from([0, 1, 7, 39, 40000, 2**31 - 1]),
            st.sampled_from([0, 1, 2, 4, 8, 16, 3]),
            st.sampled_from([0, 2, 3, 4, 6, 5]),
        ),
    ),
    cut=st.one_of(st.none(), st.integers(8, 400)),
)
def test_fuzzed_png_headers(tmp_path, mode, width, height, seed, ihdr, cut):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    png = buffer.getvalue()
    if ihdr is not None:  # rewrite the declared size, depth and colour type (with a valid CRC)
        fields = struct.pack(">IIBBBBB", *ihdr, 0, 0, 0)
        png = png[:8] + png_chunk(b"IHDR", fields) + png[33:]
    if cut is not None:
        png = png[:cut]
    path = tmp_path / "fuzz.png"
    path.write_bytes(png)
    expect = (height, width) if ihdr is None and cut is None else (None, None)
    loaded = check(path, InputKind.IMAGE, *expect)
    if ihdr is None and cut is None:
        assert loaded is not None  # an intact small PNG always reads
