"""Malformed and odd files, made from the real samples pydicom and nibabel ship.

Tolerable oddities (a one-valued PixelSpacing, an empty Modality LUT, missing optional tags,
several windows) are read and noted in ``meta["notes"]``; malformed values (text where a number
belongs, zero sizes, a file cut short) give an :class:`InputFileError` that names the file and
the tag at fault, and a cut-off file in a folder is listed so that its failure is reported.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from tests.files import write_dicom_series
from xai_core.core.errors import InputFileError
from xai_core.io import InputKind, find_inputs, read_item

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid values


def sample(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def raw(ds: Dataset, keyword: str, value: bytes, vr: str = "DS") -> None:
    """Store ``value`` as the tag's bytes, bypassing pydicom's validation (as a broken writer
    would)."""
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


def read(path: Path, **kwargs):
    (item,) = find_inputs([path])
    return read_item(item, **kwargs)


def reference(name: str, tmp_path: Path):
    return read(save(sample(name), tmp_path / f"ref_{name}"))


# -- tolerated, and noted ----------------------------------------------------------------------


def test_one_valued_pixel_spacing_means_square_pixels(tmp_path):
    ds = sample("CT_small.dcm")
    ds.PixelSpacing = 0.5
    loaded = read(save(ds, tmp_path / "ct.dcm"))
    assert loaded.meta["pixel_spacing"] == [0.5, 0.5]
    assert any("one-valued PixelSpacing" in note for note in loaded.meta["notes"])
    np.testing.assert_array_equal(loaded.array, reference("CT_small.dcm", tmp_path).array)


@pytest.mark.parametrize("spacing", [[0.5, 0.5, 0.5], b"abc", b"0\\0"])
def test_unusable_pixel_spacing_is_ignored_not_fatal(tmp_path, spacing):
    ds = sample("MR_small.dcm")
    if isinstance(spacing, bytes):
        raw(ds, "PixelSpacing", spacing)
    else:
        ds.PixelSpacing = spacing
    loaded = read(save(ds, tmp_path / "mr.dcm"))
    assert "pixel_spacing" not in loaded.meta
    assert any("PixelSpacing" in note and "ignored" in note for note in loaded.meta["notes"])


@pytest.mark.parametrize("items", [[], [Dataset()]], ids=["no item", "empty item"])
def test_empty_modality_lut_is_ignored_and_the_rescale_used(tmp_path, items):
    ds = sample("CT_small.dcm")
    ds.ModalityLUTSequence = Sequence(items)
    loaded = read(save(ds, tmp_path / "ct.dcm"))
    np.testing.assert_array_equal(loaded.array, reference("CT_small.dcm", tmp_path).array)
    assert any("ModalityLUTSequence" in note for note in loaded.meta["notes"])


def test_missing_optional_tags_are_fine(tmp_path):
    ds = sample("CT_small.dcm")
    for keyword in ("RescaleSlope", "RescaleIntercept", "PixelSpacing", "Modality",
                    "SeriesInstanceUID", "ImagePositionPatient", "InstanceNumber"):  # fmt: skip
        delattr(ds, keyword)
    loaded = read(save(ds, tmp_path / "ct.dcm"))
    stored = ds.pixel_array.astype(np.float32)
    expected = (stored - stored.min()) / (stored.max() - stored.min())  # the data range
    np.testing.assert_allclose(loaded.array[0], expected, atol=1e-6)
    assert loaded.meta["modality"] is None and "notes" not in loaded.meta


def test_several_windows_use_the_first(tmp_path):
    ds = sample("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = [40, 300], [400, 1500]
    assert read(save(ds, tmp_path / "ct.dcm")).meta["window"] == [40.0, 400.0]


def test_multiframe_rtdose_reads_as_a_volume(tmp_path):
    loaded = reference("rtdose.dcm", tmp_path)
    assert loaded.array.shape == (1, 15, 10, 10) and np.isfinite(loaded.array).all()


# -- malformed: a typed error naming the file and the tag --------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("RescaleSlope", b"abc "),
        ("RescaleIntercept", b"12a "),
        ("RescaleSlope", b"inf "),
        ("WindowCenter", b"abc "),
        ("WindowWidth", b"wide"),
    ],
)
def test_text_in_numeric_tags_is_a_typed_error(tmp_path, keyword, value):
    ds = sample("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    raw(ds, keyword, value)
    path = save(ds, tmp_path / "ct.dcm")
    with pytest.raises(InputFileError, match=keyword) as info:
        read(path)
    assert info.value.path == str(path) and "ct.dcm" in str(info.value)
    assert value.decode().strip() in info.value.reason
    if keyword.startswith("Window"):  # a window given by the user replaces the broken one
        assert read(path, window=(40, 400)).meta["window_source"] == "override"


def test_rescale_that_overflows_float32_is_a_typed_error(tmp_path):
    ds = sample("CT_small.dcm")
    ds.RescaleSlope = "1e38"
    with pytest.raises(InputFileError, match="not finite"):
        read(save(ds, tmp_path / "ct.dcm"))


@pytest.mark.parametrize(
    ("keyword", "value", "vr"),
    [("NumberOfFrames", b"xy", "IS"), ("NumberOfFrames", b"-1", "IS"), ("Rows", b"\0\0", "US")],
)
def test_bad_sizes_are_typed_errors(tmp_path, keyword, value, vr):
    ds = sample("MR_small.dcm")
    raw(ds, keyword, value, vr)
    with pytest.raises(InputFileError, match=keyword):
        read(save(ds, tmp_path / "mr.dcm"))


def test_number_of_frames_of_zero_means_one_frame(tmp_path):
    ds = sample("MR_small.dcm")
    raw(ds, "NumberOfFrames", b"0 ", "IS")  # invalid, but seen in single-frame files
    loaded = read(save(ds, tmp_path / "mr.dcm"))
    np.testing.assert_array_equal(loaded.array, reference("MR_small.dcm", tmp_path).array)


def test_text_instance_numbers_fall_back_to_file_names(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", slices=3, size=8)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        raw(ds, "InstanceNumber", b"x ", "IS")
        ds.save_as(path)
    (item,) = find_inputs([folder])
    assert read_item(item).meta["sorted_by"] == "file name"


# -- NIfTI -------------------------------------------------------------------------------------


def test_shipped_nifti_samples_read(tmp_path):
    anatomical = read(Path(data_path) / "anatomical.nii")
    assert anatomical.array.shape == (1, 25, 41, 33)
    four_d = read(Path(data_path) / "example4d.nii.gz")  # the first of two volumes
    assert four_d.array.shape == (1, 24, 96, 128)
    assert np.isfinite(anatomical.array).all() and np.isfinite(four_d.array).all()


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_nifti_with_a_zero_length_dimension_is_a_typed_error(tmp_path, axis):
    source = (Path(data_path) / "anatomical.nii").read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(source))
    dims = header["dim"].copy()
    dims[axis] = 0
    header["dim"] = dims
    path = tmp_path / "empty.nii"
    path.write_bytes(header.binaryblock + source[len(header.binaryblock) :])
    with pytest.raises(InputFileError, match="dimension of length 0") as info:
        read(path)
    assert info.value.path == str(path)


# -- a cut-off file in a folder is listed, and fails when read ---------------------------------


@pytest.mark.parametrize("length", [200, 600, 1500, 3000, 10000, 39000])
def test_truncated_dicom_in_a_folder_is_listed_and_reported(tmp_path, length):
    folder = tmp_path / "study"
    write_dicom_series(folder / "series", slices=3, size=8)
    whole = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "cut.dcm").write_bytes(whole[:length])
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    items = {item.key: item for item in find_inputs([folder])}
    assert set(items) == {"cut.dcm", "mr.dcm", "series"}
    assert items["series"].kind is InputKind.DICOM_SERIES
    with pytest.raises(InputFileError) as info:
        read_item(items["cut.dcm"])
    assert info.value.path == str(folder / "cut.dcm") and info.value.reason


def test_a_real_report_is_still_skipped_in_folders(tmp_path):
    ds = sample("MR_small.dcm")
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    save(ds, tmp_path / "report.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    assert [item.key for item in find_inputs([tmp_path])] == ["mr.dcm"]


def test_float_pixel_data_with_nan_names_the_pixel_data(tmp_path):
    ds = sample("MR_small.dcm")
    values = np.ones((ds.Rows, ds.Columns), np.float32)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.tobytes()
    assert read(save(ds, tmp_path / "ok.dcm")).array.shape == (1, ds.Rows, ds.Columns)
    values[3, 4] = np.nan
    ds.FloatPixelData = values.tobytes()
    with pytest.raises(InputFileError, match="the pixel data holds values that are not finite"):
        read(save(ds, tmp_path / "nan.dcm"))
