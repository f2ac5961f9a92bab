"""The structure of an ONNX graph, read once: which tensors are layers, their shapes, the
classifier head, the default layer, the tail of the graph after a set of tensors, and copies of
the model with extra outputs (the user's file is never changed).

Layers are named by their ONNX value names (the TorchScript exporter names them after the
module path, ``/layer4/layer4.1/relu_1/Relu_output_0``). A layer is a floating-point tensor
computed by a node from the model's input (weights reshaped by the graph are not layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xai_core.core.errors import LayerNotFoundError, ModelError
from xai_core.onnx.rewrite import FUSED_ATTENTION, rewrite, why_fused

_FLOAT = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)
# Operators that average (or max) every spatial position: what precedes them is the last
# spatial feature map of a classifier.
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}
_REDUCE_POOLS = {"ReduceMean", "ReduceMax"}
# Between the query-key product and the softmax of an attention: scaling, masks, biases.
_ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Where", "Cast"}
# What lies between a window partition and the attention's query projection: reshapes, the
# shift of shifted windows (Slice + Concat, or Gather), padding.
_LARGE = 4096  # bytes: an initializer larger than this holds weights, not a shape
_WINDOW_OPS = {"Reshape", "Transpose", "Slice", "Concat", "Pad", "Identity", "Gather", "Flatten"}


def _outer_references(node: Any) -> tuple[str, ...]:
    """The values of the enclosing graph that the subgraphs of ``node`` read."""
    found: dict[str, None] = {}
    for a in node.attribute:
        for sub in [a.g] if a.HasField("g") else list(a.graphs):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                reads = [*inner.input, *_outer_references(inner)]
                found.update(dict.fromkeys(r for r in reads if r and r not in local))
                local.update(inner.output)
    return tuple(name for name in found if name not in node.input)


def load_proto(source: str | bytes) -> Any:
    """The ``ModelProto`` of a path or bytes, with shapes inferred (external data loaded) and
    the rewrites of :mod:`xai_core.onnx.rewrite` applied (constant ``If`` folded, opset-23
    ``Attention`` written out)."""
    import onnx

    try:
        model = (
            onnx.load_model_from_string(bytes(source))
            if isinstance(source, bytes | bytearray)
            else onnx.load(str(source))
        )
    except Exception as exc:  # a file onnxruntime opened but onnx cannot parse
        raise ModelError(f"onnx could not read the model's graph: {exc}") from exc
    model = _inferred(model)
    rewritten = rewrite(model)
    return model if rewritten is model else _inferred(rewritten)


def _inferred(model: Any) -> Any:
    """``model`` with the shapes onnx infers recorded in it (``value_info``).

    onnx's inference serialises the whole model twice (hundreds of MB for a ViT-B), so it runs
    on a copy without the weights' bytes (their shapes come from their dims; the small
    constants that shape computations read keep their values)."""
    import onnx

    lite = onnx.ModelProto(ir_version=model.ir_version)
    lite.opset_import.extend(model.opset_import)
    lite.functions.extend(model.functions)  # the dynamo exporter's local functions
    graph = lite.graph
    for part in ("node", "input", "output", "value_info"):
        getattr(graph, part).extend(getattr(model.graph, part))
    for tensor in model.graph.initializer:
        if tensor.ByteSize() > _LARGE:
            graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        else:
            graph.initializer.add().CopyFrom(tensor)
    try:
        inferred = onnx.shape_inference.infer_shapes(lite)
    except Exception:  # shapes are a convenience: the graph still works without them
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for mine, theirs in zip(model.graph.output, inferred.graph.output, strict=True):
        mine.CopyFrom(theirs)
    return model


@dataclass(frozen=True)
class Node:
    """One node, with its attributes decoded (the interpreter's view)."""

    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(hash=False, compare=False)
    domain: str = ""
    opset: int = 0  # of the default domain, for operators whose semantics changed


@dataclass(frozen=True)
class Linear:
    """A linear layer of the graph: ``Gemm`` or ``MatMul`` (+ ``Add``) with constant weights.

    ``name`` is the value it outputs, ``input`` the value it reads; ``weight`` ``(out, in)``
    and ``bias`` as numpy arrays (``alpha``/``beta``/transposes folded in)."""

    name: str
    input: str
    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True)
