"""The file layer: reading images, DICOM and NIfTI; preprocessing; loading models; outputs."""

from __future__ import annotations

import io
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from xai_core.core.errors import InputFileError, ModelError, OptionError, OutputFileError
from xai_core.io import (
    InputItem,
    InputKind,
    Preprocess,
    RunLedger,
    atomic_open,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_text,
    find_inputs,
    load_model,
    read_item,
    read_sidecar,
)
from xai_core.io.models import is_torchscript
from xai_core.testing import tiny_cnn

RNG = np.random.default_rng(0)


def read(path: Path, **kwargs):
    (item,) = find_inputs([path])
    return read_item(item, **kwargs)


# -- PNG and JPEG ----------------------------------------------------------------------------


def test_png_grey_8bit_round_trip(tmp_path):
    pixels = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    loaded = read(tmp_path / "x.png")
    assert loaded.array.dtype == np.float32 and loaded.array.shape == (1, 5, 7)
    np.testing.assert_array_equal(loaded.array[0], pixels / np.float32(255))
    np.testing.assert_array_equal(loaded.display, pixels)
    assert not loaded.is_volume and loaded.meta["bits"] == 8


def test_png_rgb_and_rgba_drop_alpha(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.PNG")  # upper-case extension
    for name in ("rgb.png", "rgba.PNG"):
        loaded = read(tmp_path / name)
        assert loaded.array.shape == (3, 4, 6)
        np.testing.assert_array_equal(
            loaded.array, np.moveaxis(rgba[..., :3], -1, 0) / np.float32(255)
        )
        np.testing.assert_array_equal(loaded.display, rgba[..., :3])


def test_png_16bit_keeps_precision(tmp_path):
    pixels = np.array([[0, 1, 4095], [30000, 65535, 12]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x16.png")
    loaded = read(tmp_path / "x16.png")
    assert loaded.meta["bits"] == 16 and loaded.array.shape == (1, 2, 3)
    np.testing.assert_allclose(loaded.array[0], pixels / 65535.0, rtol=0, atol=1e-7)
    assert loaded.array[0, 0, 1] > 0  # 1 and 0 stay distinct: no 8-bit round trip
    assert loaded.display.dtype == np.uint8
    assert loaded.display.min() == 0 and loaded.display.max() == 255


def test_jpeg_grey_and_rgb(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (24, 1))
    grey = ramp.astype(np.uint8)
    rgb = np.stack([grey, grey[:, ::-1], np.full_like(grey, 90)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "c.JPEG", quality=95)
    g, c = read(tmp_path / "g.jpg"), read(tmp_path / "c.JPEG")
    assert g.array.shape == (1, 24, 32) and c.array.shape == (3, 24, 32)
    assert np.abs(g.array[0] - grey / 255.0).mean() < 2 / 255  # lossy, but close
    assert np.abs(c.array - np.moveaxis(rgb, -1, 0) / 255.0).mean() < 3 / 255


def test_jpeg_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((2, 5), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert read(tmp_path / "phone.jpg").array.shape == (1, 5, 2)


def test_palette_png_grey_palette_stays_one_channel(tmp_path):
    grey = Image.fromarray(RNG.integers(0, 256, (4, 4), dtype=np.uint8)).convert("P")
    grey.save(tmp_path / "p.png")
    assert read(tmp_path / "p.png").array.shape[0] == 1


# -- DICOM -----------------------------------------------------------------------------------


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    series_uid: str | None = None,
    position: tuple[float, float, float] | None = None,
    instance: int | None = None,
    implicit: bool = True,
    modality: str = "CT",
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    pixels: bool = True,
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing = [0.5, 0.5]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    if pixels:
        ds.PixelData = stored.astype("<i2").tobytes()
    else:  # a structured report: no image at all (and a class that says so)
        del ds.Rows, ds.Columns
        ds.SOPClassUID = meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.save_as(path, enforce_file_format=True)
    return path


# Stored values whose Hounsfield units (0.5 * s - 1024) sit on the window's edges: c=40, w=400.
STORED = np.array([[1728, 2128, 2526], [0, 2127, 4000]], dtype=np.int16)
HU = 0.5 * STORED - 1024  # [[-160, 40, 239], [-1024, 39.5, 976]]
WINDOWED = np.array([[0.0, 0.5 + 0.5 / 399, 1.0], [0.0, 0.5, 1.0]], dtype=np.float32)


@pytest.mark.parametrize("implicit", [True, False])
def test_dicom_rescale_then_window(tmp_path, implicit):
    path = write_dicom(
        tmp_path / "ct.dcm", STORED, slope=0.5, intercept=-1024, window=(40, 400), implicit=implicit
    )
    loaded = read(path)
    assert loaded.array.shape == (1, 2, 3) and loaded.array.dtype == np.float32
    np.testing.assert_allclose(loaded.array[0], WINDOWED, atol=1e-6)
    assert loaded.meta["window"] == [40.0, 400.0] and loaded.meta["window_source"] == "file"
    np.testing.assert_array_equal(loaded.display, np.round(WINDOWED * 255).astype(np.uint8))


def test_dicom_window_override_and_data_range(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", STORED, slope=0.5, intercept=-1024)
    no_window = read(path)  # no window in the file: the data range
    np.testing.assert_allclose(
        no_window.array[0], (HU - HU.min()) / (HU.max() - HU.min()), atol=1e-6
    )
    override = read(path, window=(40, 400))
    np.testing.assert_allclose(override.array[0], WINDOWED, atol=1e-6)
    assert override.meta["window_source"] == "override"


def test_dicom_monochrome1_is_inverted(tmp_path):
    path = write_dicom(
        tmp_path / "cr.dcm",
        STORED,
        slope=0.5,
        intercept=-1024,
        window=(40, 400),
        photometric="MONOCHROME1",
    )
    np.testing.assert_allclose(read(path).array[0], 1.0 - WINDOWED, atol=1e-6)


def write_series(folder: Path, *, positions: bool = True) -> list[int]:
    """Four constant slices; file names and instance numbers both disagree with position."""
    folder.mkdir(parents=True, exist_ok=True)
    values = [0, 10, 20, 30]  # the value of the slice at z = -5, 0, 5, 10
    names = ["c", "a", "d", "b"]  # so sorting by name would give 10, 30, 0, 20
    for i, value in enumerate(values):
        write_dicom(
            folder / f"{names[i]}.dcm",
            np.full((3, 4), value, np.int16),
            series_uid="1.2.3.4",
            position=(0.0, 0.0, -5.0 + 5 * i) if positions else None,
            instance=4 - i,  # reversed: position must win over InstanceNumber
        )
    return values


def test_dicom_series_is_one_volume_ordered_by_position(tmp_path):
    values = write_series(tmp_path / "ct")
    (item,) = find_inputs([tmp_path])
    assert item.kind is InputKind.DICOM_SERIES and item.key == "ct" and len(item.paths) == 4
    loaded = read_item(item)
    assert loaded.is_volume and loaded.array.shape == (1, 4, 3, 4)
    np.testing.assert_allclose(loaded.array[0, :, 0, 0], np.array(values) / 30.0, atol=1e-6)
    assert loaded.meta["sorted_by"] == "ImagePositionPatient"
    assert loaded.meta["slice_spacing"] == 5.0 and loaded.display.shape == (4, 3, 4)


def test_dicom_series_falls_back_to_instance_number(tmp_path):
    values = write_series(tmp_path / "ct", positions=False)
    loaded = read_item(find_inputs([tmp_path / "ct"])[0])
    assert loaded.meta["sorted_by"] == "InstanceNumber"
    np.testing.assert_allclose(loaded.array[0, :, 0, 0], np.array(values[::-1]) / 30.0)


def test_dicom_folder_with_two_series_and_extensionless_files(tmp_path):
    for i in range(2):
        write_dicom(tmp_path / f"IM{i}", np.zeros((2, 2), np.int16), series_uid="1.1")
        write_dicom(tmp_path / f"1.2.840.{i}", np.zeros((2, 2), np.int16), series_uid="2.2")
    items = find_inputs([tmp_path])
    assert [i.kind for i in items] == [InputKind.DICOM_SERIES] * 2
    assert len({i.key for i in items}) == 2
    assert all(i.key.startswith(f"{tmp_path.name}__series-") for i in items)


def test_only_slices_of_one_volume_are_stacked(tmp_path):
    flat = np.zeros((2, 2), np.int16)
    for i in range(2):
        # Radiographs sharing a series (two views) are separate images.
        write_dicom(tmp_path / f"dx{i}.dcm", flat, series_uid="1.1", modality="DX")
        # Two echoes at the same positions are not one volume either.
        for echo in range(2):
            write_dicom(
                tmp_path / f"mr{i}{echo}.dcm",
                flat,
                series_uid="2.2",
                modality="MR",
                position=(0, 0, i),
            )
    # Axial slices plus a sagittal scout in one series: the scout is left out of the volume.
    for i in range(3):
        write_dicom(tmp_path / f"ct{i}.dcm", flat, series_uid="3.3", position=(0, 0, i))
    write_dicom(tmp_path / "scout.dcm", flat, series_uid="3.3", position=(0, 0, 0),
                orientation=(0, 1, 0, 0, 0, -1))  # fmt: skip
    # A structured report (no pixels) has nothing to explain.
    write_dicom(tmp_path / "report.dcm", flat, series_uid="4.4", pixels=False)
    items = find_inputs([tmp_path])
    (volume,) = [i for i in items if i.kind is InputKind.DICOM_SERIES]
    assert sorted(p.name for p in volume.paths) == ["ct0.dcm", "ct1.dcm", "ct2.dcm"]
    singles = sorted(i.key for i in items if i.kind is InputKind.DICOM)
    assert singles == ["dx0.dcm", "dx1.dcm", "mr00.dcm", "mr01.dcm", "mr10.dcm", "mr11.dcm",
                       "scout.dcm"]  # fmt: skip
    (report,) = find_inputs([tmp_path / "report.dcm"])  # named explicitly: read and reported
    with pytest.raises(InputFileError, match="no pixel data"):
        read_item(report)


# -- NIfTI -----------------------------------------------------------------------------------


def robust(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / (high - low), 0, 1)


def test_nifti_axes_spacing_and_scaling(tmp_path):
    data = RNG.normal(size=(4, 5, 6)).astype(np.float32)  # (x, y, z) in RAS+
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    loaded = read(tmp_path / "v.nii.gz")
    assert loaded.array.shape == (1, 6, 5, 4) and loaded.display.shape == (6, 5, 4)
    expected = robust(data).transpose(2, 1, 0)[:, ::-1, ::-1]  # (z, -y, -x)
    np.testing.assert_allclose(loaded.array[0], expected, atol=1e-5)
    assert loaded.meta["spacing"] == [3.0, 2.0, 1.0]

    # The same anatomy stored left-right and front-back flipped (LPS+) reads the same.
    lps = np.diag([-1.0, -2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), lps), tmp_path / "lps.nii")
    np.testing.assert_allclose(read(tmp_path / "lps.nii").array, loaded.array, atol=1e-6)


def test_nifti_4d_takes_first_volume_and_scaling_is_robust(tmp_path):
    data = RNG.uniform(0, 100, size=(12, 10, 8)).astype(np.float32)
    data[0, 0, 0] = 1e6  # one hot voxel must not squash the rest
    series = np.stack([data, data + 500], axis=-1)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "t.nii")
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii")
    four_d, three_d = read(tmp_path / "t.nii"), read(tmp_path / "v.nii")
    assert four_d.array.shape == (1, 8, 10, 12)
    np.testing.assert_array_equal(four_d.array, three_d.array)
    assert np.median(three_d.array) > 0.3


# -- unreadable files ------------------------------------------------------------------------


def corrupt_files(folder: Path) -> list[Path]:
    good = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    jpeg = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    nifti = folder / "whole.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), nifti)
    dcm = write_dicom(folder / "whole.dcm", np.zeros((16, 16), np.int16))
    files = {
        "bad.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
        "cut.png": good.getvalue()[: len(good.getvalue()) // 2],
        "cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "bad.dcm": b"this is not DICOM" * 20,
        "cut.dcm": dcm.read_bytes()[:-100],
        "bad.nii.gz": b"\x1f\x8b" + b"not gzip" * 30,
        "cut.nii": nifti.read_bytes()[:-500],
    }
    nifti.unlink()
    dcm.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_corrupt_files_raise_input_file_error_naming_the_file(tmp_path):
    paths = corrupt_files(tmp_path)
    items = find_inputs([tmp_path])
    assert len(items) == len(paths)  # found by name; failures come when read
    for item in items:
        with pytest.raises(InputFileError) as info:
            read_item(item)
        assert info.value.path == str(item.paths[0]) and item.paths[0].name in str(info.value)
        assert isinstance(info.value, ValueError) and info.value.reason


def test_series_with_a_corrupt_slice_names_that_slice(tmp_path):
    write_series(tmp_path / "ct")
    (item,) = find_inputs([tmp_path / "ct"])
    item.paths[1].write_bytes(item.paths[1].read_bytes()[:-20])
    with pytest.raises(InputFileError, match=re.escape(item.paths[1].name)) as info:
        read_item(item)
    assert info.value.path == str(item.paths[1])


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        find_inputs([tmp_path / "nope.png"])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputFileError, match=r"notes\.txt"):
        find_inputs([tmp_path / "notes.txt"])


# -- finding ---------------------------------------------------------------------------------


def test_find_inputs_mixed_folder(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "sub" / "a b.JPG")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".git").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / ".git" / "x.png")
    write_dicom(tmp_path / "sub" / "IM0001", np.zeros((2, 2), np.int16))  # no extension
    write_series(tmp_path / "sub" / "ct")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")

    items = find_inputs([tmp_path, tmp_path / "b.png"])  # b.png twice: listed once
    assert [(i.key, str(i.kind)) for i in items] == [
        ("b.png", "image"),
        ("sub__IM0001", "dicom"),
        ("sub__a_b.JPG", "image"),
        ("sub__ct", "dicom-series"),
        ("v.nii.gz", "nifti"),
    ]
    assert items == find_inputs([tmp_path]) == find_inputs(str(tmp_path))  # deterministic
    assert items[3].source == tmp_path / "sub" / "ct"


def test_colliding_keys_are_made_unique(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / folder / "x.png")
    items = find_inputs([tmp_path / "one" / "x.png", tmp_path / "two" / "x.png"])
    assert items[0].key == "x.png" and items[1].key.startswith("x.png-")
    assert find_inputs([tmp_path / "one" / "x.png", tmp_path / "two" / "x.png"]) == items


# -- preprocessing ---------------------------------------------------------------------------


def test_preprocess_resize_channels_and_normalise():
    grey = np.full((1, 8, 10), 0.5, np.float32)
    x = Preprocess(size=(4, 5), channels=3, mean=(0.5, 0.25, 0.0), std=0.25).to_tensor(grey)
    assert x.shape == (1, 3, 4, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([0.0, 1.0, 2.0]))

    rgb = np.zeros((3, 2, 2), np.float32)
    rgb[0] = 1.0  # pure red
    y = Preprocess(channels=1).to_tensor(rgb)
    assert y.shape == (1, 1, 2, 2)
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 0.299))

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    shrunk = Preprocess(size=(4, 4)).to_tensor(ramp)
    assert shrunk.min() >= 0 and shrunk.max() <= 1 and shrunk[0, 0, 0, 0] < shrunk[0, 0, -1, -1]


