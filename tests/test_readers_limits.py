"""Decompression bombs: every reader checks the size a file declares before decoding it.

The bombs are built here, small on disk: a gzip of zeros behind a NIfTI header declaring 1000^3
voxels, a deflated DICOM declaring 16000^2 16-bit pixels, a PNG of 12000^2 one-bit pixels. Each
must be refused with :class:`InputTooLargeError` within a second or so and while allocating a
small fraction of what it declares (measured with tracemalloc, which numpy and zlib report to).
"""

from __future__ import annotations

import pickle
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.files import write_dicom_series, write_png
from xai_core.core.errors import InputFileError, InputTooLargeError, OptionError
from xai_core.io import InputKind, find_inputs, read_item
from xai_core.io.dicom import read_dicom_file
from xai_core.io.inputs import read_image, read_nifti
from xai_core.io.limits import DEFAULT_MAX_INPUT_BYTES, ENV_VAR, max_input_bytes

MiB = 1024**2


def deflate_zeros(n: int, prefix: bytes = b"", wrapper: str = "raw") -> bytes:
    """``prefix`` then ``n`` zero bytes, deflated ("raw", "zlib" or "gzip" framing).

    One MiB of zeros is compressed once and its full-flushed block repeated, so building a
    1 GB bomb takes milliseconds. The trailer's checksum is left wrong: a reader that gets that
    far has already decoded everything, which is what these tests forbid.
    """
    wbits = {"raw": -15, "zlib": 15, "gzip": 31}[wrapper]
    deflater = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = deflater.compress(prefix) + deflater.flush(zlib.Z_FULL_FLUSH)
    block = deflater.compress(bytes(MiB)) + deflater.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, MiB)
    return head + block * full + deflater.compress(bytes(rest)) + deflater.flush()


def nifti_bomb(path: Path, shape=(1000, 1000, 1000), dtype=np.uint8) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    prefix = header.binaryblock + b"\0" * 4  # no extensions
    path.write_bytes(deflate_zeros(int(np.prod(shape)) * np.dtype(dtype).itemsize, prefix, "gzip"))
    return path


