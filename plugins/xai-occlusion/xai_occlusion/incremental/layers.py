"""Reading a sliding-window layer (convolution, pooling, evenly dividing adaptive pooling) off a
graph node as a :class:`Window`, and the correction factor of an average pooling's borders.
A mixin of :class:`~xai_occlusion.incremental.engine.Engine`: it reads the engine's rank,
modules and cached values."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from xai_occlusion.incremental.operators import (
    _ADAPTIVE,
    _ADAPTIVE_FN,
    _ADAPTIVE_FN_RANK,
    _AVGPOOL,
    _AVGPOOL_FN,
    _CONV,
    _CONV_FN,
    _MAXPOOL,
    _MAXPOOL_FN,
    _bind,
    _tuple,
)
from xai_occlusion.incremental.regions import Window


class WindowLayers:
    """Sliding-window layers of the traced graph (see the module docstring)."""

    def _window_layer(self, node: fx.Node, patches: list[fx.Node]) -> Window | None:
        rank = self.rank
        if len(patches) != 1 or node.args[:1] != (patches[0],):
            return None
        if node.op == "call_module":
            m = self.modules[node.target]
            if type(m) in _CONV and _CONV[type(m)] == rank and m.padding_mode == "zeros":
                if len(node.args) != 1 or node.kwargs:
                    return None
                return self._conv(m.kernel_size, m.stride, m.padding, m.dilation, module=m)
            if type(m) in _MAXPOOL and _MAXPOOL[type(m)] == rank and not m.return_indices:
                kernel = _tuple(m.kernel_size, rank)
                stride = _tuple(m.stride if m.stride else m.kernel_size, rank)
                pad, dilation = _tuple(m.padding, rank), _tuple(m.dilation, rank)
                return Window("max", kernel, stride, pad, dilation, ceil_mode=m.ceil_mode)
            if type(m) in _AVGPOOL and _AVGPOOL[type(m)] == rank:
                kernel = _tuple(m.kernel_size, rank)
                stride = _tuple(m.stride if m.stride else m.kernel_size, rank)
                return Window(
                    "avg",
                    kernel,
                    stride,
                    _tuple(m.padding, rank),
                    (1,) * rank,
                    ceil_mode=m.ceil_mode,
                    count_include_pad=m.count_include_pad,
                    divisor_override=getattr(m, "divisor_override", None),
                )
            if type(m) in _ADAPTIVE and rank == len(self._spatial(node)):
                return self._adaptive(_ADAPTIVE[type(m)], patches[0], node)
            return None
        if node.op != "call_function":
            return None
        target, args, kwargs = node.target, node.args, node.kwargs
        if target in _CONV_FN and _CONV_FN[target] == rank:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            b = _bind(args, kwargs, names, {"bias": None, "stride": 1, "padding": 0})
            b.setdefault("dilation", 1)
            b.setdefault("groups", 1)
            if any(a in self.dependent for a in (b["weight"], b["bias"]) if isinstance(a, fx.Node)):
                return None
            return self._conv(
                tuple(self.cache[b["weight"]].shape[2:])
                if isinstance(b["weight"], fx.Node)
                else tuple(b["weight"].shape[2:]),
                b["stride"],
                b["padding"],
                b["dilation"],
                weight=b["weight"],
                bias=b["bias"],
                groups=b["groups"],
            )
        if _MAXPOOL_FN.get(target) == rank or _AVGPOOL_FN.get(target) == rank:
            kind = "max" if target in _MAXPOOL_FN else "avg"
            if kind == "max":
                names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
                names += ("return_indices",)
                b = _bind(args, kwargs, names, {"stride": None, "padding": 0, "dilation": 1})
                if b.get("return_indices"):
                    return None
            else:
                names = ("input", "kernel_size", "stride", "padding", "ceil_mode")
                names += ("count_include_pad", "divisor_override")
                b = _bind(args, kwargs, names, {"stride": None, "padding": 0, "dilation": 1})
            kernel = _tuple(b["kernel_size"], rank)
            stride = b["stride"]
            stride = _tuple(stride if stride not in (None, [], ()) else kernel, rank)
            return Window(
                kind,
                kernel,
                stride,
                _tuple(b["padding"], rank),
                _tuple(b["dilation"], rank),
                ceil_mode=bool(b.get("ceil_mode", False)),
                count_include_pad=bool(b.get("count_include_pad", True)),
                divisor_override=b.get("divisor_override"),
            )
        if _ADAPTIVE_FN_RANK.get(target) == rank:
            return self._adaptive(_ADAPTIVE_FN[target], patches[0], node)
        return None

    def _conv(self, kernel, stride, padding, dilation, **extra) -> Window | None:
        rank = self.rank
        kernel, stride, dilation = (_tuple(v, rank) for v in (kernel, stride, dilation))
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0,) * rank
            else:  # "same": PyTorch puts the odd pixel at the end
                pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        else:
            pad = _tuple(padding, rank)
        if not (len(kernel) == len(stride) == len(pad) == len(dilation) == rank):
            return None
        return Window("conv", kernel, stride, pad, dilation, **extra)

    def _adaptive(self, kind: str, source: fx.Node, node: fx.Node) -> Window | None:
        """Adaptive pooling that divides its input evenly is plain pooling; else it is global."""
        spatial_in, spatial_out = self._spatial(source), self._spatial(node)
        if len(spatial_out) != self.rank or any(
            s % o for s, o in zip(spatial_in, spatial_out, strict=True)
        ):
            return None
        kernel = tuple(s // o for s, o in zip(spatial_in, spatial_out, strict=True))
        return Window(kind, kernel, kernel, (0,) * self.rank, (1,) * self.rank)

    def _avg_factor(self, node, layer, spatial_in, spatial_out, region) -> torch.Tensor | None:
        """``k / divisor`` per output position of an average pooling, or ``None`` when it is 1
        everywhere. The patch is computed as the mean over whole windows (padding read as 0)."""
        rank = self.rank
        ones = torch.ones((1, 1, *spatial_in), dtype=self.cache[node].dtype, device=self.device)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        options: dict[str, Any] = {
            "ceil_mode": layer.ceil_mode,
            "count_include_pad": layer.count_include_pad,
        }
        if layer.divisor_override is not None:
            options["divisor_override"] = layer.divisor_override
        average = pool(ones, layer.kernel, layer.stride, layer.pad, **options)
        pads: list[int] = []
        for axis in reversed(range(rank)):
            need = (spatial_out[axis] - 1) * layer.stride[axis] + layer.kernel[axis]
            pads += [layer.pad[axis], max(0, need - spatial_in[axis] - layer.pad[axis])]
        count = pool(F.pad(ones, pads), layer.kernel, layer.stride) * math.prod(layer.kernel)
        count = count[(..., *(slice(0, s) for s in spatial_out))]
        factor = average * math.prod(layer.kernel) / count.clamp(min=1)
        if bool((factor == 1).all()):
            return None
        return factor[0, 0]