def test_preprocess_volumes_and_slices():
    volume = RNG.uniform(size=(1, 4, 6, 8)).astype(np.float32)
    whole = Preprocess().to_tensor(volume)
    assert whole.shape == (1, 1, 4, 6, 8)
    torch.testing.assert_close(whole[0], torch.from_numpy(volume))
    assert Preprocess(size=(2, 3, 4)).to_tensor(volume).shape == (1, 1, 2, 3, 4)
    assert Preprocess(size=(3, 4)).to_tensor(volume).shape == (1, 1, 4, 3, 4)  # depth kept
    sagittal = Preprocess(slice_axis=2, channels=3).to_tensor(volume)
    assert sagittal.shape == (8, 3, 4, 6)
    torch.testing.assert_close(sagittal[5, 1], torch.from_numpy(volume[0, :, :, 5]))
    assert Preprocess(slice_axis=0, size=(12, 16)).to_tensor(volume).shape == (4, 1, 12, 16)


def test_preprocess_rejects_bad_settings():
    for bad in ({"channels": 2}, {"size": (0, 4)}, {"std": (1.0, 0.0)}, {"slice_axis": 3}):
        with pytest.raises(OptionError):
            Preprocess(**bad)
    with pytest.raises(OptionError, match="mean has 2 values"):
        Preprocess(mean=(0.1, 0.2)).to_tensor(np.zeros((3, 2, 2), np.float32))


