"""The operator table: which modules, functions and methods the engine runs on patches
(sliding windows, element-wise ops), which only read metadata, which change a value in place;
the rest run on the whole map."""

from __future__ import annotations

import operator
from collections.abc import Container, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FN = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE = {
    **dict.fromkeys((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "avg"),
    **dict.fromkeys((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "max"),
}
_MAXPOOL_FN = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVGPOOL_FN = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_AVG_FN = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
_ADAPTIVE_MAX_FN = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
_ADAPTIVE_FN = {**dict.fromkeys(_ADAPTIVE_AVG_FN, "avg"), **dict.fromkeys(_ADAPTIVE_MAX_FN, "max")}
_ADAPTIVE_FN_RANK = {
    fn: rank for fns in (_ADAPTIVE_AVG_FN, _ADAPTIVE_MAX_FN) for rank, fn in enumerate(fns, 1)
}
# Modules that act on each spatial position on its own (they may mix channels).
_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.LocalResponseNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmax2d,
)
_POINTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pos,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.clip,
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.sigmoid,
    F.tanh,
}
_POINTWISE_METHODS = {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "contiguous",
    "clone",
}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_META_METHODS = {"size", "dim", "ndimension"}
_META_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


def _own_forward(module: nn.Module, classes: Sequence[type]) -> bool:
    """The module's class is one of ``classes`` or a subclass that keeps its ``forward``."""
    return any(type(module).forward is cls.forward for cls in classes) and isinstance(
        module, tuple(classes)
    )


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict) -> dict:
    """Positional and keyword arguments of a call as ``{name: value}``, defaults filled in."""
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(int(v) for v in value)
        return items if len(items) == rank else items * rank if len(items) == 1 else ()
    return (int(value),) * rank


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        return getattr(node.target, "__name__", "").endswith("_") and node.target in (
            torch.relu_,
            F.relu_,
        )
    return False


def layout_agnostic(node: fx.Node, modules: Mapping[str, nn.Module], folded: Container) -> bool:
    """The op accepts inputs in any memory layout (a generic op that does not may need row-major,
    non channels-last inputs). ``folded``: convolutions run with a BatchNorm folded in."""
    agnostic = node in folded or (node.op == "call_function" and node.target is torch.cat)
    if node.op == "call_module":
        m = modules[node.target]
        agnostic = agnostic or isinstance(
            m, (*_CONV, *_MAXPOOL, *_AVGPOOL, *_ADAPTIVE, *_POINTWISE_MODULES)
        )
    elif node.op == "call_function":
        agnostic = agnostic or node.target in _POINTWISE_FUNCTIONS
        agnostic = agnostic or node.target in _ADAPTIVE_FN or node.target in _MAXPOOL_FN
    elif node.op == "call_method":
        agnostic = node.target in _POINTWISE_METHODS
    return agnostic
