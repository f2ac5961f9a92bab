"""ONNX operators written with torch functions, so that autograd differentiates a part of an
ONNX graph (the tail after captured tensors: Grad-CAM's gradient pass).

Only the forward semantics are written; torch derives the backward. The operators are those of
exported classifiers (convolutional and transformer): anything else raises
:class:`~xai_core.core.errors.UnsupportedOperatorError` naming the operator, before any work.
Integer tensors (shape computations) are computed too, without gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.errors import UnsupportedOperatorError
from xai_core.onnx.graph import Node
from xai_core.onnx.rewrite import FUSED_ATTENTION, fused_attention_error

Op = Callable[[Node, list[Any]], Any]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def check_supported(nodes: Iterable[Node]) -> None:
    """Raise ``UnsupportedOperatorError`` for the first node no operator here implements."""
    for node in nodes:
        if node.op in FUSED_ATTENTION:
            raise fused_attention_error(node)
        if node.domain not in ("", "ai.onnx") or node.op not in OPS:
            name = f"{node.domain}.{node.op}" if node.domain not in ("", "ai.onnx") else node.op
            raise UnsupportedOperatorError(
                f"Gradients through this ONNX graph need the operator {name!r} (node "
                f"{node.name!r}), which xai-core's ONNX interpreter cannot differentiate. Choose a "
                f"layer after it (`layer=`), or use a method without gradients (cam, occlusion).",
                operator=name,
                node=node.name,
            )


def run(nodes: Iterable[Node], values: dict[str, Any]) -> dict[str, Any]:
    """Execute ``nodes`` in order on ``values`` (name -> tensor), adding their outputs."""
    for node in nodes:
        if node.outputs and all(o in values for o in node.outputs if o):
            continue  # a constant already converted (on the right device)
        args = [values[i] if i else None for i in node.inputs]
        out = OPS[node.op](node, args)
        outs = out if isinstance(out, tuple) else (out,)
        for name, value in zip(node.outputs, outs, strict=False):
            if name:
                values[name] = value
    return values


def constant(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def shared_constant(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor for the interpreter, sharing its memory on the CPU: a graph's
    weights are read-only views of the model's bytes, and the interpreter never writes into
    its inputs, so a ViT-B's 330 MB are not copied for the gradient pass."""
    if not array.flags.writeable and device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the array is not writable"
            return torch.from_numpy(array)
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# -- element-wise -------------------------------------------------------------------------------

_UNARY: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Identity": lambda x: x,
    "Softplus": F.softplus,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda node, a, fn=_fn: fn(a[0])

