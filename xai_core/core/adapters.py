"""What every model adapter offers: a forward pass on torch tensors, a list of capabilities,
and for each capability beyond the forward pass the protocol that backs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from xai_core.core.errors import AdapterProtocolError, LayerNotFoundError
from xai_core.core.tags import Capability
from xai_core.core.targets import Targets


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, as far as the adapter can tell (``None``: unknown)."""

    rank: int | None = None  # 4 for (N, C, H, W), 5 for (N, C, D, H, W)
    channels: int | None = None
    spatial: tuple[int | None, ...] | None = None  # fixed spatial size (ONNX files), if any
    dtype: torch.dtype | None = None  # floating dtype the model computes in (PyTorch modules)


class ModelAdapter(ABC):
    """A model seen through the capabilities explainers need.

    Subclasses set ``kind`` (a short name), ``capabilities``, ``device`` and ``input_spec``.
    ``forward`` maps an ``(N, C, *spatial)`` tensor on ``device`` to ``(N, outputs)`` scores (or
    ``(N, classes, *spatial)`` for segmentation models) on the same device; it is called inside
    :meth:`session`, which an explanation enters exactly once.
    """

    kind: str = "model"
    capabilities: frozenset[Capability] = frozenset({Capability.FORWARD})
    device: torch.device = torch.device("cpu")
    input_spec: InputSpec = InputSpec()

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scores (logits) for a batch; gradients flow when the adapter has that capability."""

    @contextmanager
    def session(self) -> Iterator[ModelAdapter]:
        """Set the model up for an explanation and restore it afterwards (default: nothing)."""
        yield self

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description, reported in every :class:`~xai_core.Explanation`."""
        return {
            "kind": self.kind,
            "device": str(self.device),
            "capabilities": sorted(c.value for c in self.capabilities),
        }

    def cache_key(self) -> object:
        """A weak-referenceable object, the same for every adapter over the same model, on which
        methods cache what they found by probing it (default: the adapter itself)."""
        return self

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs)


# -- capabilities as protocols ----------------------------------------------------------------
#
# A capability an adapter declares in ``capabilities`` is a promise of methods: each protocol
# below is what explainers call for one capability (or a pair). Layers are named by ``str``;
# every tensor is a torch tensor on ``adapter.device``; nothing requires an ``nn.Module``, so an
# adapter over another framework (an ONNX graph: a captured layer is an extra graph output, a
# gradient a backward pass of its own) implements them as well as ``TorchAdapter`` does.
# Every method runs inside the adapter's ``session()``, entered by the caller.


@dataclass
class LayerRecord:
    """What one forward pass recorded (:meth:`LayerAccess.record_layers`), all detached.

    ``order`` lists ``(layer, output)`` for every call of a recorded layer, in the order the
    calls finished (a layer used twice appears twice); ``inputs`` the first input of each call
    of the layers asked for with ``inputs_of``, in the same way.
    """

    scores: torch.Tensor
    order: list[tuple[str, torch.Tensor]]
    inputs: list[tuple[str, torch.Tensor]]

    def last(self, layer: str) -> torch.Tensor:
        """The output of ``layer``'s last call (the one nearest the scores)."""
        return _last(self.order, layer, "output")

    def last_input(self, layer: str) -> torch.Tensor:
        """The input of ``layer``'s last call."""
        return _last(self.inputs, layer, "input")

    def calls(self, layer: str) -> int:
        return sum(1 for name, _ in self.order if name == layer)


def _last(calls: list[tuple[str, torch.Tensor]], layer: str, what: str) -> torch.Tensor:
    for name, tensor in reversed(calls):
        if name == layer:
            return tensor
    raise LayerNotFoundError(
        f"Layer {layer!r} was never called during the forward pass, so it has no {what} to "
        f"explain. Choose a layer that the model's forward() uses."
    )


@runtime_checkable
class LayerAccess(Protocol):
    """``Capability.LAYERS``: named internal layers whose outputs can be recorded."""

    def layer_names(self) -> list[str]:
        """Every layer a method may record, in a stable order (definition order)."""
        ...

    def layer_names_of(self, spec: Any) -> list[str]:
        """The layer names meant by a user's ``layer=`` / ``layers=`` value, in given order: a
        name or a non-empty list of names (an adapter may accept more, e.g. ``nn.Module`` s).
        Raises ``UnknownLayerError`` / ``LayerTypeError`` for anything else."""
        ...

    def default_layer(self, inputs: torch.Tensor) -> str:
        """The layer gradient-weighted maps explain when the user names none: the last feature
        map of the input, or the tokens entering a transformer's last self-attention."""
        ...

    def extra_tokens(self) -> int | None:
        """How many leading non-patch tokens (class, register) the model declares, or ``None``
        (unknown: token layouts then decide from the token count)."""
        ...

    def record_layers(
        self, inputs: torch.Tensor, layers: Sequence[str], *, inputs_of: Sequence[str] = ()
    ) -> LayerRecord:
        """Scores of one forward pass without gradients, with the outputs of ``layers`` (those
        whose output is not a tensor are skipped) and the inputs of ``inputs_of``."""
        ...


