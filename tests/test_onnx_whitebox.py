"""White-box explanations of ONNX files: layers, CAM and Grad-CAM on the exported graph equal
the same methods on the PyTorch model (ResNet-18, DenseNet-121, EfficientNet-B0, a 3D CNN)."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import xai_core
from xai_core.cli.app import build_app
from xai_core.core.adapters import check_protocols
from xai_core.core.errors import CapabilityError, UnknownLayerError, UnsupportedOperatorError
from xai_core.core.targets import Targets
from xai_core.onnx import interpreter
from xai_core.onnx.adapter import OnnxAdapter
from xai_core.testing import tiny_cnn

from .files import write_png

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

OPSET = 17
TARGETS = [[1, 7], [3, 3]]


def export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        model.eval(),
        (x,),
        str(path),
        input_names=["x"],
        output_names=["scores"],
        dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}},
        opset_version=OPSET,
        dynamo=False,
    )
    return path


def zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    volume = torch.randn(2, 1, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    return {
        "resnet18": (torchvision.models.resnet18(weights=None), image),
        "densenet121": (torchvision.models.densenet121(weights=None), image),
        "efficientnet_b0": (torchvision.models.efficientnet_b0(weights=None), image),
        "cnn3d": (tiny_cnn(dims=3, channels=1, classes=8), volume),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[nn.Module, torch.Tensor, Path]]:
    folder = tmp_path_factory.mktemp("whitebox")
    return {
        name: (model.eval(), x, export(model, x, folder / f"{name}.onnx"))
        for name, (model, x) in zoo().items()
    }


def onnx_name(adapter: OnnxAdapter, model: nn.Module, layer: str, x: torch.Tensor) -> str:
    """The ONNX tensor holding the output of the torch module ``layer``: found by value."""
    module = dict(model.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    record = adapter.record_layers(x, adapter.layer_names())
    matches = [
        name
        for name, value in record.order
        if value.shape == seen[-1].shape and torch.allclose(value, seen[-1], atol=1e-4)
    ]
    assert matches, f"no ONNX tensor equals the output of {layer!r}"
    return matches[-1]


def assert_same_maps(onnx: torch.Tensor, torch_: torch.Tensor) -> None:
    assert onnx.shape == torch_.shape
    a, b = onnx.flatten().double(), torch_.flatten().double()
    spread = float(b.max() - b.min())
    assert spread > 0
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) >= 0.999
    assert float((a - b).abs().max()) <= 1e-4 * spread


# -- layers ---------------------------------------------------------------------------------------


def test_layers_shapes_and_default_layer(models):
    _, x, path = models["resnet18"]
    adapter = xai_core.adapt(str(path))
    names = adapter.layer_names()
    default = adapter.default_layer(x)
    assert default == "/layer4/layer4.1/relu_1/Relu_output_0"  # the input of GlobalAveragePool
    assert default in names and names[-1] == "scores"
    table = {name: (op, shape) for name, op, shape in adapter.layer_table()}
    assert table[default] == ("Relu", (None, 512, 3, 3))  # shape inference; batch is dynamic
    assert adapter.layer_names_of([default, "scores"]) == [default, "scores"]
    with pytest.raises(UnknownLayerError, match="Did you mean"):
        adapter.layer_names_of(default[:-1])
    check_protocols(adapter)  # every declared capability is backed by its protocol


def test_capture_uses_a_copy_and_caches_sessions(models):
    model, x, path = models["resnet18"]
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    adapter = OnnxAdapter(str(path), providers=["CPUExecutionProvider"])
    layers = ["/layer3/layer3.1/relu_1/Relu_output_0", adapter.default_layer(x)]
    record = adapter.record_layers(x, layers[::-1])
    assert [name for name, _ in record.order] == layers  # graph order
    assert record.last(layers[1]).shape == (2, 512, 3, 3)
    session = adapter._sessions[frozenset(layers)]
    adapter.record_layers(x, layers)
    assert adapter._sessions[frozenset(layers)] is session  # cached per set of layers
    assert [o.name for o in adapter.session_.get_outputs()] == ["scores"]
    for name in adapter.layer_names()[:5]:  # five more sets: the least recently used goes
        adapter.record_layers(x[:1], [name])
    assert len(adapter._sessions) == 4 and frozenset(layers) not in adapter._sessions
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with torch.no_grad():
        torch.testing.assert_close(record.scores, model(x), atol=1e-4, rtol=1e-4)


def test_list_explainers_and_pickling(models):
    _, x, path = models["resnet18"]
    listed = {info.name for info in xai_core.list_explainers(model=str(path))}
    assert {"cam", "gradcam", "occlusion"} <= listed
    adapter = pickle.loads(pickle.dumps(xai_core.adapt(str(path))))
    assert adapter.default_layer(x) == "/layer4/layer4.1/relu_1/Relu_output_0"


# -- equivalence with PyTorch ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "cnn3d"])
def test_cam_equals_torch(models, name):
    model, x, path = models[name]
    on_onnx = xai_core.explain(str(path), x, method="cam", targets=TARGETS)
    on_torch = xai_core.explain(model, x, method="cam", targets=TARGETS)
    assert on_onnx.details["head"] == "scores"
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])
    torch.testing.assert_close(on_onnx.scores, on_torch.scores, atol=1e-4, rtol=1e-4)


# Torch's default Grad-CAM layer; on ONNX the same tensor is found by value. DenseNet's is the
# last BatchNormalization's output (the ONNX default, the ReLU after it, differs from it).
TORCH_DEFAULT = {
    "resnet18": "layer4",
    "densenet121": "features",
    "efficientnet_b0": "features",
    "cnn3d": "4",
}


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "cnn3d"])
def test_gradcam_equals_torch(models, name):
    model, x, path = models[name]
    adapter = xai_core.adapt(str(path))
    layer = onnx_name(adapter, model, TORCH_DEFAULT[name], x)
    on_torch = xai_core.explain(model, x, method="gradcam", targets=TARGETS, relu=False)
    assert on_torch.layers == [TORCH_DEFAULT[name]]
    on_onnx = xai_core.explain(
        adapter, x, method="gradcam", targets=TARGETS, layer=layer, relu=False
    )
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])
    if name != "densenet121":  # elsewhere the two defaults are the same tensor
        assert adapter.default_layer(x) == layer


def test_gradcam_several_layers_and_targets(models):
    """layer3 and layer4: the gradient at layer3 flows through layer4 in the re-run tail."""
    model, x, path = models["resnet18"]
    adapter = xai_core.adapt(str(path))
    layers = [onnx_name(adapter, model, n, x) for n in ("layer2", "layer3", "layer4")]
    options = {"targets": TARGETS, "variant": "gradcam++"}
    on_torch = xai_core.explain(
        model, x, method="gradcam", layers=["layer2", "layer3", "layer4"], **options
    )
    on_onnx = xai_core.explain(adapter, x, method="gradcam", layers=layers, **options)
    assert on_onnx.raw[0].shape == (2, 2, 12, 12)
    for got, expected in zip(on_onnx.raw, on_torch.raw, strict=True):
        assert_same_maps(got, expected)


# -- what the gradient pass refuses ---------------------------------------------------------------


class CumulativeNet(nn.Module):
    """conv -> cumsum (ONNX CumSum, which the interpreter does not implement) -> conv -> GAP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv2(self.conv(x).cumsum(2))).mean((2, 3)))


