"""Small medical files made on the fly: PNG, a DICOM series, a NIfTI volume, and models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_png(path: Path, seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(
        -((yy - rng.integers(8, size - 8)) ** 2 + (xx - rng.integers(8, size - 8)) ** 2) / 40
    )
    image = (60 + 150 * blob + rng.normal(0, 5, (size, size))).clip(0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)
    return path


def write_dicom_series(folder: Path, slices: int = 6, size: int = 32, seed: int = 0) -> Path:
    """A CT-like series with rescale slope/intercept and a lung window, files named out of order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series, study = generate_uid(), generate_uid()
    for z in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.Modality, ds.PatientID = "CT", "anon"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.ImagePositionPatient = [0, 0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = z + 1
        ds.PixelSpacing = [1, 1]
        pixels = rng.integers(0, 1400, (size, size)).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"slice_{(z * 7) % slices:03d}.dcm", enforce_file_format=True)
    return folder


def write_nifti(path: Path, shape=(8, 32, 32), seed: int = 0) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), str(path))
    return path


def tiny_3d_cnn(classes: int = 2) -> torch.nn.Module:
    from xai_core.testing import tiny_cnn

    return tiny_cnn(dims=3, channels=1, classes=classes)
