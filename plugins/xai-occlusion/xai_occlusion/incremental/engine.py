"""The engine: the state that planning builds and running reads (the cache of the unoccluded
forward, the regions, the steps, the padded gather sources, the cost), and :class:`Drops`, the
engine as the score-drop function of adaptive refinement. Planning is in
:mod:`~xai_occlusion.incremental.planning`, running in :mod:`~xai_occlusion.incremental.running`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from xai_occlusion.incremental.operators import _is_inplace
from xai_occlusion.incremental.options import Unsupported
from xai_occlusion.incremental.planning import Planner, _Step
from xai_occlusion.incremental.regions import FULL_AREA, Region
from xai_occlusion.incremental.running import Runner


class Engine(Planner, Runner):
    """Occlusion forwards computed incrementally on a traced CNN (:mod:`xai_occlusion.incremental`).

    ``fill`` is the baseline (broadcastable to ``inputs``), ``starts`` the ``(positions, rank)``
    first corner of every window, ``window`` the box size. ``cap`` (approximate mode) limits each
    patch to that share of its feature map per axis.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        inputs: torch.Tensor,
        fill: torch.Tensor,
        starts: torch.Tensor,
        window: tuple[int, ...],
        cap: float | None = None,
        full_area: float = FULL_AREA,
    ) -> None:
        self.gm, self.device = gm, inputs.device
        self.rank, self.cap, self.full_area = inputs.ndim - 2, cap, full_area
        self.modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        self.output = next(n for n in nodes if n.op == "output")
        # Nodes the output depends on, and in-place ops (their effect is not in the data flow).
        needed = {self.output} | {n for n in nodes if _is_inplace(n, self.modules)}
        for node in reversed(nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        self.nodes = [n for n in nodes if n in needed]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        every_placeholder = [n for n in nodes if n.op == "placeholder"]
        if not every_placeholder or every_placeholder[0] not in placeholders:
            raise Unsupported("the traced graph does not use its first input")
        self.input = every_placeholder[0]

        self.cache: dict[fx.Node, Any] = {}  # values on the unoccluded batch
        self.dependent: set[fx.Node] = set()  # nodes whose value depends on the input
        self.regions: dict[fx.Node, Region] = {}  # nodes held as patches
        # Convolutions followed by an eval BatchNorm run with the normalisation folded into
        # their weights; the BatchNorm then passes its input through.
        self.folded: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self.aliases: set[fx.Node] = set()
        self.sources: dict[tuple, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = {}
        self.steps: list[_Step] = []
        self.cost = {"full": 0.0, "incremental": 0.0}
        self._tables: dict[fx.Node, torch.Tensor] = {}
        self._ranges: dict[int, torch.Tensor] = {}
        self.fill = fill.expand_as(inputs)
        with torch.no_grad():
            self._plan(inputs, starts.cpu(), window)
        self.scores_value = self._output_value()
        for step in self.steps:
            if step.read_starts is not None:
                step.read_starts = step.read_starts.to(self.device)
        self._tables = {n: r.starts.to(self.device) for n, r in self.regions.items()}
        self._free_plan()

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _spatial(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.cache[node].shape[2:])

    def _add_cost(self, node: fx.Node, full: float, incremental: float) -> None:
        self.cost["full"] += full
        self.cost["incremental"] += incremental

    # sources: padded caches laid out for gathering

    def _key(self, node: fx.Node, lo: tuple, hi: tuple, value: float) -> tuple:
        return (node, tuple(int(v) for v in lo), tuple(int(v) for v in hi), value)

    def _source(self, key: tuple, tensor: torch.Tensor | None = None) -> None:
        """``(N * positions, C)`` (channels-last) copy of a cached value, padded by ``lo`` and
        ``hi`` per axis with ``value``."""
        if key in self.sources:
            return
        node, lo, hi, value = key
        if tensor is None:
            tensor = self.cache[node]
        pads: list[int] = []
        for a in reversed(range(self.rank)):
            pads += [lo[a], hi[a]]
        padded = F.pad(tensor, pads, value=value) if any(pads) else tensor
        shape = tuple(padded.shape[2:])
        pixels = padded.movedim(1, -1).reshape(-1, padded.shape[1]).contiguous()
        self.sources[key] = (pixels, lo, shape)

    def _free_plan(self) -> None:
        """Keep only what the forwards read: constants and the gather sources."""
        for node in list(self.cache):
            if node in self.dependent:
                value = self.cache[node]
                if isinstance(value, torch.Tensor):
                    # Shapes are all later steps need of a dependent value.
                    self.cache[node] = torch.empty(
                        (0, *value.shape[1:]), dtype=value.dtype, device="meta"
                    )

    def drops(self, reference: torch.Tensor, resolved: Any, windows: int) -> Drops:
        """``drops(index)``: the target score drops of flat perturbation indices
        ``sample * windows + window`` (for :func:`adaptive_deltas`)."""
        return Drops(self, reference, resolved, windows)

    def _output_value(self) -> Any:
        return fx.node.map_arg(self.output.args[0], lambda n: self.cache[n])


@dataclass
class Drops:
    """Score drops of perturbations, evaluated by an :class:`Engine` (see :meth:`Engine.drops`)."""

    engine: Engine
    reference: torch.Tensor  # (N, K) unoccluded target scores
    resolved: Any  # xai_core.core.targets.ResolvedTargets
    windows: int

    @property
    def device(self) -> torch.device:
        return self.reference.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.reference.dtype, torch.float32)

    @property
    def count(self) -> int:
        return self.reference.shape[1]

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        rows = index // self.windows
        outputs = self.engine.forward(rows, index % self.windows)
        return self.reference[rows] - self.resolved.select(outputs, rows)
