"""Incremental inference for occlusion on CNNs (exact), with an approximate mode.

An occluded input differs from the original only inside its box. Through a convolution or a
pooling layer the difference spreads only as far as the layer's receptive field reaches; through
an element-wise layer it does not spread at all. So the engine runs the unoccluded forward once,
keeps every layer's activation (the *cache*), and for each window computes only the *patch* of
each layer the box can reach, reading the rest from the cache. The ideas are those of Krypton
(Nakandala, Kumar, Papakonstantinou, SIGMOD 2019); the implementation is ours.

How it works:

* The model is captured with :func:`torch.fx.symbolic_trace` (cached per model). The first
  forward (on the ``N`` unoccluded samples) interprets the graph and stores every node's value.
* A *region* per node says where its patch lies for each window position: one patch size per
  spatial axis (the same for every window, so windows batch) and one start per window and axis,
  found from the layer's kernel, stride, padding and dilation. Regions are computed once per
  call, on the host, from the shapes of the first forward.
* For a chunk of ``B`` perturbations (sample ``rows[b]``, window ``windows[b]``), a node in the
  incremental region holds a ``(B, C, *patch)`` tensor. A convolution or pooling gathers its
  input's receptive field of its output patch from the (padded) cache of the samples in one
  batched index, overlays the input's patch, and runs the layer with no padding on that crop.
  Element-wise layers run on the patch; additions and concatenations first bring their inputs to
  the union of their patches.
* A node the engine cannot run on patches (flatten, linear, global pooling, attention, upsampling,
  any other op), and a patch that covers most of its feature map, ends the incremental region: its
  inputs are *materialised* (cache rows with the patch written in) and it runs normally, batched,
  as does everything after it.
* Exactness: every value outside a patch equals the cached one by construction, so results match
  plain occlusion to float tolerance (a convolution computed on a crop may round differently).

Approximate mode (opt-in) adds two approximations (Krypton's):

* *projective-field thresholding*: a patch never grows beyond ``threshold`` times its feature
  map per axis; it is cut around the centre of the region the box reaches, and the rim is read
  from the cache as if unchanged. Patches stay small down to the global pooling.
* *adaptive refinement*: windows are first evaluated on a coarse grid (every ``coarse``-th
  position per axis), the drops are interpolated (multilinear) onto the full grid, and only the
  share ``refine`` of the remaining windows with the highest interpolated drop are evaluated.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from xai_core.core.errors import OptionError, did_you_mean
from xai_core.core.targets import check_finite_scores
from xai_core.torch.adapter import scores_of

log = logging.getLogger("xai_core")

MODES = ("auto", "exact", "approximate")
# Projective-field threshold, coarse grid step (1: every window, no refinement) and the share of
# the other windows refined. Refinement is off by default: interpolated drops keep the high
# regions but scramble the ranks of the low ones (see docs/methods/occlusion.md).
APPROXIMATION = {"threshold": 0.3, "coarse": 1, "refine": 0.25}
# A patch covering at least this share of its feature map is computed on the whole map: the
# gather-and-overlay costs more than the positions it saves.
FULL_AREA = 0.7
# "auto" uses the engine only for convolutional models on inputs of at least this many spatial
# positions (below, the engine's per-op overhead outweighs what it saves, and the model is not
# even traced), and only when its estimated cost is at most AUTO_COST of plain occlusion.
AUTO_MIN_POSITIONS = 1024
AUTO_COST = 0.8


class Unsupported(Exception):
    """The model cannot run incrementally at all; plain occlusion is used instead."""


# -- options ---------------------------------------------------------------------------------


def incremental_mode(value: object) -> str:
    """The ``incremental`` option as ``"auto"``, ``"exact"``, ``"approximate"`` or ``"off"``."""
    if value is False:
        return "off"
    if value is True:
        return "exact"
    if isinstance(value, str) and value in MODES:
        return value
    hint = did_you_mean(value, MODES) if isinstance(value, str) else ""
    raise OptionError(
        f"incremental must be one of {MODES} or False (plain occlusion); got {value!r}.{hint}"
    )


def approximation_settings(value: object) -> dict[str, float]:
    """The ``approximation`` option, validated, with defaults filled in."""
    if value is None:
        return dict(APPROXIMATION)
    if not isinstance(value, Mapping):
        raise OptionError(
            f"approximation must be a dict with keys {tuple(APPROXIMATION)}; got {value!r}."
        )
    settings = dict(APPROXIMATION)
    for key, v in value.items():
        if key not in APPROXIMATION:
            raise OptionError(
                f"approximation has no setting {key!r}; it has {tuple(APPROXIMATION)}."
                f"{did_you_mean(str(key), APPROXIMATION)}"
            )
        real = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if key == "threshold" and not (real and 0 < v <= 1):
            raise OptionError(f"approximation['threshold'] must be in (0, 1]; got {v!r}.")
        if key == "coarse" and not (isinstance(v, numbers.Integral) and real and v >= 1):
            raise OptionError(f"approximation['coarse'] must be an int >= 1; got {v!r}.")
        if key == "refine" and not (real and 0 <= v <= 1):
            raise OptionError(f"approximation['refine'] must be in [0, 1]; got {v!r}.")
        settings[key] = v
    return settings


# -- graph capture ---------------------------------------------------------------------------

# Traces per model, with the identity of every submodule at tracing time: a model whose modules
# were replaced since is traced again.
_traces: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], fx.GraphModule]] = (
    weakref.WeakKeyDictionary()
)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(module)``, cached per model; :class:`Unsupported` if it fails."""
    key = tuple(id(m) for m in module.modules())
    cached = _traces.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    if isinstance(module, torch.jit.ScriptModule):
        raise Unsupported("a TorchScript module has no Python graph to trace")
    try:
        gm = fx.symbolic_trace(module)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise Unsupported(
            f"torch.fx cannot trace the model ({type(error).__name__}: {first})"
        ) from error
    _traces[module] = (key, gm)
    return gm