@dataclass
class LayerGradientResult:
    """What :meth:`LayerGradients.layer_gradients` returns.

    ``scores`` ``(N, outputs)`` and ``activations[layer]`` (the output of its last call) are
    detached; ``calls[layer]`` counts its calls. ``gradients`` yields, for each resolved target
    ``k`` in turn, ``{layer: d scores_k / d activation}`` (``None`` where the target's score
    does not depend on the layer): lazily, so that a caller reduces each target's gradients
    before the next backward pass runs and no ``(K, *activation)`` tensor is ever built.
    """

    scores: torch.Tensor
    activations: dict[str, torch.Tensor]
    calls: dict[str, int]
    gradients: Iterator[dict[str, torch.Tensor | None]]


@runtime_checkable
class LayerGradients(Protocol):
    """``Capability.LAYERS`` with ``Capability.GRADIENTS``: gradients of target scores with
    respect to layers' outputs (Grad-CAM)."""

    def layer_gradients(
        self, inputs: torch.Tensor, layers: Sequence[str], targets: Targets
    ) -> LayerGradientResult:
        """One forward pass recording ``layers``; ``targets.resolve(scores).select(scores)``
        gives the ``(N, K)`` target scores (the adapter calls it, so out-of-range targets raise
        there); then one backward pass per target."""
        ...


@dataclass(frozen=True)
class NormParameters:
    """A layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


@runtime_checkable
class ClassifierHead(Protocol):
    """``Capability.CLASSIFIER_WEIGHTS``: linear layers whose weights can be read (CAM), and
    the layer norms that may sit between global pooling and the head."""

    def linear_layers(self) -> list[str]:
        """Names of the layers computing ``y = x W^T + b`` over their input's last axis."""
        ...

    def linear_weights(self, layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W (outputs, inputs), b (outputs,) or None)`` of a linear layer."""
        ...

    def norm_parameters(self, layer: str) -> NormParameters | None:
        """The parameters of ``layer`` if it is a layer norm over its input's last axis."""
        ...


