"""Running a chunk of perturbations through the plan: patches gathered from the padded caches
with the occluded patch written in, each step on its patches or on the materialised map, and
the model's output. A mixin of :class:`~xai_occlusion.incremental.engine.Engine`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from xai_core.torch.adapter import scores_of
from xai_occlusion.incremental.planning import _Step


class Chunk:
    """The perturbations of one forward: ``rows[b]`` (sample), ``windows[b]`` (position)."""

    def __init__(self, rows: torch.Tensor, windows: torch.Tensor) -> None:
        self.rows, self.windows, self.size = rows, windows, rows.shape[0]
        self.batch = torch.arange(self.size, device=rows.device)
        self.values: dict[fx.Node, Any] = {}
        self._starts: dict[int, torch.Tensor] = {}

    def starts(self, table: torch.Tensor) -> torch.Tensor:
        key = id(table)
        if key not in self._starts:
            self._starts[key] = table.index_select(0, self.windows)
        return self._starts[key]


class Runner:
    """The forwards of the engine on chunks of perturbations (see the module docstring)."""

    def forward(self, rows: torch.Tensor, windows: torch.Tensor) -> Any:
        """The model's output on ``inputs[rows[b]]`` occluded at window ``windows[b]``."""
        chunk = Chunk(rows, windows)
        values = chunk.values
        for step in self.steps:
            values[step.node] = getattr(self, "_run_" + step.kind)(step, chunk)
            for node in step.free:
                values.pop(node, None)
        return scores_of(
            fx.node.map_arg(self.output.args[0], lambda n: self._materialised(n, chunk))
        )

    def _arange(self, size: int) -> torch.Tensor:
        if size not in self._ranges:
            self._ranges[size] = torch.arange(size, device=self.device)
        return self._ranges[size]

    def _read(
        self,
        chunk: Chunk,
        node: fx.Node | None,
        starts: torch.Tensor,
        size: tuple[int, ...],
        key: tuple,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``node``'s occluded value on the box ``[starts, starts + size)`` of each perturbation,
        ``(B, C, *size)`` (channels-last in memory): the cache rows of the box, then the node's
        patch (if it has one) written in. ``rows``: the cache rows (default: the samples).

        The cache is stored channels-last as ``(N * positions, C)``; a line of the box along the
        last axis is one contiguous run of memory, so one ``index_select`` on an overlapping
        strided view copies whole lines. The patch goes in with one ``index_copy_`` of its pixels;
        pixels outside the box go to a spare row at the end.
        """
        pixels, lo, padded = self.sources[key]
        count, rank = chunk.size, self.rank
        channels = pixels.shape[1]
        rows = chunk.rows if rows is None else rows
        # First pixel of every line of the box, (B, *size[:-1]) -> flat.
        first = (rows * math.prod(padded)).view([count] + [1] * (rank - 1))
        first = first + starts[:, -1].view([count] + [1] * (rank - 1)) + lo[-1]
        stride = padded[-1]
        for axis in reversed(range(rank - 1)):
            view = [count] + [1] * (rank - 1)
            view[1 + axis] = size[axis]
            pos = starts[:, axis : axis + 1] + lo[axis] + self._arange(size[axis])
            first = first + (pos * stride).view(view)
            stride *= padded[axis]
        lines = pixels.as_strided(
            (pixels.shape[0] - size[-1] + 1, size[-1] * channels), (channels, 1)
        )
        cells = count * math.prod(size)
        region = self.regions.get(node) if node is not None else None
        out = torch.empty(
            cells + (region is not None), channels, dtype=pixels.dtype, device=self.device
        )
        torch.index_select(
            lines, 0, first.reshape(-1), out=out[:cells].view(-1, size[-1] * channels)
        )
        if region is not None:
            # Where each patch pixel lands in the box (a spare row when outside).
            offsets = chunk.starts(self._tables[node]) - starts  # (B, rank)
            dest = (chunk.batch * math.prod(size)).view([count] + [1] * rank)
            inside = None
            stride = 1
            for axis in reversed(range(rank)):
                view = [count] + [1] * rank
                view[1 + axis] = region.size[axis]
                pos = (offsets[:, axis : axis + 1] + self._arange(region.size[axis])).view(view)
                ok = (pos >= 0) & (pos < size[axis])
                inside = ok if inside is None else inside & ok
                dest = dest + pos * stride
                stride *= size[axis]
            dest = torch.where(inside, dest, cells).reshape(-1)
            patch = chunk.values[node].expand(count, -1, *region.size)
            patch = patch.movedim(1, -1).reshape(-1, channels)
            out.index_copy_(0, dest, patch)
        return out[:cells].view(count, *size, channels).movedim(-1, 1)

    def _materialised(self, node: fx.Node, chunk: Chunk) -> Any:
        """A node's value on the whole map, for an op that runs normally."""
        if node not in self.dependent:
            return self.cache[node]
        if node not in self.regions:
            return chunk.values[node]
        spatial = self._spatial(node)
        zero = (0,) * self.rank
        starts = torch.zeros(chunk.size, self.rank, dtype=torch.long, device=self.device)
        return self._read(chunk, node, starts, spatial, self._key(node, zero, zero, 0.0))

    def _run_input(self, step: _Step, chunk: Chunk) -> torch.Tensor:
        """The baseline inside each box: the input's patch."""
        if self.input not in self.regions:  # the box is the whole input
            return self.fill[chunk.rows].contiguous()
        region = self.regions[self.input]
        if step.source:  # a baseline image (blur): crop it
            starts = chunk.starts(self._tables[self.input])
            return self._read(chunk, None, starts, region.size, step.source)
        fill = self.fill[(slice(None), slice(None), *([slice(0, 1)] * self.rank))]
        return fill[chunk.rows].expand(-1, -1, *region.size)

    def _run_window(self, step: _Step, chunk: Chunk) -> torch.Tensor:
        layer = step.window
        source = step.node.args[0]
        starts = chunk.starts(step.read_starts)
        crop = self._read(chunk, source, starts, step.read_size, step.source)
        rank = self.rank
        if layer.kind == "conv":
            conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
            if step.node in self.folded:
                (weight, bias), groups = self.folded[step.node], layer.module.groups
            elif layer.module is not None:
                weight, bias, groups = layer.module.weight, layer.module.bias, layer.module.groups
            else:
                weight, bias = (
                    self.cache[a] if isinstance(a, fx.Node) else a
                    for a in (layer.weight, layer.bias)
                )
                groups = layer.groups
            return conv(crop, weight, bias, layer.stride, 0, layer.dilation, groups)
        if layer.kind == "max":
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
            return pool(crop, layer.kernel, layer.stride, 0, layer.dilation)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        out = pool(crop, layer.kernel, layer.stride, 0)
        if step.factor is not None:
            out = out * self._crop_map(step.factor, chunk, step.node)
        return out

    def _crop_map(self, grid: torch.Tensor, chunk: Chunk, node: fx.Node) -> torch.Tensor:
        """``(B, 1, *patch)``: a per-position map (on the node's grid) cut at each patch."""
        region = self.regions[node]
        offsets = chunk.starts(self._tables[node])
        index: list[torch.Tensor] = []
        for axis in range(self.rank):
            view = [chunk.size] + [1] * self.rank
            view[1 + axis] = region.size[axis]
            index.append((offsets[:, axis : axis + 1] + self._arange(region.size[axis])).view(view))
        return grid[tuple(index)].unsqueeze(1)

    def _run_pointwise(self, step: _Step, chunk: Chunk) -> Any:
        node, region = step.node, self.regions[step.node]

        def value(arg: fx.Node) -> Any:
            if arg in step.reads:
                starts = chunk.starts(self._tables[node])
                rows = None if arg in self.dependent else chunk.batch.new_zeros(chunk.size)
                return self._read(chunk, arg, starts, region.size, step.reads[arg], rows)
            if arg in self.dependent:
                return chunk.values[arg]
            return self.cache[arg]

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        return self._call(node, args, kwargs)

    def _run_meta(self, step: _Step, chunk: Chunk) -> Any:
        node = step.node
        source = node.args[0]
        shape = (chunk.size, *self.cache[source].shape[1:])
        if node.op == "call_function" and node.args[1] == "device":
            return self.device
        stand_in = torch.empty(shape, dtype=self.cache[source].dtype, device="meta")
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs),
            lambda n: stand_in if n is source else self._materialised(n, chunk),
        )
        return self._call(node, args, kwargs)

    def _run_alias(self, step: _Step, chunk: Chunk) -> Any:
        return chunk.values[step.node.args[0]]

    def _run_generic(self, step: _Step, chunk: Chunk) -> Any:
        """The op itself, on the whole batch, its patch inputs materialised."""
        node = step.node

        def value(arg: fx.Node) -> Any:
            out = self._materialised(arg, chunk)
            if step.contiguous and isinstance(out, torch.Tensor):
                out = out.contiguous()
            return out

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        if node in self.folded:
            m = self.modules[node.target]
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.rank - 1]
            weight, bias = self.folded[node]
            return conv(args[0], weight, bias, m.stride, m.padding, m.dilation, m.groups)
        return self._call(node, args, kwargs)