def test_sidecar_lookup_and_overrides(tmp_path):
    model = tmp_path / "net.onnx"
    model.write_bytes(b"onnx")
    assert Preprocess.from_sidecar(model) == Preprocess()
    (tmp_path / "xai.json").write_text('{"size": [32, 32], "channels": 1}')
    assert Preprocess.from_sidecar(model) == Preprocess(size=(32, 32), channels=1)
    (tmp_path / "net.onnx.json").write_text(
        '{"size": [224, 224], "mean": [0.5], "std": [0.25], "channels": 3, '
        '"class_names": ["normal", "effusion"]}'
    )
    pre = Preprocess.from_sidecar(model, size=[128, 128], channels=None)  # None: not given
    assert pre == Preprocess(size=(128, 128), mean=(0.5,), std=(0.25,), channels=3)
    assert read_sidecar(model)["class_names"] == ["normal", "effusion"]
    assert load_model(str(model)) == (
        str(model),
        {
            "kind": "onnx",
            "path": str(model),
            "sidecar": str(tmp_path / "net.onnx.json"),
            "class_names": ["normal", "effusion"],
        },
    )

    (tmp_path / "net.onnx.json").write_text('{"sise": [1, 2]}')
    with pytest.raises(ModelError, match=r"net.onnx.json.*Did you mean 'size'"):
        Preprocess.from_sidecar(model)
    (tmp_path / "net.onnx.json").write_text('{"size": [1, 2],')
    with pytest.raises(ModelError, match="not readable JSON"):
        read_sidecar(model)
    (tmp_path / "net.onnx.json").write_text('{"channels": 4}')
    with pytest.raises(ModelError, match="channels must be 1 or 3"):
        read_sidecar(model)