_BINARY: Mapping[str, Callable[[Any, Any], torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = lambda node, a, fn=_fn: fn(a[0], a[1])


@op("Div")
def _div(node: Node, a: list[Any]) -> torch.Tensor:
    if not a[0].is_floating_point() and not a[1].is_floating_point():
        return torch.div(a[0], a[1], rounding_mode="trunc")
    return a[0] / a[1]


@op("Max", "Min", "Sum", "Mean")
def _variadic(node: Node, a: list[Any]) -> torch.Tensor:
    out = a[0]
    for t in a[1:]:
        if node.op == "Max":
            out = torch.maximum(out, t)
        elif node.op == "Min":
            out = torch.minimum(out, t)
        else:
            out = out + t
    return out / len(a) if node.op == "Mean" else out


@op("CastLike")
def _cast_like(node: Node, a: list[Any]) -> torch.Tensor:
    return a[0].to(a[1].dtype)


@op("Where")
def _where(node: Node, a: list[Any]) -> torch.Tensor:
    return torch.where(a[0].bool(), a[1], a[2])


@op("LeakyRelu")
def _leaky(node: Node, a: list[Any]) -> torch.Tensor:
    return F.leaky_relu(a[0], node.attrs.get("alpha", 0.01))


@op("Elu")
def _elu(node: Node, a: list[Any]) -> torch.Tensor:
    return F.elu(a[0], node.attrs.get("alpha", 1.0))


@op("HardSigmoid")
def _hard_sigmoid(node: Node, a: list[Any]) -> torch.Tensor:
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return (alpha * a[0] + beta).clamp(0, 1)


@op("HardSwish")
def _hard_swish(node: Node, a: list[Any]) -> torch.Tensor:
    return a[0] * (a[0] / 6 + 0.5).clamp(0, 1)


@op("Gelu")
def _gelu(node: Node, a: list[Any]) -> torch.Tensor:
    return F.gelu(a[0], approximate=node.attrs.get("approximate", "none"))


@op("Clip")
def _clip(node: Node, a: list[Any]) -> torch.Tensor:
    low = a[1] if len(a) > 1 and a[1] is not None else node.attrs.get("min")
    high = a[2] if len(a) > 2 and a[2] is not None else node.attrs.get("max")
    low = low.item() if isinstance(low, torch.Tensor) else low
    high = high.item() if isinstance(high, torch.Tensor) else high
    return a[0].clamp(low, high)


@op("Cast")
def _cast(node: Node, a: list[Any]) -> torch.Tensor:
    from onnx import helper

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    return a[0].to(torch.from_numpy(np.zeros(0, dtype)).dtype)


# -- convolutions, pooling, normalisation --------------------------------------------------------


def _padding(node: Node, x: torch.Tensor, spatial: int, fill: float = 0.0):
    """Symmetric padding for torch, after padding ``x`` itself where ONNX pads asymmetrically."""
    auto = node.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedOperatorError(
            f"{node.op} with auto_pad={auto} (node {node.name!r}) is not supported by xai-core's "
            f"ONNX interpreter.",
            operator=node.op,
            node=node.name,
        )
    pads = (
        list(node.attrs.get("pads", [0] * 2 * spatial)) if auto == "NOTSET" else [0] * 2 * spatial
    )
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, begin
    flat = [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]
    return F.pad(x, flat, value=fill), [0] * spatial


@op("Conv")
def _conv(node: Node, a: list[Any]) -> torch.Tensor:
    x, w = a[0], a[1]
    bias = a[2] if len(a) > 2 else None
    spatial = w.ndim - 2
    x, pads = _padding(node, x, spatial)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return conv(
        x,
        w,
        bias,
        stride=node.attrs.get("strides", [1] * spatial),
        padding=pads,
        dilation=node.attrs.get("dilations", [1] * spatial),
        groups=node.attrs.get("group", 1),
    )


@op("BatchNormalization")
def _batch_norm(node: Node, a: list[Any]) -> torch.Tensor:
    x, scale, bias, mean, var = a[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instance_norm(node: Node, a: list[Any]) -> torch.Tensor:
    return F.instance_norm(a[0], weight=a[1], bias=a[2], eps=node.attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    axis = node.attrs.get("axis", -1) % x.ndim
    shape = x.shape[axis:]
    weight = a[1].expand(shape) if a[1] is not None else None
    bias = a[2].expand(shape) if len(a) > 2 and a[2] is not None else None
    return F.layer_norm(x, shape, weight, bias, node.attrs.get("epsilon", 1e-5))


@op("GlobalAveragePool")
def _global_avg(node: Node, a: list[Any]) -> torch.Tensor:
    return a[0].mean(dim=tuple(range(2, a[0].ndim)), keepdim=True)


@op("GlobalMaxPool")
def _global_max(node: Node, a: list[Any]) -> torch.Tensor:
    return a[0].amax(dim=tuple(range(2, a[0].ndim)), keepdim=True)


@op("MaxPool", "AveragePool")
def _pool(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    kernel = list(node.attrs["kernel_shape"])
    spatial = len(kernel)
    strides = node.attrs.get("strides", [1] * spatial)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if node.op == "MaxPool":
        x, pads = _padding(node, x, spatial, fill=float("-inf"))
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        dilation = node.attrs.get("dilations", [1] * spatial)
        return pool(x, kernel, strides, pads, dilation=dilation, ceil_mode=ceil)
    include = bool(node.attrs.get("count_include_pad", 0))
    if not include:
        pads = list(node.attrs.get("pads", [0] * 2 * spatial))
        if pads[:spatial] != pads[spatial:]:
            raise UnsupportedOperatorError(
                f"AveragePool with asymmetric pads excluded from the count (node {node.name!r}) "
                f"is not supported by xai-core's ONNX interpreter.",
                operator=node.op,
                node=node.name,
            )
        pads = pads[:spatial]
    else:
        x, pads = _padding(node, x, spatial)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    return pool(x, kernel, strides, pads, ceil_mode=ceil, count_include_pad=include)


@op("Softmax", "LogSoftmax")
def _softmax(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    axis = node.attrs.get("axis", -1 if _opset_13_or_later(node) else 1)
    fn = torch.softmax if node.op == "Softmax" else torch.log_softmax
    if _opset_13_or_later(node):
        return fn(x, axis)
    # Before opset 13 the input is flattened to 2D at `axis` (the legacy exporter's Softmax).
    shape = x.shape
    return fn(x.reshape(int(np.prod(shape[:axis])), -1), 1).reshape(shape)


def _opset_13_or_later(node: Node) -> bool:
    return node.opset == 0 or node.opset >= 13


# -- linear algebra -------------------------------------------------------------------------------


@op("Gemm")
def _gemm(node: Node, a: list[Any]) -> torch.Tensor:
    x, w = a[0], a[1]
    x = x.t() if node.attrs.get("transA", 0) else x
    w = w.t() if node.attrs.get("transB", 0) else w
    y = node.attrs.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + node.attrs.get("beta", 1.0) * a[2]
    return y


@op("MatMul")
def _matmul(node: Node, a: list[Any]) -> torch.Tensor:
    return torch.matmul(a[0], a[1])


# -- reductions ---------------------------------------------------------------------------------


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    axes = node.attrs.get("axes")
    if axes is None and len(a) > 1 and a[1] is not None:
        axes = _ints(a[1])
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.ndim))
    dims = tuple(int(d) % x.ndim for d in axes)
    if node.op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if node.op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    return (x.amax if node.op == "ReduceMax" else x.amin)(dim=dims, keepdim=keep)


# -- shapes -------------------------------------------------------------------------------------


@op("Flatten")
def _flatten(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    axis = node.attrs.get("axis", 1) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Reshape")
def _reshape(node: Node, a: list[Any]) -> torch.Tensor:
    x, shape = a[0], _ints(a[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(node: Node, a: list[Any]) -> torch.Tensor:
    perm = node.attrs.get("perm") or list(reversed(range(a[0].ndim)))
    return a[0].permute(*perm)


@op("Squeeze")
def _squeeze(node: Node, a: list[Any]) -> torch.Tensor:
    axes = node.attrs.get("axes")
    if axes is None and len(a) > 1 and a[1] is not None:
        axes = _ints(a[1])
    if axes is None:
        return a[0].squeeze()
    return a[0].squeeze(tuple(int(d) % a[0].ndim for d in axes))


@op("Unsqueeze")
def _unsqueeze(node: Node, a: list[Any]) -> torch.Tensor:
    axes = node.attrs.get("axes")
    if axes is None:
        axes = _ints(a[1])
    x = a[0]
    rank = x.ndim + len(axes)
    for d in sorted(int(d) % rank for d in axes):
        x = x.unsqueeze(d)
    return x


@op("Concat")
def _concat(node: Node, a: list[Any]) -> torch.Tensor:
    parts = [t for t in a if t is not None]
    return torch.cat(parts, dim=node.attrs["axis"])


@op("Split")
def _split(node: Node, a: list[Any]) -> tuple[torch.Tensor, ...]:
    x, axis = a[0], node.attrs.get("axis", 0)
    sizes = node.attrs.get("split")
    if sizes is None and len(a) > 1 and a[1] is not None:
        sizes = _ints(a[1])
    if sizes is None:
        count = node.attrs.get("num_outputs", len(node.outputs))
        size = -(-x.shape[axis] // count)
        return tuple(torch.split(x, size, dim=axis))
    return tuple(torch.split(x, list(sizes), dim=axis))


@op("Slice")
def _slice(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes"), None
    else:
        starts, ends = _ints(a[1]), _ints(a[2])
        axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else None
        steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 0:
            raise UnsupportedOperatorError(
                f"Slice with a negative step (node {node.name!r}) is not supported by xai-core's "
                f"ONNX interpreter.",
                operator="Slice",
                node=node.name,
            )
        size = x.shape[int(axis)]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[int(axis) % x.ndim] = slice(start, end, step)
    return x[tuple(index)]


@op("Gather")
def _gather(node: Node, a: list[Any]) -> torch.Tensor:
    x, index = a[0], a[1].long()
    axis = node.attrs.get("axis", 0) % x.ndim
    index = torch.where(index < 0, index + x.shape[axis], index)
    flat = torch.index_select(x, axis, index.reshape(-1))
    return flat.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1 :]))


@op("Shape")
def _shape(node: Node, a: list[Any]) -> torch.Tensor:
    dims = list(a[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64, device=a[0].device)


@op("Expand")
def _expand(node: Node, a: list[Any]) -> torch.Tensor:
    shape = _ints(a[1])
    target = torch.broadcast_shapes(tuple(a[0].shape), tuple(shape))
    return a[0].expand(target)


@op("ConstantOfShape")
def _constant_of_shape(node: Node, a: list[Any]) -> torch.Tensor:
    value = node.attrs.get("value")
    fill = constant(_tensor(value), a[0].device) if value is not None else None
    shape = _ints(a[0])
    if fill is None:
        return torch.zeros(shape, device=a[0].device)
    return fill.reshape(()).expand(shape).clone() if fill.numel() == 1 else fill.reshape(shape)


@op("Constant")
def _constant(node: Node, a: list[Any]) -> torch.Tensor:
    attrs = node.attrs
    if "value" in attrs:
        return torch.from_numpy(np.array(_tensor(attrs["value"]), copy=True))
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise UnsupportedOperatorError(
        f"Constant node {node.name!r} with attributes {sorted(attrs)}.", "Constant", node.name
    )


@op("Range")
def _range(node: Node, a: list[Any]) -> torch.Tensor:
    start, limit, delta = (t.item() for t in a[:3])
    return torch.arange(start, limit, delta, dtype=a[0].dtype, device=a[0].device)


@op("Dropout")
def _dropout(node: Node, a: list[Any]) -> torch.Tensor:
    return a[0]  # inference graphs: the identity


@op("Pad")
def _pad(node: Node, a: list[Any]) -> torch.Tensor:
    x = a[0]
    pads = node.attrs.get("pads") or _ints(a[1])
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = a[2].item() if len(a) > 2 and a[2] is not None else node.attrs.get("value", 0.0)
    if len(a) > 3 and a[3] is not None:
        raise UnsupportedOperatorError(
            f"Pad with axes (node {node.name!r}) is not supported.", "Pad", node.name
        )
    rank = x.ndim
    begin, end = pads[:rank], pads[rank:]
    flat = [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]
    if mode == "constant":
        return F.pad(x, flat, value=value)
    return F.pad(x, flat[: 2 * (rank - 2)], mode={"edge": "replicate"}.get(mode, mode))


def _tensor(value: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(value)