def test_unsupported_operator_is_named(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = CumulativeNet().eval()
    path = export(model, x, tmp_path / "cumsum.onnx")
    adapter = xai_core.adapt(str(path))
    first = onnx_name(adapter, model, "conv", x)
    with pytest.raises(UnsupportedOperatorError, match="'CumSum'") as error:
        xai_core.explain(adapter, x, method="gradcam", layer=first)
    assert error.value.operator == "CumSum" and isinstance(error.value, CapabilityError)
    # After the CumSum every operator is known: the default layer (the input of ReduceMean).
    on_onnx = xai_core.explain(adapter, x, method="gradcam", targets=[0, 1])
    on_torch = xai_core.explain(model, x, method="gradcam", targets=[0, 1], layer="relu")
    assert on_onnx.layers == [adapter.default_layer(x)]
    torch.testing.assert_close(on_onnx.raw[0], on_torch.raw[0], atol=1e-5, rtol=1e-4)


def test_an_interpreter_that_disagrees_with_onnxruntime_is_refused(models, monkeypatch):
    _, x, path = models["cnn3d"]
    monkeypatch.setitem(interpreter.OPS, "Relu", lambda node, a: a[0].abs())
    with pytest.raises(CapabilityError, match="away from onnxruntime"):
        xai_core.explain(str(path), x, method="gradcam", layer="/0/Conv_output_0")


# -- the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    export(tiny_cnn().eval(), torch.randn(1, 3, 16, 16), folder / "tiny.onnx")
    (folder / "tiny.onnx.json").write_text(json.dumps({"size": [16, 16], "channels": 3}))
    write_png(folder / "scan.png", seed=0)
    return folder


def test_cli_lists_onnx_layers(cli_model):
    result = CliRunner().invoke(build_app(), ["layers", str(cli_model / "tiny.onnx")])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.strip().splitlines()]
    assert ["/4/Relu_output_0", "Relu", "(None, 8, 16, 16)"] in rows