# -- models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so loading them is tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
    return model


def test_torchvision_state_dict_round_trip(tmp_path, resnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = resnet(x)
    plain = tmp_path / "plain.pth"
    torch.save(resnet.state_dict(), plain)
    # A training checkpoint with DataParallel's prefix, and the legacy (non-zip) format.
    wrapped = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in resnet.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state}, wrapped, _use_new_zipfile_serialization=False)
    for path in (plain, wrapped):
        model, info = load_model(str(path), arch="resnet18")
        assert info == {"kind": "torchvision", "path": str(path), "arch": "resnet18",
                        "num_classes": 3}  # fmt: skip
        assert not model.training
        torch.testing.assert_close(model(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["densenet121", "vit_b_16"])
def test_num_classes_is_read_from_each_architectures_head(tmp_path, arch):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(arch, weights=None, num_classes=2)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded, info = load_model(str(tmp_path / "w.pth"), arch=arch)
    assert info["num_classes"] == 2
    for (name, expected), actual in zip(
        model.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


def test_torchvision_errors(tmp_path, resnet):
    path = tmp_path / "w.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match="pass --arch"):
        load_model(str(path))
    with pytest.raises(ModelError, match="Did you mean 'resnet18'"):
        load_model(str(path), arch="resnet181")
    with pytest.raises(ModelError, match=r"missing: layer1\.0\.conv3\.weight"):
        load_model(str(path), arch="resnet50")
    with pytest.raises(ModelError, match=r"wrong shape: fc\.weight: file \(3, 512\)"):
        load_model(str(path), arch="resnet18", num_classes=5)
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(ModelError, match="does not hold a state_dict"):
        load_model(str(tmp_path / "nothing.pt"), arch="resnet18")
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "absent.pt"), arch="resnet18")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="Cannot read weights"):
        load_model(str(tmp_path / "junk.pt"), arch="resnet18")


