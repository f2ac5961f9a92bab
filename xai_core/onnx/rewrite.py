"""Rewrites of an ONNX model before xai-core reads it (the user's file is never changed):

* an ``If`` whose condition is a constant (exporters emit these for shape checks) is replaced
  by the nodes of the branch it always takes, so the values inside become layers, can be
  captured, and the gradient pass runs through them (a data-dependent ``If`` and ``Loop`` stay:
  the interpreter refuses them with :class:`UnsupportedOperatorError` naming the operator);
* the fused attention of opset 23 (``Attention``: what ``torch.onnx.export(dynamo=True,
  opset_version=23)`` makes of ``scaled_dot_product_attention``) is written out as
  ``MatMul -> Mul -> (mask) -> Softmax -> MatMul``, so its attention probabilities are a tensor
  that can be captured as an output and differentiated. Variants with no such tensor of their
  own (3D packed heads, a KV cache, causal or soft-capped scores, extra outputs) stay fused.

The forward of the model itself stays onnxruntime's on the original graph; the rewritten one is
what the adapter captures layers from, and the gradient pass checks its scores against the
original's (:mod:`xai_core.onnx.gradients`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xai_core.core.errors import UnsupportedOperatorError

# Fused attention operators that hide their probabilities: the default domain's (opset 23)
# and onnxruntime's contrib ops (from its transformer optimiser).
FUSED_ATTENTION = {
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "PackedAttention",
    "PackedMultiHeadAttention",
    "SparseAttention",
    "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention",
}
UNFUSE_HINT = (
    "Export the model with its attention written out: torch.onnx.export with opset_version <= 22 "
    "(the default) or the legacy exporter (dynamo=False); timm models with fused attention off "
    "(TIMM_FUSED_ATTN=0 or timm.layers.set_fused_attn(False)); do not run onnxruntime's "
    "transformer optimiser on the file you explain."
)


def fused_attention_error(node: Any, why: str | None = None) -> UnsupportedOperatorError:
    """The typed refusal of a fused attention node ``node`` (a :class:`Node`)."""
    domain = getattr(node, "domain", "")
    name = f"{domain}.{node.op}" if domain not in ("", "ai.onnx") else node.op
    reason = f" ({why})" if why else ""
    return UnsupportedOperatorError(
        f"This ONNX graph computes attention with the fused operator {name!r} (node "
        f"{node.name!r}){reason}: its attention probabilities are not a tensor of the graph, so "
        f"they cannot be captured or differentiated. {UNFUSE_HINT}",
        operator=name,
        node=node.name,
    )


def rewrite(model: Any) -> Any:
    """A copy of ``model`` (a ``ModelProto``) with constant ``If`` folded and opset-23
    ``Attention`` decomposed; ``model`` itself when there is nothing to rewrite."""
    graph = model.graph
    if not any(n.op_type in ("If", "Attention") for n in graph.node):
        return model
    from onnx import ModelProto

    copy = ModelProto()
    copy.CopyFrom(model)
    _fold_constant_ifs(copy.graph)
    _decompose_attention(copy.graph)
    return copy


# -- If with a constant condition ---------------------------------------------------------------


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = a.t
    return {name: numpy_helper.to_array(t) for name, t in values.items() if _small(t)}


def _small(tensor: Any) -> bool:
    return int(np.prod(tensor.dims)) <= 1  # conditions are scalars; skip reading the weights


def _fold_constant_ifs(graph: Any) -> None:
    """Replace each ``If`` whose condition is constant by its branch (repeated: a folded branch
    may hold another constant ``If``)."""
    from onnx import helper

    while True:
        constants = _constant_values(graph)
        nodes = list(graph.node)
        index = next(
            (
                i
                for i, n in enumerate(nodes)
                if n.op_type == "If" and n.domain in ("", "ai.onnx") and n.input[0] in constants
            ),
            None,
        )
        if index is None:
            return
        node = nodes[index]
        taken = "then_branch" if bool(constants[node.input[0]].reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == taken)
        inlined = list(branch.node)
        graph.initializer.extend(branch.initializer)
        for inner, outer in zip(branch.output, node.output, strict=True):
            if outer:
                inlined.append(
                    helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}/{outer}")
                )
        graph.value_info.extend(branch.value_info)
        del graph.node[:]
        graph.node.extend([*nodes[:index], *inlined, *nodes[index + 1 :]])


# -- opset-23 Attention --------------------------------------------------------------------------


def why_fused(
    inputs: Sequence[str],
    outputs: Sequence[str],
    attrs: dict[str, Any],
    shapes: Mapping[str, Sequence[int | None] | None],
) -> str | None:
    """Why an opset-23 ``Attention`` node cannot be written out, or ``None`` (``shapes``: the
    inferred shapes of the graph's values, ``None`` for an unknown dimension)."""
    inputs = [*inputs, *[""] * 6]
    q, k = shapes.get(inputs[0]), shapes.get(inputs[1])
    if attrs.get("q_num_heads") is not None or (q is not None and len(q) != 4):
        return "queries with the heads packed in 3D"
    if q is None or k is None or (attrs.get("scale") is None and not q[-1]):
        return "shapes unknown to shape inference"
    if len(k) != 4 or q[1] != k[1]:
        return "grouped-query attention"
    if inputs[4] or inputs[5]:
        return "a key/value cache"
    if attrs.get("is_causal", 0):
        return "causal"
    if attrs.get("softcap", 0.0):
        return "soft-capped scores"
    if any(outputs[1:]):
        return "it outputs its cache or scores"
    return None


def _decompose_attention(graph: Any) -> None:
    from onnx import TensorProto, helper

    shapes = {
        v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.value_info]
        if v.type.tensor_type.HasField("shape")
    }
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    elem.update({t.name: t.data_type for t in graph.initializer})
    out = []
    for node in graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            out.append(node)
            continue
        inputs = list(node.input) + [""] * 4
        mask = inputs[3]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if why_fused(node.input, node.output, attrs, shapes) or (mask and mask not in elem):
            out.append(node)  # left fused: refused with the reason where it is needed
            continue
        q, k, v = inputs[:3]
        base = node.name or node.output[0]

        def name(part: str, base: str = base) -> str:
            return f"{base}/{part}"

        scale = attrs.get("scale")
        if scale is None:  # 1 / sqrt(head size)
            scale = 1.0 / float(np.sqrt(shapes[q][-1]))
        dtype = elem.get(q, TensorProto.FLOAT)
        graph.initializer.append(helper.make_tensor(name("scale"), dtype, [], [scale]))
        new = [
            helper.make_node("Transpose", [k], [name("KT")], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, name("KT")], [name("QK")]),
            helper.make_node("Mul", [name("QK"), name("scale")], [name("scores")]),
        ]
        scores = name("scores")
        if mask and elem[mask] == TensorProto.BOOL:  # True: may attend
            graph.initializer.append(
                helper.make_tensor(name("-inf"), elem.get(q, TensorProto.FLOAT), [], [-np.inf])
            )
            new.append(
                helper.make_node("Where", [mask, scores, name("-inf")], [name("masked")])
            )
            scores = name("masked")
        elif mask:  # an additive float mask
            new.append(helper.make_node("Add", [scores, mask], [name("masked")]))
            scores = name("masked")
        new.append(helper.make_node("Softmax", [scores], [name("Softmax_output_0")], axis=-1))
        new.append(helper.make_node("MatMul", [name("Softmax_output_0"), v], [node.output[0]]))
        out.extend(new)
    del graph.node[:]
    graph.node.extend(out)