class Tail:
    """The nodes recomputing the output from captured tensors (topological order), and the
    values they read that neither they nor the constants provide (fed from onnxruntime)."""

    nodes: tuple[Node, ...]
    feeds: tuple[str, ...]


class Graph:
    """A read-only view of one ONNX model's main graph."""

    def __init__(self, proto: Any) -> None:
        from onnx import helper, numpy_helper

        self.proto = proto
        self._serialized: bytes | None = None  # the model's bytes, for copies with outputs
        graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.constants: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer
        }
        initialized = set(self.constants)
        self.input = next(i.name for i in graph.input if i.name not in initialized)
        self.output = graph.output[0].name
        self.nodes: list[Node] = []
        for n in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            # If / Loop / Scan read values of the graph inside their branches, not as inputs:
            # listed as inputs here, so that they are downstream of them (then refused by name).
            inputs = (*n.input, *_outer_references(n))
            node = Node(n.op_type, n.name, inputs, tuple(n.output), attrs, n.domain, self.opset)
            self.nodes.append(node)
            if node.op == "Constant" and "value" in attrs:
                self.constants[node.outputs[0]] = numpy_helper.to_array(attrs["value"])
            elif node.op == "Identity" and node.inputs[0] in self.constants:
                # The exporter shares equal initializers through Identity nodes (LayerNorm
                # weights of ones): the copy is a constant too.
                self.constants[node.outputs[0]] = self.constants[node.inputs[0]]
        self.consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for i in node.inputs:
                self.consumers.setdefault(i, []).append(node)
        self.producer = {o: n for n in self.nodes for o in n.outputs if o}
        self.order = {o: i for i, n in enumerate(self.nodes) for o in n.outputs if o}
        self.types: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor = info.type.tensor_type
            shape = None
            if tensor.HasField("shape"):
                dims = tensor.shape.dim
                shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
            self.types[info.name] = (tensor.elem_type, shape)
        # Values computed from the input (the rest are constants folded by the graph).
        live = {self.input}
        for node in self.nodes:
            if any(i in live for i in node.inputs):
                live.update(o for o in node.outputs if o)
        self.live = live
        # Fused attention left after the rewrites: its probabilities are no tensor of the graph.
        self.fused = [n for n in self.nodes if n.op in FUSED_ATTENTION and n.outputs[0] in live]

    # -- layers ---------------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.types.get(name, (0, None))[1]

    def is_float(self, name: str) -> bool:
        elem = self.types.get(name, (1, None))[0]  # unknown type: assume float
        return elem in _FLOAT

    def layers(self) -> list[str]:
        """Every floating-point tensor computed from the input, in topological order."""
        return [
            o
            for n in self.nodes
            for o in n.outputs
            if o and o in self.live and self.is_float(o) and n.op != "Constant"
        ]

    def ancestors_of_output(self) -> set[str]:
        needed = {self.output}
        for node in reversed(self.nodes):
            if any(o in needed for o in node.outputs):
                needed.update(i for i in node.inputs if i)
        return needed

    def attention(self) -> list[str]:
        """Outputs of the softmaxes of self-attention: a ``Softmax`` over the last axis of a
        ``MatMul`` of two computed tensors (queries times keys), through element-wise scaling,
        masking or bias. Their shapes are checked when they are recorded."""
        found = []
        for node in self.nodes:
            if node.op != "Softmax" or node.outputs[0] not in self.live:
                continue
            if node.attrs.get("axis", -1) not in (-1, 3) and self.opset >= 13:
                continue
            source = self.producer.get(node.inputs[0])
            while source is not None and source.op in _ELEMENTWISE:
                live = [i for i in source.inputs if i in self.live]
                source = self.producer.get(live[0]) if len(live) == 1 else None
            products = source is not None and source.op == "MatMul"
            if products and all(i in self.live for i in source.inputs):
                found.append(node.outputs[0])
        return found

    def fused_reason(self, node: Node) -> str | None:
        """Why the fused attention ``node`` was left fused (opset 23's ``Attention``)."""
        if node.op != "Attention" or node.domain not in ("", "ai.onnx"):
            return None
        shapes = {name: shape for name, (_, shape) in self.types.items()}
        return why_fused(node.inputs, node.outputs, node.attrs, shapes)

    def windowed(self, softmax: str) -> bool:
        """Whether the tokens of the attention of ``softmax`` were split into windows (Swin,
        MaxViT): on their way to the query projection they pass a ``Transpose`` of a tensor of
        rank 6 or more, the window partition ``(N, H/w, w, W/w, w, C) -> (N, H/w, W/w, w, w,
        C)``, through reshapes, shifts and padding only."""
        tokens = self.tokens_entering(softmax)
        seen = set()
        while tokens is not None and tokens not in seen:
            seen.add(tokens)
            node = self.producer.get(tokens)
            if node is None or node.op not in _WINDOW_OPS:
                return False
            if node.op == "Transpose" and len(node.attrs.get("perm", ())) >= 6:
                return True
            live = [i for i in node.inputs if i in self.live]
            tokens = live[0] if live else None
        return False

    def windowed_attention(self) -> str | None:
        """The first self-attention softmax whose tokens come in windows, or ``None``."""
        return next((a for a in self.attention() if self.windowed(a)), None)

    def tokens_entering(self, softmax: str) -> str | None:
        """The tokens the attention of ``softmax`` projects to queries and keys: the input of
        the nearest linear layer (``MatMul`` / ``Gemm`` with constant weights) above it."""
        queue, seen = [softmax], set()
        while queue:
            name = queue.pop(0)
            node = self.producer.get(name)
            if node is None or name in seen:
                continue
            seen.add(name)
            if node.op in ("MatMul", "Gemm") and node.inputs[1] in self.constants:
                tokens = node.inputs[0]
                # nn.MultiheadAttention projects sequence-first tokens: the layer is the
                # batch-first tensor before that transpose (torchvision's ln_1).
                while tokens in self.producer and self.producer[tokens].op == "Transpose":
                    tokens = self.producer[tokens].inputs[0]
                return tokens
            queue.extend(i for i in node.inputs if i in self.live)
        return None

    def default_layer(self) -> str:
        """For a transformer, the tokens entering the last self-attention (after it only the
        class token reaches the head); else the last spatial feature map before global pooling
        (the input of the last ``GlobalAveragePool`` / spatial ``ReduceMean`` / ``Flatten`` of a
        feature map on the path to the output), else the last feature map of the input's rank."""
        rank = len(self.shape(self.input) or ())
        needed = self.ancestors_of_output()
        attention = [a for a in self.attention() if a in needed and not self.windowed(a)]
        tokens = self.tokens_entering(attention[-1]) if attention else None
        if tokens is not None:
            return tokens
        for node in reversed(self.nodes):
            if node.outputs[0] not in needed or not node.inputs:
                continue
            source = node.inputs[0]
            if self._pools(node, rank) and self._spatial(source, rank):
                return source
        maps = [name for name in self.layers() if name in needed and self._spatial(name, rank)]
        if not maps:
            raise LayerNotFoundError(
                "No tensor of this ONNX graph is a feature map of the input (N, C, *spatial) "
                "with more than one position; pass the layer to explain (option `layer`; "
                "`xai layers MODEL` lists them)."
            )
        return maps[-1]

    def _pools(self, node: Node, rank: int) -> bool:
        if node.op in _GLOBAL_POOLS:
            return True
        if node.op == "Flatten":  # a feature map flattened into the classifier (VGG-style)
            return any(c.op in ("Gemm", "MatMul") for c in self.consumers.get(node.outputs[0], []))
        if node.op in _REDUCE_POOLS:
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1:
                axes = self.constants.get(node.inputs[1])
            if axes is None:
                return False
            spatial = {a % rank for a in np.asarray(axes).ravel().tolist()} if rank else set()
            return spatial == set(range(2, rank))
        return False

    def _spatial(self, name: str, rank: int) -> bool:
        shape = self.shape(name)
        if not rank or shape is None or len(shape) != rank or name not in self.live:
            return False
        dims = shape[2:]
        # A size unknown until run time (an export with dynamic height and width) may be > 1.
        return any(d is None for d in dims) or math.prod(dims) > 1

    # -- the classifier head --------------------------------------------------------------------

    def linears(self) -> dict[str, Linear]:
        """Every linear layer with constant weights, by the value it outputs."""
        found: dict[str, Linear] = {}
        consumers = self.consumers
        for node in self.nodes:
            if node.op == "Gemm" and node.inputs[1] in self.constants:
                a = node.attrs
                if a.get("transA", 0):
                    continue
                w = self.constants[node.inputs[1]].astype(np.float32, copy=False)
                w = w if a.get("transB", 0) else w.T
                w = w * a["alpha"] if a.get("alpha", 1.0) != 1.0 else w
                b = None
                if len(node.inputs) > 2 and node.inputs[2] in self.constants:
                    b = self.constants[node.inputs[2]].astype(np.float32) * a.get("beta", 1.0)
                    if b.shape != (w.shape[0],):
                        b = np.broadcast_to(b, (w.shape[0],)).copy()
                found[node.outputs[0]] = Linear(node.outputs[0], node.inputs[0], w, b)
            elif node.op == "MatMul" and node.inputs[1] in self.constants:
                w = self.constants[node.inputs[1]].astype(np.float32, copy=False)
                if w.ndim != 2:
                    continue
                name, b = node.outputs[0], None
                after = consumers.get(name, [])
                if len(after) == 1 and after[0].op == "Add":
                    other = [i for i in after[0].inputs if i != name]
                    bias = self.constants.get(other[0]) if other else None
                    if bias is not None and bias.shape == (w.shape[1],):
                        name, b = after[0].outputs[0], bias.astype(np.float32)
                found[name] = Linear(name, node.inputs[0], w.T, b)  # a view: copied when used
        return found

    def layer_norms(self) -> dict[str, tuple[tuple[int, ...], Any, Any, float]]:
        """``LayerNormalization`` nodes over the last axis with constant affine parameters:
        ``{output: (shape, weight, bias, eps)}``."""
        norms = {}
        for node in self.nodes:
            if node.op != "LayerNormalization" or node.attrs.get("axis", -1) != -1:
                continue
            weight = self.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
            bias = self.constants.get(node.inputs[2]) if len(node.inputs) > 2 else None
            if weight is None or weight.ndim != 1:
                continue
            eps = float(node.attrs.get("epsilon", 1e-5))
            norms[node.outputs[0]] = ((weight.shape[0],), weight, bias, eps)
        return norms

    # -- capture and the tail -------------------------------------------------------------------

    def with_outputs(self, names: Sequence[str]) -> bytes:
        """The model serialised with ``names`` added as graph outputs (after the existing ones).

        Protobuf merges concatenated messages (repeated fields are appended), so the model is
        serialised once and each copy is those bytes followed by a small message holding
        only the extra outputs: no copy of the weights is built per set of layers."""
        from onnx import ModelProto, helper

        if self._serialized is None:
            self._serialized = self.proto.SerializeToString()
        extra = ModelProto()
        present = {o.name for o in self.proto.graph.output}
        for name in dict.fromkeys(names):
            if name not in present:
                elem = self.types.get(name, (1, None))[0] or 1
                extra.graph.output.append(helper.make_tensor_value_info(name, elem, None))
        return self._serialized + extra.SerializeToString()

    def tail(self, captured: Sequence[str]) -> Tail:
        """The nodes downstream of ``captured`` that the output depends on, and what else they
        read (values computed upstream, fed from onnxruntime's run)."""
        downstream = set(captured)
        after = []
        for node in self.nodes:
            if any(i in downstream for i in node.inputs):
                after.append(node)
                downstream.update(o for o in node.outputs if o)
        needed = {self.output}
        nodes = []
        for node in reversed(after):
            if any(o in needed for o in node.outputs):
                nodes.append(node)
                needed.update(i for i in node.inputs if i)
        nodes.reverse()
        produced = {o for n in nodes for o in n.outputs}
        read = [i for n in nodes for i in n.inputs]
        feeds = dict.fromkeys(
            i for i in (*captured, *read) if i and i not in produced and i not in self.constants
        )
        return Tail(tuple(nodes), tuple(feeds))