class Payload:
    """Unpickling this creates a file: proof that a loader ran code from the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_never_unpickled(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()  # the payload works when unpickled

    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "evil.pt")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f)
    for name in ("evil.pt", "evil.pth"):
        with pytest.raises(ModelError, match="Refused"):
            load_model(str(tmp_path / name), arch="resnet18")
        with pytest.raises(ModelError, match="pass --arch"):
            load_model(str(tmp_path / name))
    assert not marker.exists()


def test_onnx_path_is_passed_through(tmp_path):
    path = tmp_path / "Net.ONNX"
    path.write_bytes(b"not opened here: the core's ONNX adapter opens it")
    assert load_model(str(path)) == (str(path), {"kind": "onnx", "path": str(path)})
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "absent.onnx"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_script_and_trace(tmp_path):
    model = tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "traced.pth")
    torch.save(model.state_dict(), tmp_path / "code.pt")  # its entries are code/data.pkl...
    assert not is_torchscript(tmp_path / "code.pt")
    for name in ("scripted.pt", "traced.pth"):
        assert is_torchscript(tmp_path / name)
        loaded, info = load_model(str(tmp_path / name))
        assert info["kind"] == "torchscript" and not loaded.training
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.warns(UserWarning, match="--arch resnet18 is ignored"):
        load_model(str(tmp_path / "scripted.pt"), arch="resnet18")


def test_demo_models_missing_is_a_model_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xai_core.demo", None)  # as if it were not installed
    with pytest.raises(ModelError, match="no demo models"):
        load_model("demo:cnn")


def test_demo_model_hook():
    pytest.importorskip("xai_core.demo")
    model, info = load_model("demo:cnn")
    assert info["kind"] == "demo" and info["name"] == "cnn" and model is not None


# -- outputs ---------------------------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".xai-tmp"))


def test_atomic_writes(tmp_path):
    atomic_write_bytes(tmp_path / "deep" / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_save_npy(tmp_path / "m.npy", np.arange(6).reshape(2, 3))
    assert (tmp_path / "deep" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.arange(6).reshape(2, 3))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(tmp_path) == []


def test_interrupted_writes_leave_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "map.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"new but only half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []

    def half_save(f, array, **kwargs):
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_npy(tmp_path / "m.npy", np.zeros(3))
    assert not (tmp_path / "m.npy").exists() and leftovers(tmp_path) == []


def test_object_arrays_are_not_pickled(tmp_path):
    with pytest.raises(ValueError):
        atomic_save_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "o.npy").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_killed_writer_leaves_only_a_temp_file_that_the_ledger_removes(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from xai_core.io.outputs import atomic_open
        with atomic_open({str(tmp_path / "out.npy")!r}) as f:
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert not (tmp_path / "out.npy").exists() and len(leftovers(tmp_path)) == 1
    RunLedger(tmp_path)  # the writer's process is gone: its temporary file goes too
    assert leftovers(tmp_path) == []


def test_run_ledger_resume(tmp_path):
    ledger = RunLedger(tmp_path)
    assert not ledger.done("a.png") and ledger.record("a.png") is None
    atomic_write_bytes(tmp_path / "a.png.gradcam.png", b"png")
    with pytest.raises(OutputFileError, match=r"a\.png\.npy"):
        ledger.mark_done("a.png", outputs=["a.png.gradcam.png", "a.png.npy"])
    assert not ledger.done("a.png")  # no record until every output is there
    atomic_save_npy(tmp_path / "a.png.npy", np.zeros(2))
    record = ledger.mark_done(
        "a.png", {"score": np.float32(0.5)}, outputs=[tmp_path / "a.png.gradcam.png", "a.png.npy"]
    )
    assert set(record["outputs"]) == {"a.png.gradcam.png", "a.png.npy"}

    resumed = RunLedger(tmp_path)  # a new run over the same folder
    assert resumed.done("a.png") and resumed.record("a.png")["record"] == {"score": 0.5}
    assert resumed.pending(["a.png", "b.png"]) == ["b.png"]

    (tmp_path / "a.png.npy").write_bytes(b"changed")  # an output edited or truncated
    assert not resumed.done("a.png")
    (tmp_path / "a.png.npy").unlink()  # an output deleted
    assert not resumed.done("a.png")

    resumed.mark_failed("b.png", InputFileError("b.png", "truncated"))
    assert resumed.failures()["b.png"]["error"] == "InputFileError: Cannot read b.png: truncated"
    atomic_write_bytes(tmp_path / "b.out", b"x")
    resumed.mark_done("b.png", outputs=["b.out"])
    assert resumed.done("b.png") and resumed.failures() == {}
    resumed.forget("b.png")
    assert not resumed.done("b.png")

    (tmp_path / ".xai-run" / "c.png.done.json").write_text("{not json")
    assert not resumed.done("c.png")
    with pytest.raises(OptionError):
        resumed.done("../escape")


def test_ledger_keeps_live_temp_files_and_removes_stale_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".x.png.{dead.pid}-abc123.xai-tmp"
    live = tmp_path / "sub" / f".y.png.{os.getpid()}-def456.xai-tmp"
    old = tmp_path / f".z.png.{os.getpid()}-ghi789.xai-tmp"
    for path in (gone, live, old):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    os.utime(old, (0, 0))
    assert RunLedger(tmp_path).clean_temp() == 0  # the constructor already cleaned
    assert not gone.exists() and live.exists() and not old.exists()


def test_input_item_is_hashable_and_typed():
    item = InputItem("x.png", InputKind.IMAGE, (Path("x.png"),))
    assert {item: 1}[item] == 1 and item.kind == "image"


def test_mask_folder_matches_inputs_by_stem_and_resizes(tmp_path):
    from xai_core.core.errors import InputError
    from xai_core.io.inputs import MaskFolder, file_stem

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / f"{name}.png")
    lesion = np.zeros((4, 4), np.uint8)
    lesion[:2, :2] = 255  # the top-left quarter
    Image.fromarray(lesion).save(masks / "a.png")
    items = find_inputs([images])
    keys = [item.key for item in items]
    x = torch.zeros(2, 1, 8, 8)
    got = MaskFolder(masks, items).read(keys, x)  # "b" has no mask file: an empty mask
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[[file_stem(i.source) for i in items].index("a"), :4, :4] = True
    assert torch.equal(got, expected)
    with pytest.raises(InputError, match=r"No mask for input .*b"):
        MaskFolder(masks, items).read(keys, x, required=True)
    with pytest.raises(InputFileError, match="folder of mask files"):
        MaskFolder(masks / "a.png", items)
    assert file_stem(Path("scan.nii.gz")) == "scan" and file_stem(Path("x.DCM")) == "x"
