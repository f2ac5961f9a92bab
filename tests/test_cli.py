"""The `xai` command line end to end on real files: PNG, DICOM series, NIfTI; torch and ONNX."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from xai_core.cli.app import build_app
from xai_core.core.errors import CapabilityError
from xai_core.testing import tiny_cnn

from .files import tiny_3d_cnn, write_dicom_series, write_nifti, write_png

XAI = str(Path(sys.executable).with_name("xai"))
runner = CliRunner()


def xai(*args: str):
    return runner.invoke(build_app(), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(3):
        write_png(folder / f"cxr_{i}.png", seed=i)
    return folder


@pytest.fixture(scope="module")
def resnet_state(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(
        tiny_cnn().eval(),
        (torch.randn(1, 3, 16, 16),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    (path.parent / "tiny.onnx.json").write_text(
        json.dumps(
            {
                "size": [16, 16],
                "channels": 3,
                "class_names": ["normal", "nodule", "opacity", "other"],
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def script_3d(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "cnn3d.pt"
    torch.jit.trace(tiny_3d_cnn().eval(), torch.randn(1, 1, 6, 32, 32)).save(str(path))
    return path


def outputs_of(out: Path, key: str, method: str) -> dict:
    folder = out / key
    maps = np.load(folder / f"maps_{method}.npy")
    Image.open(folder / f"overlay_{method}.png").verify()
    return {"maps": maps, "result": json.loads((folder / f"result_{method}.json").read_text())}


def test_torchvision_state_dict_on_pngs(pngs, resnet_state, tmp_path):
    out = tmp_path / "out"
    result = xai(
        "explain",
        resnet_state,
        pngs,
        "--arch",
        "resnet18",
        "--size",
        "64,64",
        "--channels",
        "3",
        "--method",
        "gradcam",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (
        sorted(summary["done"]) == ["cxr_0.png", "cxr_1.png", "cxr_2.png"]
        and summary["failed"] == {}
    )
    got = outputs_of(out, "cxr_0.png", "gradcam")
    assert got["maps"].shape == (1, 64, 64)
    assert got["result"]["layers"] == ["layer4"] and len(got["result"]["scores"][0]) == 3
    assert "cxr_2.png" in (out / "report.html").read_text()


def test_onnx_model_with_sidecar_and_options(pngs, onnx_model, tmp_path):
    out = tmp_path / "out"
    result = xai(
        "explain",
        onnx_model,
        pngs / "cxr_1.png",
        "-m",
        "occlusion",
        "-O",
        "window=4",
        "-O",
        "stride=4",
        "-t",
        "1",
        "-t",
        "2",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    got = outputs_of(out, "cxr_1.png", "occlusion")
    assert got["maps"].shape == (1, 2, 16, 16)  # two targets kept apart, on the sidecar's grid
    assert got["result"]["target_names"] == [["nodule", "opacity"]]


def test_dicom_series_and_nifti_volumes_with_torchscript(tmp_path, script_3d):
    inputs = tmp_path / "in"
    write_dicom_series(inputs / "series")
    write_nifti(inputs / "knee.nii.gz", shape=(32, 32, 6))  # (x, y, z) -> (D=6, H, W)
    out = tmp_path / "out"
    result = xai(
        "explain",
        script_3d,
        inputs,
        "-m",
        "occlusion",
        "-O",
        "window=[2,8,8]",
        "-O",
        "stride=[2,8,8]",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    keys = json.loads((out / "summary.json").read_text())["done"]
    assert len(keys) == 2  # the series folder is one volume
    for key in keys:
        assert outputs_of(out, key, "occlusion")["maps"].shape[1:] == (6, 32, 32)
    html = (out / "report.html").read_text()
    assert html.count('class="slider"') == 2


def test_nifti_slice_by_slice_with_a_2d_model(tmp_path, onnx_model):
    volume = write_nifti(tmp_path / "mri.nii.gz", shape=(20, 20, 5))
    out = tmp_path / "out"
    result = xai(
        "explain",
        onnx_model,
        volume,
        "-m",
        "occlusion",
        "--slice-axis",
        "0",
        "-O",
        "window=8",
        "-O",
        "stride=8",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert outputs_of(out, "mri.nii.gz", "occlusion")["maps"].shape == (5, 16, 16)


def test_corrupt_file_is_reported_and_the_rest_completes(pngs, onnx_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("cxr_0.png", "cxr_1.png"):
        (inputs / name).write_bytes((pngs / name).read_bytes())
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    with pytest.raises(CapabilityError):  # a CNN has no attention: refused once, up front
        xai("explain", onnx_model, inputs, "-m", "rollout", "--out", out)
    assert not out.exists()
    result = xai("explain", onnx_model, inputs, "-m", "occlusion", "--out", out)
    assert result.exit_code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["done"]) == ["cxr_0.png", "cxr_1.png"]
    assert "InputFileError" in summary["failed"]["broken.png"]
    assert "failed" in result.output
    assert not (out / "broken.png").exists()  # nothing half-written for the failed input
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_killed_run_resumes_without_redoing_finished_inputs(tmp_path, resnet_state):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        write_png(inputs / f"img_{i}.png", seed=i, size=64)
    out = tmp_path / "out"
    # About a second per input (225 ResNet-18 forwards), so the kill lands mid-run.
    args = [
        XAI,
        "explain",
        str(resnet_state),
        str(inputs),
        "--arch",
        "resnet18",
        "--channels",
        "3",
        "-m",
        "occlusion",
        "-O",
        "window=8",
        "-O",
        "stride=4",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ledger = out / ".xai-run"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ledger.glob("*.done.json"))) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name.split("--")[0] for p in ledger.glob("*.done.json"))
    assert 2 <= len(finished) < 6, "the run must be killed mid-way for this test to mean anything"

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["skipped"]) == finished
    assert sorted(summary["done"] + summary["skipped"]) == [f"img_{i}.png" for i in range(6)]
    for i in range(6):
        assert outputs_of(out, f"img_{i}.png", "occlusion")["maps"].shape == (1, 64, 64)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_plugins_command_and_help():
    result = xai("plugins")
    assert result.exit_code == 0 and "gradcam" in result.output
    help_text = xai("--help").output
    for command in ("explain", "compare", "plugins", "demo"):
        assert command in help_text
    assert "--method" in xai("explain", "--help").output


def test_dicom_series_slice_by_slice_with_a_torchvision_model(tmp_path, resnet_state):
    series = write_dicom_series(tmp_path / "ct" / "series", slices=3, size=32)
    out = tmp_path / "out"
    result = xai(
        "explain",
        resnet_state,
        series,
        "--arch",
        "resnet18",
        "--channels",
        "3",
        "--slice-axis",
        "0",
        "--size",
        "64,64",
        "-m",
        "gradcam",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    (key,) = json.loads((out / "summary.json").read_text())["done"]
    assert outputs_of(out, key, "gradcam")["maps"].shape == (3, 64, 64)  # one map per slice
