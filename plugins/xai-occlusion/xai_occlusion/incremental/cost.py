"""The cost model: operations of a plain forward and of an incremental one, counted while
planning, so that ``"auto"`` can choose between them (:func:`relative`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from xai_occlusion.incremental.operators import _CONV, _CONV_FN
from xai_occlusion.incremental.regions import Window


def materialise(value: torch.Tensor) -> int:
    """Writing a patch into a copy of the cache rows of one sample (read, copy, write)."""
    return 3 * value[0].numel()


def gather(channels: int, size: Sequence[int]) -> int:
    """Gathering a box of ``size`` positions of ``channels`` channels from a padded cache."""
    return 4 * channels * math.prod(size)


def generic(node: fx.Node, modules: Mapping[str, nn.Module], cache: Mapping, numel: int) -> int:
    """Operations of an op run on the whole map with ``numel`` outputs per sample."""
    flops = numel
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Linear):
            flops = 2 * module.in_features * numel
        elif isinstance(module, tuple(_CONV)):
            flops = 2 * numel * module.weight[0].numel()
    if node.op == "call_function" and node.target in _CONV_FN:
        weight = cache[node.args[1]] if isinstance(node.args[1], fx.Node) else None
        flops = 2 * numel * (weight[0].numel() if weight is not None else 1)
    return flops


def window(
    layer: Window,
    value: torch.Tensor,
    source: torch.Tensor,
    cache: Mapping,
    size: Sequence[int],
    read_size: Sequence[int],
) -> tuple[float, float]:
    """``(full, incremental)`` of a sliding-window layer with output ``value`` read from
    ``source``, computed on patches of ``size`` from crops of ``read_size``."""
    per_output = 2 * layer.module.weight[0].numel() if layer.module is not None else 1
    if layer.kind == "conv" and layer.module is None:
        weight: Any = layer.weight
        weight = cache[weight] if isinstance(weight, fx.Node) else weight
        per_output = 2 * weight[0].numel()
    if layer.kind != "conv":
        per_output = math.prod(layer.kernel)
    channels_out, channels_in = value.shape[1], source.shape[1]
    patch = channels_out * math.prod(size)
    return per_output * value[0].numel(), per_output * patch + gather(channels_in, read_size)


def pointwise(
    numel: int, spatial: Sequence[int], size: Sequence[int], reads: int
) -> tuple[float, float]:
    """``(full, incremental)`` of an element-wise op on patches of ``size`` (``reads``: the cost
    of bringing its inputs to that region)."""
    patch = numel // math.prod(spatial) * math.prod(size)
    return numel, patch + reads


def relative(cost: Mapping[str, float]) -> float:
    """The estimated cost of incremental inference as a share of plain occlusion's."""
    return cost["incremental"] / max(cost["full"], 1.0)
