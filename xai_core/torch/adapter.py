"""PyTorch ``nn.Module`` adapter: forward, gradients, layers, classifier weights, attention."""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import (
    AttentionGradientResult,
    InputSpec,
    LayerGradientResult,
    LayerRecord,
    ModelAdapter,
    NormParameters,
)
from xai_core.core.errors import (
    CapabilityError,
    LayerNotFoundError,
    LayerTypeError,
    ModelError,
    OptionError,
    UnknownLayerError,
    XaiError,
    did_you_mean,
)
from xai_core.core.tags import Capability
from xai_core.core.targets import Targets
from xai_core.torch.capture import (
    capture,
    capture_attention,
    edited_output,
    is_attention_module,
    preserved_state,
)
from xai_core.torch.ops import feature_layout, target_gradients, token_layout

log = logging.getLogger("xai_core")

LayerSpec = str | nn.Module | Sequence[str | nn.Module]

# Pooling modules are never a good default layer: their output is a resampled copy of the layer
# before them (VGG's AdaptiveAvgPool2d((7, 7)) would otherwise be chosen).
_POOLING = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def conv_input(module: nn.Module) -> tuple[int, int] | None:
    """``(input rank, input channels)`` a convolution takes, or ``None`` for other modules.

    Read from the module's weight, never its exact class, so subclasses (timm's same-padding
    ``Conv2dSame``, weight-standardised ``StdConv2d``, EfficientNet-Lite ports) and duck-typed
    convolutions (an ``in_channels`` and a ``(out, in, *kernel)`` weight) count alike.
    """
    channels = getattr(module, "in_channels", None)
    weight = getattr(module, "weight", None)
    if not isinstance(channels, int) or not isinstance(weight, torch.Tensor):
        return None
    if isinstance(weight, nn.parameter.UninitializedParameter) or not 3 <= weight.ndim <= 5:
        return None
    return weight.ndim, channels  # a (N, C, *spatial) input has as many axes as the kernel


# Layers after which a model's code depends on the batch size it was given (a size read
# before the layer, an earlier tensor concatenated later): their edited variants go through the
# whole model, inputs repeated (TorchAdapter.run_with_layer_output). Found once per model.
_repeat_inputs: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()

# Default layers found by probing, per model and input shape, so the probe runs once.
_default_layer_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def declared_extra_tokens(module: nn.Module) -> int | None:
    """How many leading non-patch tokens (class, distillation, registers) the model says it has
    (timm's ``num_prefix_tokens``), or ``None``: token layouts then decide from the count, which
    is ambiguous for tiny grids (1 class + 4 registers + 2x2 patches = 9 = 3x3 patches)."""
    for m in module.modules():
        count = getattr(m, "num_prefix_tokens", None)
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
    return None


def attention_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The outermost attention modules by name: an ``nn.MultiheadAttention`` inside a custom
    attention module is part of that module's attention, not a layer of its own."""
    found: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        inside = any(name.startswith(f"{outer}.") or not outer for outer in found)
        if is_attention_module(m) and not inside:
            found[name] = m
    return {name or "<model>": m for name, m in found.items()}


def windowed_attention(module: nn.Module) -> str | None:
    """The name of a module that splits the tokens into windows before attending (Swin's
    shifted windows: ``window_size`` and ``shift_size``; MaxViT's ``partition_size``), or
    ``None``. Decided by structure, before anything runs."""
    for name, m in module.named_modules():
        if (hasattr(m, "window_size") and hasattr(m, "shift_size")) or hasattr(
            m, "partition_size"
        ):
            return name or "<model>"
    return None


