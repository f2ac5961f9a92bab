"""PyTorch ``nn.Module`` adapter: forward, gradients, layers, classifier weights, attention."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from xai_core.adapters.base import InputSpec, ModelAdapter
from xai_core.capture import capture, preserved_state
from xai_core.errors import (
    LayerNotFoundError,
    LayerTypeError,
    ModelError,
    UnknownLayerError,
)
from xai_core.tags import Capability

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
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Default layers found by probing, per model and input shape, so the probe runs once.
_default_layer_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def is_attention_module(module: nn.Module) -> bool:
    """True for ``nn.MultiheadAttention`` and for custom modules that opt in to the attention
    contract by setting ``xai_attention = True`` (see docs/methods/attention.md)."""
    return isinstance(module, nn.MultiheadAttention) or bool(
        getattr(module, "xai_attention", False)
    )


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

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ModelError(f"TorchAdapter needs an nn.Module; got {type(module).__name__}.")
        self.module = module
        tensors = [*module.parameters(), *module.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        caps = {Capability.FORWARD, Capability.GRADIENTS, Capability.LAYERS}
        if isinstance(module, torch.jit.ScriptModule):
            # Compiled TorchScript takes no Python hooks: no layer capture, gradients still flow.
            caps.discard(Capability.LAYERS)
        modules = list(module.modules())
        if any(isinstance(m, nn.Linear) for m in modules):
            caps.add(Capability.CLASSIFIER_WEIGHTS)
        if any(is_attention_module(m) for m in modules):
            caps.add(Capability.ATTENTION)
        self.capabilities = frozenset(caps)
        first_conv = next((m for m in modules if isinstance(m, _CONV)), None)
        floating = next((t.dtype for t in tensors if t.is_floating_point()), None)
        if first_conv is not None:
            rank = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(first_conv)]
            self.input_spec = InputSpec(rank, first_conv.in_channels, dtype=floating)
        else:
            self.input_spec = InputSpec(dtype=floating)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return scores_of(self.module(inputs))

    @contextmanager
    def session(self) -> Iterator[TorchAdapter]:
        with preserved_state(self.module):
            yield self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "class": type(self.module).__name__}

    # -- layers --------------------------------------------------------------------------------

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
                    from xai_core.errors import did_you_mean

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

    def default_layer(self, inputs: torch.Tensor) -> str:
        """The layer gradient-weighted maps (Grad-CAM) explain when the user names none.

        A CNN: the last module, in execution order, whose output is still a spatial feature map.
        A transformer: the module whose output the last self-attention reads as its query, i.e.
        the patch tokens entering it; after the last attention only the class token reaches the
        head, and the last spatial output would be the patch embedding. Found by running one
        sample with forward hooks (then removed), cached per model and input shape, and logged
        so users see which layer was chosen.
        """
        key = tuple(inputs.shape[1:])
        cached = _default_layer_cache.setdefault(self.module, {})
        if key not in cached:
            layers = self.named_layers()
            candidates = {name: m for name, m in layers.items() if not isinstance(m, _POOLING)}
            attention = {name: m for name, m in layers.items() if is_attention_module(m)}
            with (
                torch.no_grad(),
                self.session(),
                capture(candidates, detach=True, strict=False) as seen,
                capture(attention, inputs=True) as queries,
            ):
                self.forward(inputs[:1])
            chosen, attention = self._tokens_entering(seen.order, queries.arguments, inputs)
            if chosen is None:
                # Hooks fire when a module *finishes*: the last spatial output is the deepest.
                spatial = [
                    name
                    for name, out in seen.order
                    if out.ndim == inputs.ndim and out.shape[2:].numel() > 1
                ]
                if not spatial:
                    raise LayerNotFoundError(
                        "No layer of this model outputs a spatial feature map for this input; "
                        "pass the layer to explain explicitly (option `layer`)."
                    )
                why = "the last with a spatial output"
                chosen = spatial[-1]
            else:
                why = f"the tokens entering the last self-attention, {attention!r}"
            cached[key] = chosen
            log.info("xai-core chose layer %r (%s)", chosen, why)
        return cached[key]

    @staticmethod
    def _tokens_entering(
        outputs: list[tuple[str, torch.Tensor]],
        calls: list[tuple[str, tuple[torch.Tensor, ...]]],
        inputs: torch.Tensor,
    ) -> tuple[str | None, str | None]:
        """The module whose recorded output is the query of the last *self*-attention call
        (query equal to key, or a single input: a transformer encoder block), and its name; or
        ``(None, None)``: no self-attention, a query computed by no module (a functional norm),
        or tokens that do not tile the input as patches. Cross-attention (learned object
        queries reading image tokens, as in DETR) is not a patch grid and is skipped."""
        from xai_core.errors import CapabilityError
        from xai_core.ops import token_layout

        for attention, args in reversed(calls):
            # One argument: a module that projects its input to queries, keys and values itself
            # (timm's Attention(x)); several: nn.MultiheadAttention(query, key, value).
            self_attention = len(args) == 1 or (
                len(args) > 1 and args[0].shape == args[1].shape and torch.equal(*args[:2])
            )
            if not self_attention:
                continue
            query = args[0]
            if query.ndim != 3 or query.shape[0] != 1:  # batch-first tokens of the probe
                return None, None
            try:
                token_layout(query.shape[1], inputs.shape[2:], None)
            except CapabilityError:
                return None, None
            for name, out in reversed(outputs):
                if name == attention or name.startswith(attention + "."):
                    continue
                if out.shape == query.shape and torch.equal(out, query):
                    return name, attention
            return None, None
        return None, None
