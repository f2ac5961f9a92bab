"""ONNX white-box on what exporters really produce for transformers: ViT-B/16 itself, fused
attention (scaled_dot_product_attention through the legacy exporter, the dynamo exporter and
opset 23's ``Attention`` operator; timm's fused_attn path), Swin's windowed attention, and
``If`` nodes (folded when their condition is constant, refused by name otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import xai_core
from xai_core.core.errors import CapabilityError, UnsupportedOperatorError

from .test_onnx_whitebox import assert_same_maps, export
from .test_onnx_whitebox_attention import tiny_vit

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TARGETS = [[1, 3], [2, 2]]
METHODS = [
    ("attention", {}),
    ("rollout", {}),
    ("grad_rollout", {"targets": TARGETS}),
    ("gradcam", {"targets": TARGETS}),
]


# -- ViT-B/16 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """torchvision's ViT-B/16 architecture (12 layers, 12 heads, width 768, MLP 3072, patch 16)
    with random weights, at 64 px (4 x 4 patches: a small input, the same network)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=64, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = export(model, x, tmp_path_factory.mktemp("vit_b16") / "vit_b16.onnx")
    return model, x, xai_core.adapt(str(path))  # one adapter: its sessions are reused


@pytest.mark.parametrize(("method", "options"), METHODS, ids=[m for m, _ in METHODS])
def test_vit_b16_equals_torch(vit_b16, method, options):
    model, x, adapter = vit_b16
    if method == "attention":
        assert len(adapter.attention_layers()) == 12
        tokens = "/encoder/layers/encoder_layer_11/ln_1/LayerNormalization_output_0"
        assert adapter.default_layer(x) == tokens
    on_onnx = xai_core.explain(adapter, x, method=method, **options)
    on_torch = xai_core.explain(model, x, method=method, **options)
    assert on_onnx.raw[0].shape[-2:] == (4, 4)
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


# -- fused attention ----------------------------------------------------------------------------


