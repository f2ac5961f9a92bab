"""Planning: one pass over the traced graph on the unoccluded batch that caches every value,
decides for each node how it runs on a chunk of perturbations (a :class:`_Step`: on patches
through a sliding window or element-wise, as metadata, or on the whole map) and where its patch
lies, folds BatchNorms and counts the cost. A mixin of
:class:`~xai_occlusion.incremental.engine.Engine`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from xai_occlusion.incremental import cost
from xai_occlusion.incremental.folding import fold_batchnorm
from xai_occlusion.incremental.layers import WindowLayers
from xai_occlusion.incremental.operators import (
    _META_ATTRIBUTES,
    _META_METHODS,
    _POINTWISE_FUNCTIONS,
    _POINTWISE_METHODS,
    _POINTWISE_MODULES,
    _bind,
    _is_inplace,
    _own_forward,
    layout_agnostic,
)
from xai_occlusion.incremental.options import Unsupported
from xai_occlusion.incremental.regions import Region, Window, _finish, _reach


@dataclass
class _Step:
    node: fx.Node
    kind: str  # "input", "window", "pointwise", "meta", "generic"
    window: Window | None = None
    reads: dict[fx.Node, tuple] | None = None  # pointwise: arguments brought to the union
    read_starts: torch.Tensor | None = None  # window: input crop start per window position
    read_size: tuple[int, ...] = ()
    source: tuple = ()
    factor: torch.Tensor | None = None  # avg pooling: k / divisor per output position
    free: tuple[fx.Node, ...] = ()  # values no later step needs
    contiguous: bool = False  # generic: the op may need row-major (non channels-last) inputs


class Planner(WindowLayers):
    """The planning pass of the engine (see the module docstring)."""

    def _plan(self, inputs: torch.Tensor, starts: torch.Tensor, window: tuple[int, ...]) -> None:
        for node in self.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                if node is self.input:
                    self.cache[node] = inputs
                    self.dependent.add(node)
                    self._plan_input(node, inputs, starts, window)
                elif node.args:  # a parameter with a default value
                    self.cache[node] = node.args[0]
                else:
                    raise Unsupported("the model's forward takes more than one input")
                continue
            if node.op == "get_attr":
                attr: Any = self.gm
                for part in str(node.target).split("."):
                    attr = getattr(attr, part)
                self.cache[node] = attr
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.cache.__getitem__)
            if _is_inplace(node, self.modules):
                self._check_inplace(node)
                if args and isinstance(args[0], torch.Tensor):  # the cache keeps the old value
                    args = (args[0].clone(), *args[1:])
            self.cache[node] = self._call(node, args, kwargs)
            if not any(a in self.dependent for a in node.all_input_nodes):
                continue  # a constant: its value serves every perturbation
            self.dependent.add(node)
            self._plan_node(node)
        # Values each step reads for the last time are freed after it.
        last: dict[fx.Node, int] = {}
        for i, step in enumerate(self.steps):
            for arg in step.node.all_input_nodes:
                last[arg] = i
        for arg in self.output.all_input_nodes:
            last[arg] = len(self.steps)
            if arg in self.regions:
                # An output still held as a patch (a fully convolutional network, such as a
                # segmentation head) is materialised from the cache at the end of each forward.
                self._source(self._key(arg, (0,) * self.rank, (0,) * self.rank, 0.0))
                self._add_cost(arg, 0, cost.materialise(self.cache[arg]))
        for i, step in enumerate(self.steps):
            step.free = tuple(
                a for a in step.node.all_input_nodes if last.get(a) == i and a in self.dependent
            )

    def _check_inplace(self, node: fx.Node) -> None:
        """An in-place op must not change a value that a later node still reads."""
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node):
            return
        if target is self.input:
            raise Unsupported("the model changes its input in place")
        for user in target.users:
            if user is node or user not in self.position:
                continue
            meta = (user.op == "call_method" and user.target in _META_METHODS) or (
                user.op == "call_function"
                and user.target is getattr
                and user.args[1] in _META_ATTRIBUTES
            )
            if self.position[user] > self.position[node] and not meta:
                raise Unsupported(
                    f"{node.name} changes {target.name} in place while {user.name} still reads it"
                )

    def _plan_input(
        self, node: fx.Node, inputs: torch.Tensor, starts: torch.Tensor, window: tuple[int, ...]
    ) -> None:
        spatial = tuple(inputs.shape[2:])
        if window == spatial:
            self.steps.append(_Step(node, "input"))
            return
        self.regions[node] = Region(window, starts.long())
        source: tuple = ()
        if any(st != 0 for st in self.fill.stride()[2:]):  # the baseline varies over space
            source = ("fill", (0,) * self.rank, (0,) * self.rank, 0.0)
            self._source(source, self.fill.contiguous())
        self.steps.append(_Step(node, "input", source=source))

    def _plan_node(self, node: fx.Node) -> None:
        value = self.cache[node]
        if node in self.aliases:  # a folded BatchNorm
            (source,) = node.all_input_nodes
            if source in self.regions:
                self.regions[node] = self.regions[source]
            self.steps.append(_Step(node, "alias"))
            return
        folded = fold_batchnorm(node, self.modules, self.position)
        if folded is not None:
            user, self.folded[node] = folded
            self.aliases.add(user)
        patches = [a for a in node.all_input_nodes if a in self.regions]
        others = [a for a in node.all_input_nodes if a in self.dependent and a not in self.regions]
        numel = value[0].numel() if isinstance(value, torch.Tensor) and value.ndim else 1
        if patches and self._plan_meta(node):
            return
        if patches and not others and isinstance(value, torch.Tensor):
            layer = self._window_layer(node, patches)
            if layer is not None and self._plan_window(node, patches[0], layer):
                return
            if layer is None and self._plan_pointwise(node, patches, numel):
                return
        self._plan_generic(node, patches, numel)

    def _plan_meta(self, node: fx.Node) -> bool:
        meta = (node.op == "call_method" and node.target in _META_METHODS) or (
            node.op == "call_function"
            and node.target is getattr
            and len(node.args) == 2
            and node.args[1] in _META_ATTRIBUTES
        )
        if meta:
            self.steps.append(_Step(node, "meta"))
        return meta

    def _plan_generic(self, node: fx.Node, patches: list[fx.Node], numel: int) -> None:
        for arg in patches:
            self._source(self._key(arg, (0,) * self.rank, (0,) * self.rank, 0.0))
            self._add_cost(node, 0, cost.materialise(self.cache[arg]))
        agnostic = layout_agnostic(node, self.modules, self.folded)
        flops = cost.generic(node, self.modules, self.cache, numel)
        self._add_cost(node, flops, flops)
        self.steps.append(_Step(node, "generic", contiguous=not agnostic))

    # windows: convolution and pooling

    def _plan_window(self, node: fx.Node, source: fx.Node, layer: Window) -> bool:
        spatial_in, spatial_out = self._spatial(source), self._spatial(node)
        value = self.cache[node]
        if len(spatial_out) != self.rank or self.cache[source].ndim != value.ndim:
            return False
        sizes = (layer.kernel, layer.stride, layer.pad, layer.dilation)
        if any(len(v) != self.rank for v in sizes):
            return False
        lo, hi = _reach(self.regions[source], layer.kernel, layer.stride, layer.pad, layer.dilation)
        region = _finish(lo, hi, spatial_out, self.cap, self.full_area)
        if region is None:
            return False
        k, s = torch.tensor(layer.kernel), torch.tensor(layer.stride)
        d, p = torch.tensor(layer.dilation), torch.tensor(layer.pad)
        read_size = (torch.tensor(region.size) - 1) * s + (k - 1) * d + 1
        read_starts = region.starts * s - p
        pad_hi = (read_starts.amax(0) + read_size - torch.tensor(spatial_in)).clamp(min=0)
        fill = float("-inf") if layer.kind == "max" else 0.0
        key = self._key(source, tuple(layer.pad), tuple(pad_hi.tolist()), fill)
        self._source(key)
        step = _Step(node, "window", window=layer, read_starts=read_starts, source=key)
        step.read_size = tuple(int(v) for v in read_size)
        if layer.kind == "avg":
            step.factor = self._avg_factor(node, layer, spatial_in, spatial_out, region)
        self.regions[node] = region
        self.steps.append(step)
        full, incremental = cost.window(
            layer, value, self.cache[source], self.cache, region.size, step.read_size
        )
        self._add_cost(node, full, incremental)
        return True

    # element-wise layers

    def _plan_pointwise(self, node: fx.Node, patches: list[fx.Node], numel: int) -> bool:
        if node.op == "call_module":
            m = self.modules[node.target]
            if not _own_forward(m, _POINTWISE_MODULES):
                return False
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                m.training or m.running_mean is None
            ):
                return False  # batch statistics: a global op
            if isinstance(m, nn.Softmax | nn.LogSoftmax) and m.dim not in (1, -self.rank - 1):
                return False
        elif node.op == "call_function":
            target = node.target
            if target is torch.cat or target is torch.concat:
                return self._plan_cat(node, patches)
            if target not in _POINTWISE_FUNCTIONS:
                return False
        elif node.op == "call_method":
            if node.target not in _POINTWISE_METHODS:
                return False
        else:
            return False
        value = self.cache[node]
        spatial = self._spatial(patches[0])
        if (
            value.ndim != self.rank + 2
            or tuple(value.shape[2:]) != spatial
            or value.shape[0] != self.cache[patches[0]].shape[0]
        ):
            return False
        return self._plan_union(node, patches, node.all_input_nodes, spatial, numel)

    def _plan_cat(self, node: fx.Node, patches: list[fx.Node]) -> bool:
        b = _bind(node.args, node.kwargs, ("tensors", "dim"), {"dim": 0})
        value = self.cache[node]
        if b["dim"] not in (1, 1 - value.ndim) or value.ndim != self.rank + 2:
            return False
        spatial = tuple(value.shape[2:])
        return self._plan_union(node, patches, node.all_input_nodes, spatial, value[0].numel())

    def _plan_union(self, node, patches, inputs, spatial, numel) -> bool:
        """Element-wise over several inputs: every patch input is brought to their union."""
        for arg in inputs:
            if arg in self.regions:
                if self._spatial(arg) != spatial or self.cache[arg].ndim != self.rank + 2:
                    return False
            elif arg not in self.dependent:  # a constant must not vary over space, or be cropped
                c = self.cache[arg]
                if (
                    isinstance(c, torch.Tensor)
                    and c.ndim
                    and any(s != 1 for s in c.shape[-self.rank :])
                    and (
                        c.ndim != self.rank + 2 or c.shape[0] != 1 or tuple(c.shape[2:]) != spatial
                    )
                ):
                    return False
        regions = [self.regions[a] for a in patches]
        if all(r.covers(regions[0]) for r in regions[1:]):
            union = regions[0]
        else:
            lo = torch.stack([r.starts for r in regions]).amin(0)
            hi = torch.stack([r.starts + torch.tensor(r.size) - 1 for r in regions]).amax(0)
            union = _finish(lo, hi, spatial, self.cap, self.full_area)
            if union is None:
                return False
        reads: dict[fx.Node, tuple] = {}
        read_cost = 0
        for arg in inputs:
            region = self.regions.get(arg)
            spatial_const = arg not in self.dependent and (
                isinstance(self.cache[arg], torch.Tensor)
                and self.cache[arg].ndim == self.rank + 2
                and any(s != 1 for s in self.cache[arg].shape[2:])
            )
            if (region is not None and not region.covers(union)) or spatial_const:
                key = self._key(arg, (0,) * self.rank, (0,) * self.rank, 0.0)
                self._source(key)
                reads[arg] = key
                read_cost += cost.gather(self.cache[arg].shape[1], union.size)
        self.regions[node] = union
        self.steps.append(_Step(node, "pointwise", reads=reads))
        self._add_cost(node, *cost.pointwise(numel, spatial, union.size, read_cost))
        return True
