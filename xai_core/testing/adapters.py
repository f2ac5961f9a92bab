"""The conformance checks for model adapters (:class:`~xai_core.core.adapters.ModelAdapter`).

Pass an adapter, or a function making one (each check then gets a fresh adapter). The checks:
the protocol (``kind``, ``capabilities`` holding ``forward``, ``device``, ``input_spec``);
``forward`` returns finite floating-point ``(N, outputs...)`` scores on the adapter's device, the
same for a sample alone as within a batch; ``describe()`` is JSON-able and agrees with the
attributes; ``session()`` yields an adapter and restores the model (PyTorch modules: training
flags, ``requires_grad``, ``.grad``, parameters, buffers, hooks) after a normal exit and after an
exception, which it lets through; each declared capability has its protocol's methods
(``LayerAccess`` for ``Capability.LAYERS``, ...). Then one check per declared capability
(:data:`CAPABILITY_CHECKS`): ``gradients`` reach the input for an adapter declaring
``Capability.GRADIENTS``; ``layer_edits``: edits of the default layer's output reach the scores,
copies per sample in order, for ``Capability.LAYER_EDITS``. ``pickle``: an adapter that
claims it (defines ``__getstate__`` / ``__reduce__``, or ``picklable=True``) survives a pickle
round trip with the same scores.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import (
    InputSpec,
    ModelAdapter,
    describe_gaps,
    protocol_gaps,
    torch_module_of,
)
from xai_core.core.errors import ConformanceError
from xai_core.core.tags import Capability
from xai_core.testing.runner import Check, Report, parametrize_entries, run_checks
from xai_core.testing.state import (
    watched_state,
)

# The check of each capability an adapter may declare: a declared capability is honoured. The
# capability protocols (layer access, classifier head, attention) add their checks here, as
# `Capability: "check name"` with a `_Case.check_<name>` method; a capability without a check
# here is not verified yet.
CAPABILITY_CHECKS: dict[Capability, str] = {
    Capability.GRADIENTS: "gradients",
    Capability.LAYER_EDITS: "layer_edits",
}

CHECKS = (
    "protocol",
    "forward",
    "batch_consistency",
    "describe",
    "session_restores",
    "session_restores_on_error",
    *CAPABILITY_CHECKS.values(),
    "pickle",
)

AdapterSource = ModelAdapter | Callable[[], ModelAdapter]


def adapter_checks(
    adapter: AdapterSource,
    *,
    inputs: torch.Tensor | None = None,
    picklable: bool | None = None,
    atol: float = 1e-5,
) -> list[Check]:
    """The conformance checks for ``adapter`` (or a function making one).

    :param inputs: a small batch the model takes (default: 3 random images shaped by the
        adapter's ``input_spec``, 16 pixels where it says nothing).
    :param picklable: whether the adapter must pickle; default: when its class defines
        ``__getstate__`` or ``__reduce__``.
    """
    case = _Case(adapter, inputs, picklable, atol)
    return [
        Check(name, getattr(case, f"check_{name}"), case.subject, case.skip_reason(name))
        for name in CHECKS
    ]


def check_adapter(
    adapter: AdapterSource, *, expected_failures: Mapping[str, str] | None = None, **kwargs: Any
) -> Report:
    """Run every check of :func:`adapter_checks` (same keywords); return the :class:`Report` or
    raise one :class:`ConformanceError` listing each failure (see :func:`check_explainer`)."""
    checks = adapter_checks(adapter, **kwargs)
    return run_checks(checks, checks[0].subject, expected_failures)


def parametrize_adapters(
    adapters: list[AdapterSource | tuple[AdapterSource, dict[str, Any]]],
    *,
    expected_failures: Mapping[str, str] | Any = None,
) -> Any:
    """:func:`~xai_core.testing.parametrize_with_checks` for adapters (or functions making
    them), ids ``AdapterClass-check``."""
    return parametrize_entries(adapter_checks, adapters, expected_failures)


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _claims_pickle(cls: type) -> bool:
    return any(
        name in vars(klass)
        for klass in cls.__mro__
        if klass not in (object, ModelAdapter)
        for name in ("__getstate__", "__reduce__", "__reduce_ex__")
    )


class _Case:
    def __init__(
        self,
        source: AdapterSource,
        inputs: torch.Tensor | None,
        picklable: bool | None,
        atol: float,
    ) -> None:
        self.source, self.atol = source, atol
        first = self.make()
        self.subject = type(first).__qualname__
        self.capabilities = frozenset(getattr(first, "capabilities", frozenset()))
        self.picklable = _claims_pickle(type(first)) if picklable is None else picklable
        self.has_module = torch_module_of(first) is not None
        if inputs is None:
            spec = getattr(first, "input_spec", None)
            spec = spec if isinstance(spec, InputSpec) else InputSpec()
            rank, channels = spec.rank or 4, spec.channels or 3
            spatial = spec.spatial or (None,) * (rank - 2)
            size = [s or 16 for s in spatial]
            generator = torch.Generator().manual_seed(2)
            inputs = torch.randn(3, channels, *size, generator=generator)
            inputs = inputs.to(spec.dtype or torch.float32)
        self.inputs = inputs

    def make(self) -> ModelAdapter:
        if isinstance(self.source, ModelAdapter) or not callable(self.source):
            return self.source  # type: ignore[return-value]
        return self.source()

    def skip_reason(self, name: str) -> str | None:
        for capability, check in CAPABILITY_CHECKS.items():
            if name == check and capability not in self.capabilities:
                return f"the adapter does not declare {capability.value}"
        if name == "pickle" and not self.picklable:
            return "the adapter does not claim to pickle (no __getstate__; pass picklable=True)"
        if name.startswith("session_restores") and not self.has_module:
            return "the adapter exposes no PyTorch module whose state the kit could read"
        return None

    def _x(self, adapter: ModelAdapter) -> torch.Tensor:
        return self.inputs.to(adapter.device)

    def _scores(self, adapter: ModelAdapter, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), adapter.session() as inside:
            return inside.forward(x)

    # -- the checks -------------------------------------------------------------------------------

    def check_protocol(self) -> None:
        adapter = self.make()
        if not isinstance(adapter, ModelAdapter):
            _fail(f"{type(adapter).__name__} is not a xai_core.ModelAdapter subclass.")
        if not isinstance(adapter.kind, str) or not adapter.kind:
            _fail(f"kind must be a short non-empty name; got {adapter.kind!r}.")
        caps = adapter.capabilities
        if not isinstance(caps, frozenset) or not all(isinstance(c, Capability) for c in caps):
            _fail(f"capabilities must be a frozenset of xai_core Capability; got {caps!r}.")
        if Capability.FORWARD not in caps:
            _fail("capabilities must include Capability.FORWARD: every adapter runs the model.")
        if not isinstance(adapter.device, torch.device):
            _fail(f"device must be a torch.device; got {adapter.device!r}.")
        if not isinstance(adapter.input_spec, InputSpec):
            _fail(f"input_spec must be an xai_core.InputSpec; got {adapter.input_spec!r}.")
        # A declared capability promises its protocol's methods (LayerAccess for LAYERS, ...):
        # the methods that need it call them, so a gap would be an AttributeError mid-call.
        if gaps := protocol_gaps(adapter):
            _fail(describe_gaps(adapter, gaps) + ".")

    def check_forward(self) -> None:
        adapter = self.make()
        x = self._x(adapter)
        out = self._scores(adapter, x)
        if not isinstance(out, torch.Tensor):
            _fail(f"forward returned a {type(out).__name__}, not a torch tensor.")
        if out.ndim < 2 or out.shape[0] != x.shape[0]:
            _fail(
                f"forward returned shape {tuple(out.shape)} for {x.shape[0]} inputs; scores are "
                f"(N, outputs) (or (N, classes, *grid) for segmentation)."
            )
        if not out.is_floating_point():
            _fail(f"forward returned {out.dtype} scores; scores are floating point.")
        if out.device != adapter.device:
            _fail(f"forward returned scores on {out.device}; the adapter's device is "
                  f"{adapter.device}.")  # fmt: skip
        if not bool(torch.isfinite(out).all()):
            _fail("forward returned NaN or infinite scores on ordinary inputs.")

    def check_batch_consistency(self) -> None:
        adapter = self.make()
        x = self._x(adapter)
        whole = self._scores(adapter, x)
        for i in range(x.shape[0]):
            alone = self._scores(adapter, x[i : i + 1])[0]
            scale = max(float(whole[i].abs().max()), 1.0)
            if not torch.allclose(alone, whole[i], atol=self.atol * scale, rtol=1e-4):
                diff = float((alone - whole[i]).abs().max())
                _fail(f"sample {i}'s scores alone differ from within the batch by {diff:.3g}.")

    def check_describe(self) -> None:
        adapter = self.make()
        description = adapter.describe()
        try:
            json.dumps(description)
        except (TypeError, ValueError) as exc:
            _fail(f"describe() is not JSON-able ({exc}): {description!r}")
        want = {
            "kind": adapter.kind,
            "device": str(adapter.device),
            "capabilities": sorted(c.value for c in adapter.capabilities),
        }
        for key, value in want.items():
            if description.get(key) != value:
                got = description.get(key)
                _fail(f"describe()[{key!r}] is {got!r}; the adapter has {value!r}.")

    def _meddle(self, module: nn.Module, adapter: ModelAdapter) -> None:
        # What code inside a session may do: switch modes, unfreeze parameters, leave gradients,
        # and (a forward pass in training mode) move the normalisation layers' statistics.
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)
            p.grad = torch.ones_like(p)
        with torch.no_grad():
            adapter.forward(self._x(adapter))

    def _restores(self, fail_inside: bool) -> None:
        adapter = self.make()
        module = torch_module_of(adapter)
        with watched_state(module) as changed:
            try:
                with adapter.session() as inside:
                    if not isinstance(inside, ModelAdapter):
                        _fail(f"session() yielded a {type(inside).__name__}, not an adapter.")
                    inside.forward(self._x(adapter))
                    self._meddle(module, inside)
                    if fail_inside:
                        raise _Inside
            except _Inside:
                pass
            else:
                if fail_inside:
                    _fail("session() swallowed an exception raised inside it.")
            if problem := changed():
                when = "an exception inside" if fail_inside else "a"
                _fail(f"after {when} session, the model's {problem}.")

    def check_session_restores(self) -> None:
        self._restores(fail_inside=False)

    def check_session_restores_on_error(self) -> None:
        self._restores(fail_inside=True)

    def check_gradients(self) -> None:
        adapter = self.make()
        x = self._x(adapter).clone().requires_grad_(True)
        with torch.enable_grad(), adapter.session() as inside:
            out = inside.forward(x)
            if not out.requires_grad:
                _fail(
                    "the adapter declares gradients, but its scores carry no autograd graph "
                    "back to the input (detached, or computed outside torch)."
                )
            (grad,) = torch.autograd.grad(out[:, 0].sum(), x, allow_unused=True)
        if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
            _fail("the adapter declares gradients, but no finite, non-zero gradient reaches the "
                  "input.")  # fmt: skip

    def check_layer_edits(self) -> None:
        """At the default layer (or the first recordable one): an edit that changes nothing
        gives the forward pass's scores, and two unchanged copies per sample give each sample's
        scores twice, in sample order; an edit zeroing the output changes them."""
        adapter = self.make()
        x = self._x(adapter)
        with torch.no_grad(), adapter.session() as inside:
            layer = inside.default_layer(x) if Capability.LAYERS in adapter.capabilities else None
            if layer is None:
                _fail("the adapter declares layer-edits but not layers: no layer to edit.")
            plain = inside.forward(x)
            same = inside.run_with_layer_output(x, layer, lambda a: a)
            twice = inside.run_with_layer_output(
                x, layer, lambda a: a.repeat_interleave(2, 0), variants=2
            )
            zeroed = inside.run_with_layer_output(x, layer, torch.zeros_like)
        for what, got, want in (
            ("an edit that changes nothing", same, plain),
            ("two unchanged copies per sample", twice, plain.repeat_interleave(2, 0)),
        ):
            if got.shape != want.shape or not torch.allclose(got, want, atol=self.atol, rtol=1e-4):
                _fail(f"run_with_layer_output at layer {layer!r} with {what} does not give the "
                      f"forward pass's scores (shapes {tuple(got.shape)}, {tuple(want.shape)}).")
        if torch.allclose(zeroed, plain, atol=self.atol, rtol=1e-4):
            _fail(f"run_with_layer_output ignored the edit: zeroing layer {layer!r}'s output "
                  f"left the scores unchanged.")

    def check_pickle(self) -> None:
        adapter = self.make()
        try:
            copy = pickle.loads(pickle.dumps(adapter))
        except Exception as exc:
            _fail(f"the adapter claims to pickle but does not: {type(exc).__name__}: {exc}")
        x = self._x(adapter)
        a, b = self._scores(adapter, x), self._scores(copy, x.to(copy.device))
        if a.shape != b.shape or not torch.allclose(a, b.to(a.device), atol=self.atol, rtol=1e-4):
            _fail("the unpickled adapter's scores differ from the original's.")
        if copy.describe() != adapter.describe():
            _fail(f"describe() changed in a pickle round trip: {copy.describe()!r}.")


class _Inside(Exception):
    """Raised inside a session by the kit, to see the session restore and let it through."""