def export_vit(model: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> Path:
    if exporter == "legacy":
        return export(model, x, path)
    pytest.importorskip("onnxscript")
    opset = {"opset_version": 23} if exporter == "dynamo-opset23" else {}
    dynamic = ({0: torch.export.Dim("n")},)
    torch.onnx.export(model, (x,), str(path), dynamic_shapes=dynamic, dynamo=True, **opset)
    return path


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """A tiny timm ViT (timm's default ``fused_attn``: F.scaled_dot_product_attention) and its
    exports, made once per module when first asked for."""
    model = tiny_vit("timm").eval()
    assert model.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folder, paths = tmp_path_factory.mktemp("fused"), {}

    def exported(exporter: str) -> Path:
        if exporter not in paths:
            paths[exporter] = export_vit(model, x, folder / f"{exporter}.onnx", exporter)
        return paths[exporter]

    return model, x, exported


@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo-opset23"])
def test_fused_attention_exports_equal_torch(timm_vit, exporter):
    """scaled_dot_product_attention: the legacy and dynamo exporters write it out (MatMul,
    Softmax); opset 23 makes it one ``Attention`` node, which the adapter writes out in its
    copy of the graph so that the probabilities can be captured and differentiated."""
    model, x, exported = timm_vit
    path = exported(exporter)
    fused = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert len(fused) == (2 if exporter == "dynamo-opset23" else 0)
    adapter = xai_core.adapt(str(path))
    assert len(adapter.attention_layers()) == 2
    for method, options in METHODS[1:]:
        on_onnx = xai_core.explain(adapter, x, method=method, **options)
        on_torch = xai_core.explain(model, x, method=method, **options)
        assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


def test_fused_attention_that_cannot_be_written_out_is_refused_by_name(timm_vit, tmp_path):
    """A causal opset-23 ``Attention`` (no written-out form here): onnxruntime still runs the
    model; attention maps and gradients through it name the operator and say how to export."""
    _, x, exported = timm_vit
    proto = onnx.load(str(exported("dynamo-opset23")))
    for node in proto.graph.node:
        if node.op_type == "Attention":
            for a in node.attribute:
                if a.name == "is_causal":
                    a.i = 1
    causal = tmp_path / "causal.onnx"
    onnx.save(proto, str(causal))
    adapter = xai_core.adapt(str(causal))
    assert xai_core.Capability.ATTENTION in adapter.capabilities
    with pytest.raises(UnsupportedOperatorError, match="TIMM_FUSED_ATTN=0") as error:
        xai_core.explain(adapter, x, method="rollout")
    assert error.value.operator == "Attention" and "causal" in str(error.value)
    patches = next(n for n in adapter.layer_names() if adapter.graph().producer[n].op == "Conv")
    with pytest.raises(UnsupportedOperatorError, match="fused operator 'Attention'"):
        xai_core.explain(adapter, x, method="gradcam", layer=patches)
    assert xai_core.explain(adapter, x, method="occlusion", window=8, stride=8).maps.shape[0] == 2


# -- windowed attention --------------------------------------------------------------------------


def test_swin_windowed_attention_is_refused_and_gradcam_equals_torch(tmp_path):
    """Swin attends within windows: no attention map over the image. The window partition (a
    6D Transpose before the query projection) is found in the graph, so attention methods are
    not offered and are refused before running; Grad-CAM works as on PyTorch."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
        embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    path = export(model, x, tmp_path / "swin.onnx")
    adapter = xai_core.adapt(str(path))
    assert adapter.windowed_attention() == adapter.attention_layers()[0]
    listed = {info.name for info in xai_core.list_explainers(model=str(path))}
    assert "gradcam" in listed and not listed & {"attention", "rollout", "grad_rollout"}
    with pytest.raises(CapabilityError, match="attends within windows"):
        xai_core.explain(adapter, x, method="rollout")
    on_onnx = xai_core.explain(adapter, x, method="gradcam", targets=[1, 4])
    on_torch = xai_core.explain(model, x, method="gradcam", targets=[1, 4])
    assert on_onnx.layers == ["/norm/LayerNormalization_output_0"] and on_torch.layers == ["norm"]
    assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


# -- If -----------------------------------------------------------------------------------------


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def if_model(condition: str) -> bytes:
    """conv -> If(then: Relu, else: Sigmoid) -> GlobalAveragePool -> Flatten -> Gemm, with a
    constant condition (``"constant"``) or one computed from the input (``"data"``); or
    (``"loop"``) a ``Loop`` of one iteration computing the Relu in place of the ``If``."""
    rng = np.random.default_rng(0)
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["conv"], ["relu"], name="then_relu")],
        "then", [], [helper.make_tensor_value_info("relu", TensorProto.FLOAT, None)],
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["conv"], ["sigmoid"], name="else_sigmoid")],
        "else", [], [helper.make_tensor_value_info("sigmoid", TensorProto.FLOAT, None)],
    )  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv")]
    initializers = [
        _tensor("w", rng.normal(size=(4, 3, 3, 3))),
        _tensor("b", rng.normal(size=4)),
        _tensor("fc_w", rng.normal(size=(5, 4))),
        _tensor("fc_b", rng.normal(size=5)),
    ]
    if condition == "loop":  # one iteration whose scan output is relu(conv): then squeezed
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Relu", ["conv"], ["scan"], name="body_relu"),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("scan", TensorProto.FLOAT, None),
            ],
        )
        initializers += [
            numpy_helper.from_array(np.array(1, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "first"),
        ]
        nodes += [
            helper.make_node("Loop", ["trips", "cond"], ["scanned"], body=body, name="loop"),
            helper.make_node("Squeeze", ["scanned", "first"], ["features"]),
        ]
    elif condition == "constant":
        initializers.append(numpy_helper.from_array(np.array(True), "cond"))
    else:  # the sign of the input's sum: decided at run time
        initializers.append(_tensor("zero", np.zeros(())))
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["cond"]),
        ]
    if condition != "loop":
        nodes.append(
            helper.make_node(
                "If", ["cond"], ["features"], then_branch=then_graph, else_branch=else_graph,
                name="if",
            )
        )
    nodes += [
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 5])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class IfTwin(nn.Module):
    """The torch twin of ``if_model("constant")``: conv -> relu -> mean -> linear."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__()
        weights = {
            t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in proto.graph.initializer
        }
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            self.conv.weight.copy_(weights["w"])
            self.conv.bias.copy_(weights["b"])
            self.fc.weight.copy_(weights["fc_w"])
            self.fc.bias.copy_(weights["fc_b"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_if_with_a_constant_condition_is_folded():
    """The branch always taken replaces the ``If``: its values are layers (the Relu inside it),
    the default layer is found through it, and Grad-CAM's tail runs through it, equal to the
    torch twin."""
    data = if_model("constant")
    adapter = xai_core.adapt(data)
    assert "If" not in {n.op for n in adapter.graph().nodes}
    assert "relu" in adapter.layer_names()
    assert adapter.default_layer(torch.zeros(1, 3, 8, 8)) == "features"  # the If's output
    twin = IfTwin(onnx.load_model_from_string(data)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs = [("gradcam", "conv", "conv"), ("gradcam", "relu", "relu"), ("cam", None, None)]
    for method, layer, twin_layer in pairs:
        options = {"targets": [[0, 3]] * 2} | ({"layer": layer} if layer else {})
        on_onnx = xai_core.explain(adapter, x, method=method, **options)
        options = options | ({"layer": twin_layer} if layer else {})
        on_torch = xai_core.explain(twin, x, method=method, **options)
        assert_same_maps(on_onnx.raw[0], on_torch.raw[0])


@pytest.mark.parametrize(("kind", "op"), [("data", "If"), ("loop", "Loop")])
def test_if_decided_at_run_time_and_loop_are_refused_by_name(kind, op):
    """The branches read ``conv`` from the outer graph: the tail from ``conv`` crosses the node."""
    adapter = xai_core.adapt(if_model(kind))
    assert op in {n.op for n in adapter.graph().nodes}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedOperatorError, match=f"'{op}'") as error:
        xai_core.explain(adapter, x, method="gradcam", layer="conv")
    assert error.value.operator == op and error.value.node == op.lower()
    # After the If every operator is known: a layer there still works.
    assert xai_core.explain(adapter, x, method="gradcam", layer="features").maps.shape[0] == 2


def contrib_attention_model() -> bytes:
    """patches -> q, k, v projections -> onnxruntime's fused ``com.microsoft.MultiHeadAttention``
    (what its transformer optimiser leaves) -> mean over tokens -> Gemm."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "patch_w"], ["patches"], strides=[4, 4], name="embed"),
        helper.make_node("Reshape", ["patches", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
        *[helper.make_node("MatMul", ["tokens", f"w{p}"], [p]) for p in "qkv"],
        helper.make_node(
            "MultiHeadAttention", ["q", "k", "v"], ["attended"], num_heads=2,
            domain="com.microsoft", name="mha",
        ),
        helper.make_node("ReduceMean", ["attended"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc_w"], ["scores"], transB=1),
    ]  # fmt: skip
    initializers = [
        _tensor("patch_w", rng.normal(size=(8, 3, 4, 4))),
        numpy_helper.from_array(np.array([0, 8, 4], dtype=np.int64), "shape"),
        *[_tensor(f"w{p}", rng.normal(size=(8, 8))) for p in "qkv"],
        _tensor("fc_w", rng.normal(size=(5, 8))),
    ]
    graph = helper.make_graph(
        nodes, "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 5])],
        initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def test_onnxruntime_fused_attention_is_refused_by_name():
    adapter = xai_core.adapt(contrib_attention_model())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert adapter(x).shape == (2, 5)  # onnxruntime runs it
    with pytest.raises(UnsupportedOperatorError, match="transformer optimiser") as error:
        xai_core.explain(adapter, x, method="rollout")
    assert error.value.operator == "com.microsoft.MultiHeadAttention"
    with pytest.raises(UnsupportedOperatorError, match=r"com\.microsoft\.MultiHeadAttention"):
        xai_core.explain(adapter, x, method="gradcam", layer="tokens")


@pytest.mark.parametrize(
    ("mask", "scale"), [(None, None), (TensorProto.BOOL, None), (TensorProto.FLOAT, 0.3)]
)
def test_opset23_attention_written_out_equals_onnxruntimes(mask, scale):
    """The written-out form (scale, boolean or additive mask, softmax) computes what
    onnxruntime's fused ``Attention`` computes."""
    import onnxruntime as ort

    from xai_core.onnx.graph import load_proto

    shape = [2, 3, 5, 8]  # (N, heads, T, head size)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask, [2, 3, 5, 5]))
        names.append("mask")
    attrs = {} if scale is None else {"scale": scale}
    node = helper.make_node("Attention", names, ["y"], name="attn", **attrs)
    graph = helper.make_graph(
        [node], "a", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(size=shape).astype(np.float32) for n in "qkv"}
    if mask == TensorProto.BOOL:
        feeds["mask"] = rng.random((2, 3, 5, 5)) > 0.3
        feeds["mask"][..., 0] = True  # every query may attend somewhere
    elif mask == TensorProto.FLOAT:
        feeds["mask"] = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    written = load_proto(model.SerializeToString())
    assert [n.op_type for n in written.graph.node] == [
        "Transpose", "MatMul", "Mul", *(["Where"] if mask == TensorProto.BOOL else []),
        *(["Add"] if mask == TensorProto.FLOAT else []), "Softmax", "MatMul",
    ]  # fmt: skip
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (model, written)
    ]
    fused, decomposed = (s.run(["y"], feeds)[0] for s in run)
    np.testing.assert_allclose(decomposed, fused, atol=1e-5, rtol=1e-4)