def deflated_dicom(path: Path, rows: int, columns: int, pixel_bytes: int | None = None) -> Path:
    """A Deflated Explicit VR Little Endian CT of ``rows`` x ``columns`` 16-bit zeros, written
    by hand so that the pixel data is never held in memory (``pixel_bytes`` may lie)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = rows * columns * 2 if pixel_bytes is None else pixel_bytes
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    data = b"\0" * 128 + b"DICM" + head.getvalue()
    path.write_bytes(data + deflate_zeros(n, body.getvalue() + pixel_header))
    return path


def png_bomb(path: Path, size: int = 12000) -> Path:
    """A 1-bit grey PNG of ``size`` x ``size`` zeros (about 20 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = deflate_zeros(size * (1 + (size + 7) // 8), wrapper="zlib")  # filter byte + bits
    ihdr = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def refused_cheaply(read, declared: int) -> InputTooLargeError:
    """Run ``read``; it must raise InputTooLargeError fast, allocating < 2% of ``declared``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputTooLargeError) as info:
            read()
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 3.0, f"took {elapsed:.1f} s"
    assert peak < declared / 50, f"allocated {peak / MiB:.0f} MiB"
    return info.value


def test_nifti_bomb_is_refused_from_its_header(tmp_path):
    path = nifti_bomb(tmp_path / "bomb.nii.gz")
    assert path.stat().st_size < 1.5 * MiB  # ~1 MB on disk, 1 GB of uint8 declared
    (item,) = find_inputs([tmp_path])
    error = refused_cheaply(lambda: read_item(item), 10**9)
    message = str(error)
    assert "bomb.nii.gz" in message and "1000 x 1000 x 1000" in message and "uint8" in message
    assert "512.0 MiB" in message and ENV_VAR in message and "max_input_bytes" in message
    assert error.declared_bytes == 4 * 10**9 and error.limit_bytes == DEFAULT_MAX_INPUT_BYTES
    assert isinstance(error, InputFileError) and error.path == str(path)


def test_deflated_dicom_bomb_is_refused_at_discovery_and_reading(tmp_path):
    path = deflated_dicom(tmp_path / "bomb.dcm", 16000, 16000)
    assert path.stat().st_size < MiB  # ~0.5 MB on disk, 512 MB of pixels declared
    declared = 16000 * 16000 * 2
    # Finding the inputs reads headers only: the bomb is listed without being inflated.
    tracemalloc.start()
    try:
        start = time.perf_counter()
        (item,) = find_inputs([tmp_path])
        elapsed, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert item.paths == (path,) and elapsed < 3.0 and peak < declared / 50
    error = refused_cheaply(lambda: read_item(item), declared)
    assert "Rows 16000 x Columns 16000" in str(error) and "bomb.dcm" in str(error)


def test_deflated_dicom_whose_data_outgrows_its_header_is_stopped(tmp_path):
    # 64 x 64 declared, 400 MB of pixel data deflated: the header passes, the inflating stops.
    path = deflated_dicom(tmp_path / "liar.dcm", 64, 64, pixel_bytes=400 * MiB)
    limit = 32 * MiB
    error = refused_cheaply(lambda: read_dicom_file(path, max_input_bytes=limit), 400 * MiB)
    assert "inflates to more than" in str(error) and error.limit_bytes == limit


def test_small_deflated_dicom_still_reads(tmp_path):
    path = deflated_dicom(tmp_path / "ok.dcm", 8, 6)
    (item,) = find_inputs([path])
    loaded = read_item(item)
    assert loaded.array.shape == (1, 8, 6) and np.isfinite(loaded.array).all()


def test_deflated_series_is_grouped_from_peeked_headers(tmp_path):
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = write_dicom_series(tmp_path / "plain", slices=3, size=8)
    deflated = tmp_path / "deflated"
    deflated.mkdir()
    for path in plain.iterdir():
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(deflated / path.name)
    (item,) = find_inputs([deflated])
    assert item.kind is InputKind.DICOM_SERIES and len(item.paths) == 3
    np.testing.assert_array_equal(read_item(item).array, read_item(find_inputs([plain])[0]).array)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at open
def test_png_bomb_is_refused_from_its_header(tmp_path):
    path = png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    error = refused_cheaply(lambda: read_image(path), 12000 * 12000)
    assert "12000 x 12000 pixels x 1 channel(s)" in str(error) and "PNG 1" in str(error)


@pytest.mark.parametrize("size", [12000, 60000])  # under and over Pillow's own bomb limit
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_jpeg_declaring_a_huge_size_is_refused_from_its_header(tmp_path, size):
    from PIL import Image

    path = tmp_path / "bomb.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, quality=50)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", size, size)
    path.write_bytes(bytes(data))
    error = refused_cheaply(lambda: read_image(path), size * size * 3)
    assert str(size) in str(error) and "bomb.jpg" in str(error)


def test_limit_is_configurable_by_argument_and_environment(tmp_path, monkeypatch):
    png = write_png(tmp_path / "x.png", seed=0, size=48)  # 48 * 48 * 4 bytes as float32
    size = 48 * 48 * 4
    with pytest.raises(InputTooLargeError, match=r"9\.0 KiB decoded.*limit of 9\.0 KiB") as info:
        read_image(png, max_input_bytes=size - 1)
    assert info.value.declared_bytes == size
    assert read_image(png, max_input_bytes=size).array.shape == (1, 48, 48)
    monkeypatch.setenv(ENV_VAR, "1k")
    with pytest.raises(InputTooLargeError):
        read_item(find_inputs([png])[0])
    assert read_image(png, max_input_bytes=size).array.shape == (1, 48, 48)  # argument wins
    monkeypatch.setenv(ENV_VAR, " 2 GiB ")
    assert max_input_bytes() == 2 * 1024**3
    monkeypatch.setenv(ENV_VAR, "1500M")
    assert max_input_bytes() == 1500 * MiB
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(OptionError, match=ENV_VAR):
        read_image(png)
    monkeypatch.delenv(ENV_VAR)
    assert max_input_bytes() == DEFAULT_MAX_INPUT_BYTES
    for bad in (0, -5, 1.5, True, "1G"):
        with pytest.raises(OptionError, match="max_input_bytes"):
            read_image(png, max_input_bytes=bad)


def test_series_limit_counts_the_stacked_volume(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", slices=6, size=16)
    (item,) = find_inputs([folder])
    one_slice = 16 * 16 * 4
    with pytest.raises(InputTooLargeError, match="6 slices together") as info:
        read_item(item, max_input_bytes=6 * one_slice - 1)
    assert info.value.path == str(folder)
    assert read_item(item, max_input_bytes=6 * one_slice).array.shape == (1, 6, 16, 16)


def test_nifti_limit_counts_only_the_volume_that_is_read(tmp_path):
    path = tmp_path / "fmri.nii.gz"
    data = np.random.default_rng(0).random((8, 8, 4, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    one_volume = 8 * 8 * 4 * 4
    assert read_nifti(path, max_input_bytes=one_volume).array.shape == (1, 4, 8, 8)
    with pytest.raises(InputTooLargeError, match=r"first volume of \(8, 8, 4, 30\)"):
        read_nifti(path, max_input_bytes=one_volume - 1)


def test_too_large_error_survives_pickling(tmp_path):
    error = InputTooLargeError(tmp_path / "x.png", "too big", 10, 5)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, copy.declared_bytes, copy.limit_bytes) == (
        error.path, "too big", 10, 5,
    )  # fmt: skip