def test_cli_explains_an_onnx_file_with_gradcam(cli_model, tmp_path):
    xai = Path(sys.executable).with_name("xai")
    done = subprocess.run(
        [str(xai), "explain", "tiny.onnx", "scan.png", "-m", "gradcam", "--out", "out"],
        cwd=cli_model,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((cli_model / "out" / "scan.png" / "result_gradcam.json").read_text())
    assert result["layers"] == ["/4/Relu_output_0"]


def test_input_gradients_equal_torch(models):
    """``Capability.GRADIENTS``: with an input that requires grad, the forward is the graph
    re-run in torch, so autograd reaches the input as on the PyTorch model."""
    model, x, path = models["efficientnet_b0"]
    adapter = xai_core.adapt(str(path))
    grads = []
    for net in (adapter, model):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(leaf)[:, 3].sum(), leaf)
        grads.append(grad)
    assert_same_maps(grads[0], grads[1])
    with torch.no_grad():  # no autograd wanted: onnxruntime alone
        assert not adapter(x.clone().requires_grad_(True)).requires_grad


def test_fixed_batch_exports_run_chunk_by_chunk(tmp_path):
    """Exported with batch 2, explained with 3 samples: the forward and the tail are padded."""
    model = tiny_cnn().eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    on_onnx = xai_core.explain(str(path), x, method="gradcam", targets=[[0, 2]] * 3)
    on_torch = xai_core.explain(model, x, method="gradcam", targets=[[0, 2]] * 3, layer="4")
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_cam_through_a_layer_norm_head(tmp_path):
    """ConvNeXt (timm): pooling, a LayerNormalization whose weight the exporter shares through
    an Identity node, then Gemm. CAM reads the norm's constants as on PyTorch."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    path = export(model, x, tmp_path / "convnext.onnx")
    for method in ("cam", "gradcam"):
        on_onnx = xai_core.explain(str(path), x, method=method, targets=TARGETS)
        on_torch = xai_core.explain(model, x, method=method, targets=TARGETS)
        assert_same_maps(on_onnx.raw[0], on_torch.raw[0])
    assert on_onnx.layers == ["/stages/stages.3/blocks/blocks.1/Add_output_0"]


def test_dynamo_exports(tmp_path):
    """The dynamo exporter (torch.export, opset 18: ReduceMean takes its axes as an input,
    values are named relu_1, ...) gives the same maps."""
    pytest.importorskip("onnxscript")
    model = tiny_cnn(classes=8).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "resnet18_dynamo.onnx"
    dynamic = ({0: torch.export.Dim("n")},)  # by position: Sequential names its input "input"
    torch.onnx.export(model, (x,), str(path), dynamic_shapes=dynamic, dynamo=True, verbose=False)
    adapter = xai_core.adapt(str(path))
    graph = adapter.graph()
    assert graph.producer[adapter.default_layer(x)].op == "Relu"
    assert "ReduceMean" in {node.op for node in graph.nodes} and graph.opset >= 18
    for method in ("cam", "gradcam"):
        on_onnx = xai_core.explain(adapter, x, method=method, targets=TARGETS)
        on_torch = xai_core.explain(model, x, method=method, targets=TARGETS)
        assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_dynamic_height_and_width(tmp_path):
    """An export whose spatial size is dynamic: shapes are unknown until run time, the default
    layer is still the input of the pooling, and any size is explained."""
    model = tiny_cnn().eval()
    path = tmp_path / "dynamic_hw.onnx"
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "scores": {0: "n"}}
    torch.onnx.export(
        model, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
        output_names=["scores"], dynamic_axes=axes, dynamo=False,
    )  # fmt: skip
    for size in ((12, 20), (24, 16)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
        on_onnx = xai_core.explain(str(path), x, method="gradcam", targets=[[1, 2]] * 2)
        on_torch = xai_core.explain(model, x, method="gradcam", targets=[[1, 2]] * 2)
        assert on_onnx.layers == ["/4/Relu_output_0"]
        assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_gradient_with_respect_to_the_scores_themselves(models):
    """The output tensor as a layer: its gradient is the one-hot of each target."""
    _, x, path = models["cnn3d"]
    adapter = xai_core.adapt(str(path))
    targets = Targets([[1, 4], [0, 0]], 2, adapter.device)
    run = adapter.layer_gradients(x, ["scores"], targets)
    for k, grads in enumerate(run.gradients):
        expected = torch.zeros(2, 8)
        expected[0, [1, 4][k]], expected[1, 0] = 1.0, 1.0
        torch.testing.assert_close(grads["scores"], expected)


def test_a_graph_that_cannot_be_read_leaves_the_forward(models, monkeypatch, caplog):
    _, x, path = models["cnn3d"]

    def broken(source):
        raise ValueError("an attribute onnx cannot decode")

    monkeypatch.setattr("xai_core.onnx.adapter.load_proto", broken)
    adapter = xai_core.adapt(str(path))
    assert adapter.capabilities == {xai_core.Capability.FORWARD}
    assert "forward only" in caplog.text
    with pytest.raises(CapabilityError, match="layers"):
        xai_core.explain(adapter, x, method="gradcam")
    assert xai_core.explain(adapter, x, method="occlusion", window=4, stride=4).maps.shape[0] == 2