def differentiable(name: str, weights: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``weights``' values that the scores depend on in the autograd graph.

    ``nn.MultiheadAttention`` multiplies the values by its softmax output ``(N*heads, T, T)`` and
    only afterwards returns ``.view(N, heads, T, T)`` of it. That view is a new node *after* the
    bmm, so the scores do not depend on it and ``autograd.grad`` with respect to it fails ("not
    used in the graph"). Its ``_base``, the softmax output itself, holds the same numbers in the
    same order and is what the scores depend on: differentiate that and reshape. A custom module
    recording the tensor it multiplies by (the contract) is used as it is.
    """
    if weights.grad_fn is None:
        raise CapabilityError(
            f"The weights of attention layer {name!r} are outside the autograd graph (detached "
            f"or computed under no_grad); record the tensor that multiplies the values."
        )
    base = weights._base
    if (
        base is not None
        and base.grad_fn is not None
        and base.numel() == weights.numel()
        and weights.is_contiguous()
        and weights.storage_offset() == base.storage_offset()
    ):
        return base
    return weights


def reinitialise(module: nn.Module) -> None:
    """Draw the module's own parameters afresh: its ``reset_parameters`` where it has one (the
    initialisation PyTorch gives a new layer), else a normal draw with each tensor's own spread."""
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
            return
        for p in module.parameters(recurse=False):
            spread = float(p.float().std()) if p.numel() > 1 else 0.0
            p.normal_(0.0, spread if spread > 0 else 0.02)


def scores_of(output: Any) -> torch.Tensor:
    """The score tensor inside whatever a model's ``forward`` returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "out", "scores"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(
        f"The model returned {type(output).__name__}; xai-core needs a tensor of scores (or a "
        f"tuple whose first item, or a dict whose 'logits' entry, is one). Wrap the model in a "
        f"module whose forward() returns the scores."
    )


class TorchAdapter(ModelAdapter):
    """Adapts a PyTorch module. The module is never modified beyond one explanation's session."""

    kind = "torch"

    def __init__(self, module: nn.Module, *, input_spec: InputSpec | None = None) -> None:
        """:param input_spec: what the model takes (rank, channels), when its first
        convolution does not say it or says it wrongly; fields left ``None`` go unchecked
        (the dtype is always read from the parameters when not given).
        """
        if not isinstance(module, nn.Module):
            raise ModelError(f"TorchAdapter needs an nn.Module; got {type(module).__name__}.")
        if input_spec is not None and not isinstance(input_spec, InputSpec):
            raise OptionError(
                f"input_spec must be an xai_core.InputSpec, e.g. InputSpec(rank=4, channels=3); "
                f"got {type(input_spec).__name__}."
            )
        self.module = module
        tensors = [*module.parameters(), *module.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        caps = {
            Capability.FORWARD, Capability.GRADIENTS, Capability.LAYERS, Capability.LAYER_EDITS
        }
        if isinstance(module, torch.jit.ScriptModule):
            # Compiled TorchScript takes no Python hooks: no layer capture, gradients still flow.
            caps -= {Capability.LAYERS, Capability.LAYER_EDITS}
        modules = list(module.modules())
        if any(isinstance(m, nn.Linear) for m in modules):
            caps.add(Capability.CLASSIFIER_WEIGHTS)
        if any(is_attention_module(m) for m in modules):
            caps.add(Capability.ATTENTION)
        self.capabilities = frozenset(caps)
        floating = next((t.dtype for t in tensors if t.is_floating_point()), None)
        if input_spec is not None:
            self.input_spec = replace(input_spec, dtype=input_spec.dtype or floating)
        else:
            # The first convolution registered is, in nearly every model, the one reading the
            # input; when it is not, the user states the truth with `input_spec=`.
            first_conv = next((c for c in map(conv_input, modules) if c is not None), None)
            rank, channels = first_conv or (None, None)
            self.input_spec = InputSpec(rank, channels, dtype=floating)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return scores_of(self.module(inputs))

    @contextmanager
    def session(self) -> Iterator[TorchAdapter]:
        with preserved_state(self.module):
            yield self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "class": type(self.module).__name__}

    def cache_key(self) -> nn.Module:
        return self.module

    def torch_module(self) -> nn.Module:
        """The wrapped module, for engines that rewrite PyTorch code itself (the incremental
        occlusion engine traces it with ``torch.fx``); explainers use the capability protocols."""
        return self.module

    # -- layers (LayerAccess, LayerGradients) ---------------------------------------------------

    def named_layers(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.module.named_modules() if name}

    def resolve_layers(self, spec: LayerSpec) -> dict[str, nn.Module]:
        """Map a layer name, a module, or a list of them to ``{name: module}`` in given order."""
        items = [spec] if isinstance(spec, str | nn.Module) else spec
        if not isinstance(items, Sequence) or not items:
            raise LayerTypeError(
                f"A layer is a module name (str), an nn.Module, or a non-empty list of them; "
                f"got {type(spec).__name__}."
            )
        by_module = {m: name for name, m in self.module.named_modules()}
        layers = self.named_layers()
        resolved: dict[str, nn.Module] = {}
        for item in items:
            if isinstance(item, str):
                if item not in layers:
                    raise UnknownLayerError(
                        f"The model has no layer named {item!r}.{did_you_mean(item, layers)}",
                        "List them with dict(model.named_modules()).keys().",
                    )
                resolved[item] = layers[item]
            elif isinstance(item, nn.Module):
                if item not in by_module:
                    raise LayerNotFoundError(
                        f"The module {type(item).__name__} given as layer is not part of the model."
                    )
                resolved[by_module[item] or "<model>"] = item
            else:
                raise LayerTypeError(
                    f"A layer is a module name (str) or an nn.Module; got {type(item).__name__}."
                )
        return resolved

    def layer_names(self) -> list[str]:
        return list(self.named_layers())

    def layer_names_of(self, spec: Any) -> list[str]:
        """Names for a ``layer=`` value: a name, an ``nn.Module`` of the model, or a list."""
        return list(self.resolve_layers(spec))

    def extra_tokens(self) -> int | None:
        return declared_extra_tokens(self.module)

    def _modules(self, names: Sequence[str]) -> dict[str, nn.Module]:
        layers = self.named_layers()
        return {n: self.module if n == "<model>" else layers[n] for n in names} if names else {}

    def record_layers(
        self, inputs: torch.Tensor, layers: Sequence[str], *, inputs_of: Sequence[str] = ()
    ) -> LayerRecord:
        with (
            torch.no_grad(),
            capture(self._modules(layers), detach=True, strict=False) as seen,
            capture(self._modules(inputs_of), inputs=True) as fed,
        ):
            scores = self.forward(inputs)
        return LayerRecord(scores, list(seen.order), list(fed.order))

    def layer_gradients(
        self, inputs: torch.Tensor, layers: Sequence[str], targets: Targets
    ) -> LayerGradientResult:
        """Forward hooks (:func:`~xai_core.torch.capture.capture`) and autograd: the input
        requires grad so that activations stay in the graph although the parameters are frozen."""
        hooked = self._modules(layers)
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad(), capture(hooked) as seen:
            scores = self.forward(x)
        chosen = targets.resolve(scores).select(scores)  # (N, K)
        acts = {name: seen.last(name) for name in hooked}  # a layer used twice: its last call
        # An activation outside the graph does not depend on the input: no gradient at all.
        live = [name for name, a in acts.items() if a.requires_grad]

        def gradients() -> Iterator[dict[str, torch.Tensor | None]]:
            if not live:
                for _ in range(chosen.shape[1]):
                    yield dict.fromkeys(hooked)
                return
            for grads in target_gradients(chosen, [acts[n] for n in live]):
                found = dict(zip(live, grads, strict=True))
                yield {name: found.get(name) for name in hooked}

        return LayerGradientResult(
            scores=scores.detach(),
            activations={name: a.detach() for name, a in acts.items()},
            calls={name: len(seen.outputs[name]) for name in hooked},
            gradients=gradients(),
        )

    # -- editing a layer's output (LayerOutputEditing) ------------------------------------------

    def run_with_layer_output(
        self,
        inputs: torch.Tensor,
        layer: str,
        edit: Callable[[torch.Tensor], torch.Tensor],
        *,
        variants: int = 1,
    ) -> torch.Tensor:
        """A forward hook returns ``edit(A)``, so the ``N * variants`` edited copies go on
        through the rest of the model while the layers before it run once per sample. Code
        after the layer that depends on the batch size the model was given (a size read before
        the layer, an earlier tensor concatenated later) fails that way or returns the wrong
        number of rows; then, remembered per model and layer, the inputs are repeated instead
        and each copy's output edited: the whole model runs once per variant, as
        pytorch-grad-cam's Ablation-CAM always does. (With one sample an earlier tensor
        broadcast against the copies is that sample's own: the result is right.)"""
        module = self._modules([layer])[layer]
        repeat = _repeat_inputs.setdefault(self.module, set())
        if variants == 1 or layer not in repeat:
            try:
                scores = self._edited_forward(inputs, module, layer, edit)
            except XaiError:
                raise
            except Exception as error:  # the tail refused the new batch size: repeat below
                if variants == 1:
                    raise
                log.info("layer %r: edited copies through the whole model (%s)", layer, error)
            else:
                if variants == 1 or scores.shape[0] == inputs.shape[0] * variants:
                    return scores
            repeat.add(layer)

        def each_copy(output: torch.Tensor) -> torch.Tensor:  # (N * variants, ...): repeats
            return edit(output[::variants])

        return self._edited_forward(
            inputs.repeat_interleave(variants, 0), module, layer, each_copy
        )

    def _edited_forward(
        self, inputs: torch.Tensor, module: nn.Module, layer: str, edit: Callable
    ) -> torch.Tensor:
        with torch.no_grad(), edited_output(module, layer, edit):
            return self.forward(inputs)

    # -- classifier weights (ClassifierHead) ----------------------------------------------------

    def linear_layers(self) -> list[str]:
        return [name for name, m in self.named_layers().items() if isinstance(m, nn.Linear)]

    def linear_weights(self, layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        module = self._modules([layer])[layer]
        return module.weight, module.bias

    def norm_parameters(self, layer: str) -> NormParameters | None:
        """``nn.LayerNorm`` and its subclasses (timm's ``LayerNorm2d``), or anything with the
        same attributes: ``normalized_shape`` and a float ``eps``."""
        module = self.named_layers().get(layer)
        shape = getattr(module, "normalized_shape", None)
        eps = getattr(module, "eps", None)
        if shape is None or not isinstance(eps, float):
            return None
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return NormParameters(tuple(shape), weight, bias, eps)

    # -- attention (AttentionAccess, AttentionGradients) ----------------------------------------

    def attention_layers(self) -> list[str]:
        return list(attention_modules(self.module))

    def windowed_attention(self) -> str | None:
        return windowed_attention(self.module)

    def attention_weights(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        with torch.no_grad(), capture_attention(attention_modules(self.module)) as seen:
            scores = self.forward(inputs)
        return scores, list(seen.order)

    def attention_gradients(
        self, inputs: torch.Tensor, targets: Targets
    ) -> AttentionGradientResult:
        """The weights stay in the autograd graph: the parameters are frozen during an
        explanation, so the input is what requires grad."""
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad(), capture_attention(attention_modules(self.module)) as seen:
            scores = self.forward(x)
        calls = list(seen.order)
        chosen = targets.resolve(scores).select(scores)  # (N, K) target logits

        def gradients() -> Iterator[list[torch.Tensor | None]]:
            tensors = [differentiable(name, w) for name, w in calls]
            for grads in target_gradients(chosen, tensors):
                yield [
                    None if g is None else g.reshape(w.shape)
                    for (_, w), g in zip(calls, grads, strict=True)
                ]

        detached = [(name, w.detach()) for name, w in calls]
        return AttentionGradientResult(scores.detach(), detached, gradients())

    # -- randomisation (ParameterRandomization) -------------------------------------------------

    def _parameter_owners(self) -> dict[str, nn.Module]:
        return {
            name or "<model>": m
            for name, m in self.module.named_modules()
            if next(m.parameters(recurse=False), None) is not None
        }

    def parameter_layers(self, inputs: torch.Tensor) -> list[str]:
        """Modules that own parameters, in reverse order of their first call: the output side
        first. Read from one forward pass (hooks removed afterwards), not from the order the
        modules were declared in, which need not be the order they run in."""
        owners = self._parameter_owners()
        with torch.no_grad(), self.session(), capture(owners, inputs=True) as seen:
            self.forward(inputs)
        ran = dict.fromkeys(name for name, _ in seen.order)  # first call wins, order kept
        return list(reversed(ran))

    def randomizable_copy(self) -> TorchAdapter:
        return TorchAdapter(copy.deepcopy(self.module), input_spec=self.input_spec)

    def randomize_layers(self, layers: Sequence[str]) -> None:
        owners = self._parameter_owners()
        for name in layers:
            reinitialise(owners[name])

    def default_layer(self, inputs: torch.Tensor) -> str:
        """The layer gradient-weighted maps (Grad-CAM) explain when the user names none.

        A transformer: the module whose output the last self-attention reads as its query, i.e.
        the tokens entering it (class/register tokens are dropped later); after the last
        attention only the class token reaches the head, and the last spatial output would be
        the patch embedding. Otherwise (CNNs, windowed and hierarchical transformers): the last
        module, in execution order, whose output is still a feature map of the input
        (:func:`xai_core.torch.ops.feature_layout`: channels-first, channels-last or a token grid).
        Never a module inside an attention module (projections, q/k norms, softmax or dropout
        of the weights, relative position biases), never an output that does not change with
        the input. Found by running two different samples with forward hooks (then removed),
        cached per model and input shape, and logged so users see which layer was chosen.
        """
        key = tuple(inputs.shape[1:])
        cached = _default_layer_cache.setdefault(self.module, {})
        if key not in cached:
            layers = self.named_layers()
            candidates = {name: m for name, m in layers.items() if not isinstance(m, _POOLING)}
            attention = {name: m for name, m in layers.items() if is_attention_module(m)}
            # Two samples that differ: an output equal for both does not depend on the input.
            probe = inputs[:1].detach()
            probe = torch.cat([probe, probe.flip(-1) + 1])
            with (
                torch.no_grad(),
                self.session(),
                capture(candidates, detach=True, strict=False) as seen,
                capture(attention, inputs=True) as queries,
            ):
                self.forward(probe)
            outputs = [
                (name, out)
                for name, out in seen.order
                if out.ndim >= 3
                and out.shape[0] == 2
                and not any(name.startswith(a + ".") for a in attention)
                and not torch.equal(out[0], out[1])
            ]
            extra = declared_extra_tokens(self.module)
            chosen, attention_name = self._tokens_entering(
                outputs, queries.arguments, inputs, extra
            )
            if chosen is None:
                # Hooks fire when a module *finishes*: the last feature map is the deepest.
                spatial = [
                    name for name, out in outputs if self._is_feature_map(out, inputs, extra)
                ]
                if not spatial:
                    raise LayerNotFoundError(
                        "No layer of this model outputs a feature map of the input (channels "
                        "first or last, or tokens tiling it) that depends on the input; pass "
                        "the layer to explain explicitly (option `layer`)."
                    )
                why = "the last feature map of the input"
                chosen = spatial[-1]
            else:
                why = f"the tokens entering the last self-attention, {attention_name!r}"
            cached[key] = chosen
            log.info("xai-core chose layer %r (%s)", chosen, why)
        return cached[key]

    @staticmethod
    def _is_feature_map(output: torch.Tensor, inputs: torch.Tensor, extra: int | None) -> bool:
        if output.ndim not in (inputs.ndim, 3):
            return False
        try:
            layout = feature_layout(output.shape, inputs.shape[2:], extra)
        except CapabilityError:
            return False
        return math.prod(layout.grid) > 1

    @staticmethod
    def _tokens_entering(
        outputs: list[tuple[str, torch.Tensor]],
        calls: list[tuple[str, tuple[torch.Tensor, ...]]],
        inputs: torch.Tensor,
        extra: int | None = None,
    ) -> tuple[str | None, str | None]:
        """The module whose recorded output is the query of the last *self*-attention call
        (query equal to key, or a single input: a transformer encoder block), and its name; or
        ``(None, None)``: no self-attention, a query computed by no module (a functional norm),
        or tokens that do not tile the input as patches (windows). Cross-attention (learned
        object queries reading image tokens, as in DETR) is not a patch grid and is skipped."""
        for attention, args in reversed(calls):
            # One argument: a module that projects its input to queries, keys and values itself
            # (timm's Attention(x)); several: nn.MultiheadAttention(query, key, value).
            self_attention = len(args) == 1 or (
                len(args) > 1 and args[0].shape == args[1].shape and torch.equal(*args[:2])
            )
            if not self_attention:
                continue
            query = args[0]
            if query.ndim != 3 or query.shape[0] != 2:  # batch-first tokens of the probe
                return None, None
            try:
                _, grid = token_layout(query.shape[1], inputs.shape[2:], extra)
            except CapabilityError:
                return None, None
            if math.prod(grid) < 2:  # one cell (LeViT's last stage on a small input): no map
                return None, None
            for name, out in reversed(outputs):
                if out.shape == query.shape and torch.equal(out, query):
                    return name, attention
            return None, None
        return None, None
