"""The ONNX adapter: same scores as torch, fixed-batch chunking, providers, bad files."""

from __future__ import annotations

import io

import onnxruntime as ort
import pytest
import torch

import xai_core
from xai_core.core.api import validate_inputs
from xai_core.core.errors import CapabilityError, InputError, ModelError
from xai_core.onnx.adapter import OnnxAdapter
from xai_core.testing import tiny_cnn

# The TorchScript exporter is deprecated but exports these tiny models in milliseconds.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def export(model, path, batch: int | None):
    x = torch.randn(batch or 2, 3, 16, 16)
    dynamic = None if batch else {"x": {0: "batch"}, "scores": {0: "batch"}}
    torch.onnx.export(
        model.eval(),
        (x,),
        str(path),
        input_names=["x"],
        output_names=["scores"],
        dynamic_axes=dynamic,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_cnn().eval()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    return {
        "dynamic": export(model, tmp / "dynamic.onnx", None),
        "fixed": export(model, tmp / "fixed.onnx", 2),
    }


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_same_scores_as_torch(model, files, kind, n):
    x = torch.randn(n, 3, 16, 16)
    adapter = xai_core.adapt(files[kind])
    assert isinstance(adapter, OnnxAdapter)
    with torch.no_grad():
        expected = model(x)
    got = adapter.forward(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_fixed_batch_is_detected_and_reported(files):
    adapter = xai_core.adapt(files["fixed"])
    assert adapter.fixed_batch == 2
    assert adapter.describe()["provider"] == "CPUExecutionProvider"
    assert adapter.device == torch.device("cpu")
    assert xai_core.adapt(files["dynamic"]).fixed_batch is None


def test_bytes_and_sessions_are_accepted(model, files):
    x = torch.randn(2, 3, 16, 16)
    blob = files["dynamic"].read_bytes()
    session = ort.InferenceSession(str(files["dynamic"]), providers=["CPUExecutionProvider"])
    for source in (blob, session, str(files["dynamic"])):
        torch.testing.assert_close(
            xai_core.adapt(source).forward(x), model(x).detach(), atol=1e-5, rtol=1e-4
        )


def test_onnx_refuses_what_its_graph_lacks(files, images):
    # Grad-CAM and CAM work on ONNX graphs (tests/test_onnx_whitebox.py); attention needs one.
    with pytest.raises(CapabilityError, match="attention"):
        xai_core.explain(files["dynamic"], images, method="rollout")


def test_fixed_spatial_size_is_checked(files):
    with pytest.raises(InputError, match="spatial size"):
        validate_inputs(torch.randn(1, 3, 8, 8), xai_core.adapt(files["fixed"]))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        xai_core.adapt(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="could not load"):
        xai_core.adapt(corrupt)
    with pytest.raises(ModelError):
        xai_core.adapt(io.BytesIO(b"x").getvalue())


def test_unavailable_provider_is_a_clear_error(files):
    with pytest.raises(ModelError, match="available"):
        OnnxAdapter(files["dynamic"], providers=["NoSuchExecutionProvider"])