@runtime_checkable
class AttentionAccess(Protocol):
    """``Capability.ATTENTION``: the softmax weights of self-attention layers."""

    def attention_layers(self) -> list[str]:
        """The attention layers by name (outermost ones: a layer inside another is part of it)."""
        ...

    def windowed_attention(self) -> str | None:
        """A layer that splits the tokens into windows before attending (Swin, MaxViT), found
        from the structure before anything runs, or ``None``."""
        ...

    def extra_tokens(self) -> int | None:
        """As :meth:`LayerAccess.extra_tokens`."""
        ...

    def attention_weights(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """Scores ``(N, outputs)`` and every attention call ``(layer, weights)`` of one forward
        pass without gradients, in call order; weights ``(N, heads, T, T)``, rows summing to 1."""
        ...


@dataclass
class AttentionGradientResult:
    """What :meth:`AttentionGradients.attention_gradients` returns: detached ``scores`` and
    ``calls`` as in :meth:`AttentionAccess.attention_weights`; ``gradients`` yields, for each
    resolved target in turn, one ``d score / d weights`` per call, shaped like its weights
    (``None`` where the score does not depend on them)."""

    scores: torch.Tensor
    calls: list[tuple[str, torch.Tensor]]
    gradients: Iterator[list[torch.Tensor | None]]


@runtime_checkable
class AttentionGradients(Protocol):
    """``Capability.ATTENTION`` with ``Capability.GRADIENTS``: gradients of target scores with
    respect to the attention weights (gradient-weighted rollout)."""

    def attention_gradients(
        self, inputs: torch.Tensor, targets: Targets
    ) -> AttentionGradientResult:
        """One forward pass recording the attention weights, the targets resolved on its
        scores by the adapter, then one backward pass per target."""
        ...


@runtime_checkable
class ParameterRandomization(Protocol):
    """What the randomisation sanity check needs (``Need.TORCH_MODEL``): copies of the model
    whose parameterised layers are re-initialised one after another."""

    def parameter_layers(self, inputs: torch.Tensor) -> list[str]:
        """Layers that own parameters, in reverse order of their first call on ``inputs``."""
        ...

    def randomizable_copy(self) -> ParameterRandomization:
        """An independent adapter over a copy of the model (the user's model is never touched)."""
        ...

    def randomize_layers(self, layers: Sequence[str]) -> None:
        """Re-draw these layers' parameters in place (on a copy), from torch's global random
        generator, which the caller seeds."""
        ...


LayerEdit = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class LayerOutputEditing(Protocol):
    """``Capability.LAYER_EDITS``: forward passes in which a layer's output is replaced by an
    edited copy (Ablation-CAM ablates channels, Recipro-CAM keeps one position at a time)."""

    def run_with_layer_output(
        self, inputs: torch.Tensor, layer: str, edit: LayerEdit, *, variants: int = 1
    ) -> torch.Tensor:
        """Scores ``(N * variants, outputs)`` of a forward pass without gradients in which the
        output ``A`` ``(N, ...)`` of ``layer`` is replaced by ``edit(A)``, ``(N * variants,
        ...)`` in the layer's own layout: row ``i * variants + v`` is sample ``i``'s ``v``-th
        edited copy (``A.repeat_interleave(variants, 0)`` edited row by row). ``edit`` is called
        once per forward pass, on the layer's output for the ``N`` samples. The part of the model
        before the layer should run once per sample, not once per variant, where the model
        allows it. A layer called more than once per forward pass is refused
        (``LayerTypeError``)."""
        ...


# Which protocol backs which capabilities: an adapter declaring all of a row's capabilities
# must implement its protocol.
CAPABILITY_PROTOCOLS: tuple[tuple[frozenset[Capability], type], ...] = (
    (frozenset({Capability.LAYERS}), LayerAccess),
    (frozenset({Capability.LAYERS, Capability.GRADIENTS}), LayerGradients),
    (frozenset({Capability.CLASSIFIER_WEIGHTS}), ClassifierHead),
    (frozenset({Capability.ATTENTION}), AttentionAccess),
    (frozenset({Capability.ATTENTION, Capability.GRADIENTS}), AttentionGradients),
    (frozenset({Capability.LAYER_EDITS}), LayerOutputEditing),
)


def protocol_methods(protocol: type) -> list[str]:
    """The public methods a protocol declares."""
    return sorted(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))


def missing_methods(adapter: Any, protocol: type) -> list[str]:
    return [n for n in protocol_methods(protocol) if not callable(getattr(adapter, n, None))]


def protocol_gaps(
    adapter: ModelAdapter, required: Iterable[Capability] | None = None
) -> dict[str, list[str]]:
    """``{protocol: missing methods}`` for each protocol the adapter's declared capabilities
    (only those in ``required``, if given) promise and it does not implement."""
    declared = frozenset(adapter.capabilities)
    wanted = declared if required is None else declared & frozenset(required)
    gaps = {}
    for capabilities, protocol in CAPABILITY_PROTOCOLS:
        if capabilities <= wanted:
            missing = missing_methods(adapter, protocol)
            if missing:
                gaps[protocol.__name__] = missing
    return gaps


def describe_gaps(adapter: ModelAdapter, gaps: dict[str, list[str]]) -> str:
    parts = "; ".join(f"{p} (missing {', '.join(m)})" for p, m in gaps.items())
    return (
        f"the {type(adapter).__name__} adapter declares capabilities it does not implement: "
        f"{parts} (docs/writing-a-plugin.md, 'Writing a model adapter')"
    )


def check_protocols(adapter: ModelAdapter, required: Iterable[Capability] | None = None) -> None:
    """Raise :class:`AdapterProtocolError` if a declared capability (among ``required``) is not
    backed by its protocol's methods."""
    gaps = protocol_gaps(adapter, required)
    if gaps:
        raise AdapterProtocolError(describe_gaps(adapter, gaps) + ".", gaps)


def torch_module_of(adapter: object) -> torch.nn.Module | None:
    """The PyTorch module behind an adapter that wraps one (its ``torch_module()``), else None.

    Explainers use the capability protocols; this is for the few places that look at PyTorch
    state itself: the inference-tensor check, timing a backward pass, the conformance kits'
    state snapshots, and engines that rewrite torch code (incremental occlusion).
    """
    accessor = getattr(adapter, "torch_module", None)
    module = accessor() if callable(accessor) else None
    return module if isinstance(module, torch.nn.Module) else None