# -- which operations run on patches ---------------------------------------------------------

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FN = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE = {
    nn.AdaptiveAvgPool1d: "avg",
    nn.AdaptiveAvgPool2d: "avg",
    nn.AdaptiveAvgPool3d: "avg",
    nn.AdaptiveMaxPool1d: "max",
    nn.AdaptiveMaxPool2d: "max",
    nn.AdaptiveMaxPool3d: "max",
}
_MAXPOOL_FN = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVGPOOL_FN = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_FN = {
    F.adaptive_avg_pool1d: "avg",
    F.adaptive_avg_pool2d: "avg",
    F.adaptive_avg_pool3d: "avg",
    F.adaptive_max_pool1d: "max",
    F.adaptive_max_pool2d: "max",
    F.adaptive_max_pool3d: "max",
}
_ADAPTIVE_FN_RANK = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
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


# -- regions ---------------------------------------------------------------------------------


@dataclass
class Region:
    """Where a node's patch lies: ``size`` per axis, ``starts[p]`` for window position ``p``."""

    size: tuple[int, ...]
    starts: torch.Tensor  # (positions, rank) long, on the host while planning

    def covers(self, other: Region) -> bool:
        return self.size == other.size and torch.equal(self.starts, other.starts)


def _finish(
    lo: torch.Tensor,
    hi: torch.Tensor,
    spatial: tuple[int, ...],
    cap: float | None,
    full_area: float,
) -> Region | None:
    """The region holding the inclusive bounds ``[lo, hi]`` (clipped to the map) of every window;
    ``None`` when it is (nearly) the whole map. ``cap`` limits its size (approximate mode)."""
    shape = torch.tensor(spatial)
    lo = torch.minimum(lo.clamp(min=0), shape - 1)
    hi = torch.minimum(hi, shape - 1)
    hi = torch.maximum(hi, lo)
    size = (hi - lo + 1).amax(0)
    start = torch.minimum(lo, shape - size)
    if cap is not None:
        limit = torch.tensor([max(1, math.ceil(cap * s)) for s in spatial])
        over = size > limit
        if bool(over.any()):
            size = torch.minimum(size, limit)
            centred = ((lo + hi + 1) // 2 - size // 2).clamp(min=0)
            centred = torch.minimum(centred, shape - size)
            start = torch.where(over, centred, torch.minimum(lo, shape - size))
    if math.prod(size.tolist()) >= full_area * math.prod(spatial):
        return None
    return Region(tuple(int(s) for s in size), start)


def _reach(
    region: Region,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pad: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive bounds of the outputs of a sliding-window layer that read the input region.

    Output ``j`` reads inputs ``j*s - pad + i*d`` for ``i < k``.
    """
    k, s = torch.tensor(kernel), torch.tensor(stride)
    p, d = torch.tensor(pad), torch.tensor(dilation)
    size = torch.tensor(region.size)
    lo = -torch.div(-(region.starts + p - (k - 1) * d), s, rounding_mode="floor")
    hi = torch.div(region.starts + size - 1 + p, s, rounding_mode="floor")
    return lo, hi


@dataclass
class Window:
    """A sliding-window layer (convolution or pooling) as the engine runs it on patches."""

    kind: str  # "conv", "max", "avg"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]  # before each axis
    dilation: tuple[int, ...]
    module: nn.Module | None = None  # convolution module
    weight: Any = None  # functional convolution (node or tensor)
    bias: Any = None
    groups: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


# -- the engine ------------------------------------------------------------------------------


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


class Engine:
    """Occlusion forwards computed incrementally on a traced CNN (see the module docstring).

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

    # -- planning --------------------------------------------------------------------------

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
                self._add_cost(arg, 0, 3 * self.cache[arg][0].numel())
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
        self._fold(node)
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

    def _fold(self, node: fx.Node) -> None:
        """Fold an eval BatchNorm that is a convolution's only user into its weights."""
        if node.op != "call_module" or len(node.users) != 1:
            return
        conv = self.modules[node.target]
        (user,) = node.users
        if (
            type(conv) not in _CONV
            or conv.padding_mode != "zeros"
            or user.op != "call_module"
            or user.args != (node,)
            or user.kwargs
            or user not in self.position
        ):
            return
        norm = self.modules[user.target]
        if (
            not _own_forward(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            or norm.training
            or norm.running_mean is None
            or norm.running_mean.numel() != conv.out_channels
        ):
            return
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        weight = conv.weight * scale.view(-1, *[1] * (conv.weight.ndim - 1))
        self.folded[node] = (weight.to(conv.weight.dtype), shift.to(conv.weight.dtype))
        self.aliases.add(user)

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
            materialise = self.cache[arg][0].numel()
            self._add_cost(node, 0, 3 * materialise)
        flops = numel
        agnostic = node in self.folded or (node.op == "call_function" and node.target is torch.cat)
        if node.op == "call_module":
            m = self.modules[node.target]
            agnostic = agnostic or isinstance(
                m, (*_CONV, *_MAXPOOL, *_AVGPOOL, *_ADAPTIVE, *_POINTWISE_MODULES)
            )
        elif node.op == "call_function":
            agnostic = agnostic or node.target in _POINTWISE_FUNCTIONS
            agnostic = agnostic or node.target in _ADAPTIVE_FN or node.target in _MAXPOOL_FN
        elif node.op == "call_method":
            agnostic = node.target in _POINTWISE_METHODS
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, nn.Linear):
                flops = 2 * module.in_features * numel
            elif isinstance(module, tuple(_CONV)):
                flops = 2 * numel * module.weight[0].numel()
        if node.op == "call_function" and node.target in _CONV_FN:
            weight = self.cache[node.args[1]] if isinstance(node.args[1], fx.Node) else None
            flops = 2 * numel * (weight[0].numel() if weight is not None else 1)
        self._add_cost(node, flops, flops)
        self.steps.append(_Step(node, "generic", contiguous=not agnostic))

    # windows: convolution and pooling

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
        per_output = 2 * layer.module.weight[0].numel() if layer.module is not None else 1
        if layer.kind == "conv" and layer.module is None:
            weight = layer.weight
            weight = self.cache[weight] if isinstance(weight, fx.Node) else weight
            per_output = 2 * weight[0].numel()
        if layer.kind != "conv":
            per_output = math.prod(layer.kernel)
        channels_out, channels_in = value.shape[1], self.cache[source].shape[1]
        patch = channels_out * math.prod(region.size)
        self._add_cost(
            node,
            per_output * value[0].numel(),
            per_output * patch + 4 * channels_in * math.prod(step.read_size),
        )
        return True

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
                read_cost += 4 * self.cache[arg].shape[1] * math.prod(union.size)
        self.regions[node] = union
        self.steps.append(_Step(node, "pointwise", reads=reads))
        patch = numel // math.prod(spatial) * math.prod(union.size)
        self._add_cost(node, numel, patch + read_cost)
        return True

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

    # -- running ---------------------------------------------------------------------------

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


# -- entry point for the plugin --------------------------------------------------------------


def prepare(
    model: Any,
    inputs: torch.Tensor,
    fill: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    window: tuple[int, ...],
    mode: str,
    settings: Mapping[str, float],
    scores: torch.Tensor,
) -> tuple[Engine | None, dict[str, Any]]:
    """An :class:`Engine` for this call, or ``None`` (plain occlusion) with the reason.

    ``mode`` is ``"off"``, ``"auto"``, ``"exact"`` or ``"approximate"``. In ``"auto"`` the engine
    is used when the model traces, reproduces its scores and is estimated to save at least
    ``1 - AUTO_COST`` of the work; a model that does not qualify is explained by plain occlusion
    and the reason logged. Asked for explicitly, a fallback is a warning.
    """
    info: dict[str, Any] = {"mode": "off"}
    if mode == "off":
        return None, info
    # Occlusion resolves its targets (which refuses these) first; the engine never plans on NaN.
    check_finite_scores(scores)
    module = getattr(model, "module", None)

    def fallback(reason: str) -> tuple[None, dict[str, Any]]:
        message = f"occlusion: incremental inference is off ({reason}); using plain occlusion."
        if mode == "auto":
            log.info(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        return None, {"mode": "off", "reason": reason}

    if not isinstance(module, nn.Module) or getattr(model, "kind", None) != "torch":
        return fallback("not a PyTorch module")
    if mode == "auto":
        if math.prod(inputs.shape[2:]) < AUTO_MIN_POSITIONS:
            reason = f"inputs of fewer than {AUTO_MIN_POSITIONS} positions"
            log.debug("occlusion: plain (%s)", reason)
            return None, {"mode": "off", "reason": reason}
        if not any(isinstance(m, tuple(_CONV)) for m in module.modules()):
            log.debug("occlusion: plain (no convolution in the model)")
            return None, {"mode": "off", "reason": "no convolution in the model"}
    # First corner of every window, (positions, rank), in the row-major order of window indices.
    starts = torch.stack(
        torch.meshgrid(*[box.long().argmax(1) for box in boxes], indexing="ij"), -1
    ).reshape(-1, len(boxes))
    approximate = mode == "approximate"
    try:
        gm = trace(module)
        engine = Engine(
            gm,
            inputs,
            fill,
            starts,
            window,
            cap=float(settings["threshold"]) if approximate else None,
        )
    except Unsupported as error:
        return fallback(str(error))
    except Exception as error:  # an op the planner's reference pass could not run
        return fallback(f"the traced graph could not be planned ({type(error).__name__}: {error})")
    try:
        traced = scores_of(engine.scores_value)
    except Exception as error:
        return fallback(f"the traced graph's output has no scores ({error})")
    if traced.shape != scores.shape or not torch.allclose(
        traced, scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max().clamp(min=1))
    ):
        return fallback("the traced graph does not reproduce the model's scores")
    cost = engine.cost["incremental"] / max(engine.cost["full"], 1.0)
    if mode == "auto" and (cost > AUTO_COST or not engine.regions):
        log.info("occlusion: plain (incremental inference would save little: cost %.2f)", cost)
        return None, {"mode": "off", "reason": f"estimated cost {cost:.2f} of plain occlusion"}
    return engine, {
        "mode": "approximate" if approximate else "exact",
        "estimated_cost": round(cost, 4),
        **({"approximation": dict(settings)} if approximate else {}),
    }


def interpolation(positions: int, coarse: Sequence[int], dtype, device) -> torch.Tensor:
    """``(coarse, positions)`` linear interpolation from the coarse indices to every index."""
    matrix = torch.zeros(len(coarse), positions, dtype=dtype)
    for j, (a, b) in enumerate(itertools.pairwise(coarse)):
        for u in range(a, b + 1):
            t = (u - a) / (b - a)
            matrix[j, u] = 1 - t
            matrix[j + 1, u] = t
    if len(coarse) == 1:
        matrix[0, :] = 1
    return matrix.to(device)


def adaptive_deltas(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    samples: int,
    positions: tuple[int, ...],
    chunk: int,
    settings: Mapping[str, float],
    progress: Callable[[int, int | None, str], object] | None = None,
) -> tuple[torch.Tensor, int]:
    """Score drops ``(samples * windows, K)`` of every window from a coarse grid of windows
    (every ``settings["coarse"]``-th position per axis, and the last), interpolated
    (multilinear), then evaluated where the interpolated drop is highest (the share
    ``settings["refine"]`` of the other windows, per sample). Returns the drops and how many
    perturbations were evaluated. ``evaluate(index)`` gives the ``(len(index), K)`` drops of the
    flat perturbation indices ``sample * windows + window``.
    """
    coarse, refine = int(settings["coarse"]), float(settings["refine"])
    device, dtype, count = evaluate.device, evaluate.dtype, evaluate.count
    windows = math.prod(positions)
    grids = [sorted(set(range(0, p, coarse)) | {p - 1}) for p in positions]
    axes = [torch.tensor(g, device=device) for g in grids]
    mesh = torch.meshgrid(*axes, indexing="ij")
    flat = torch.zeros_like(mesh[0])
    for axis, m in enumerate(mesh):
        flat = flat * positions[axis] + m
    coarse_windows = flat.reshape(-1)
    is_coarse = torch.zeros(windows, dtype=torch.bool, device=device)
    is_coarse[coarse_windows] = True
    rest = int((~is_coarse).sum())
    extra = min(rest, math.ceil(refine * rest))
    total = samples * (coarse_windows.numel() + extra)
    done = 0
    deltas = torch.empty(samples * windows, count, dtype=dtype, device=device)

    def run(index: torch.Tensor) -> None:
        nonlocal done
        for start in range(0, index.numel(), chunk):
            part = index[start : start + chunk]
            deltas[part] = evaluate(part)
            done += part.numel()
            if progress is not None:
                progress(done, total, "perturbed inputs")

    sample = torch.arange(samples, device=device)[:, None]
    run((sample * windows + coarse_windows).reshape(-1))
    grid = deltas.view(samples, windows, count)[:, coarse_windows]  # (N, coarse, K)
    grid = grid.movedim(-1, 1).reshape(samples, count, *(len(g) for g in grids))
    for axis, g in enumerate(grids):
        matrix = interpolation(positions[axis], g, dtype, device)
        dim = 2 + axis
        grid = (grid.movedim(dim, -1) @ matrix).movedim(-1, dim)
    dense = grid.reshape(samples, count, windows)  # interpolated, (N, K, windows)
    deltas.view(samples, windows, count)[:] = torch.where(
        is_coarse[None, :, None], deltas.view(samples, windows, count), dense.movedim(1, -1)
    )
    if extra:
        low = dense.amin(-1, keepdim=True)
        span = (dense.amax(-1, keepdim=True) - low).clamp(min=torch.finfo(dtype).tiny)
        priority = ((dense - low) / span).amax(1)  # (N, windows): highest over the targets
        priority = priority.masked_fill(is_coarse, -1.0)
        chosen = priority.topk(extra, dim=1).indices  # (N, extra)
        run((sample * windows + chosen).reshape(-1))
    return deltas, total
