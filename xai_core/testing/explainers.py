"""The conformance checks for explainers, chosen by the explainer's tags.

Every explainer gets the common checks: the protocol (name, typed tags, keyword-only options, no
``**kwargs`` swallowing typos); a call returns maps of the documented shape, finite, on the
input's device, in the inputs' dtype and on a grid of the input's aspect (not transposed); the
inputs are not modified; the caller's global random state is left as it was; hooks are removed and
the model's state (training flags, ``requires_grad``, ``.grad``, parameters and buffers) is
restored after a call and after a call that fails mid-way on an invalid target; results do not
depend on the batch size or on earlier calls; several targets per sample give the same maps as
one target at a time. Two known-answer checks run on :func:`~xai_core.testing.models.evidence_cnn`,
whose class evidence lies in known squares: the map of a requested class is where that class's
evidence is (not the top class's), and it is positive there (higher means more important).

Chosen by tags: a model-agnostic method that needs only forward passes, and a method reading
layers, classifier weights or attention (CAM, the Grad-CAM family, attention maps: what the ONNX
adapter reads from a graph), also runs on the model exported to ONNX and must give the same maps
(on the same layers, found in the graph by value); a global method's summary (``details["global"]``)
must merge: two halves of a batch added give the summary of the whole batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import ModelAdapter, torch_module_of
from xai_core.core.api import run_explainer
from xai_core.core.errors import (
    CapabilityError,
    ConformanceError,
    InputError,
    ModelError,
    PluginContractError,
    PluginError,
    TargetError,
    XaiError,
)
from xai_core.core.explanation import Explanation
from xai_core.core.registry import Registry, _check_explainer_class
from xai_core.core.tags import Capability, Dependence, Scope
from xai_core.core.types import ExplainerInfo
from xai_core.onnx.adapter import OnnxAdapter
from xai_core.testing.models import (
    evidence_cnn,
    evidence_inputs,
    evidence_masks,
    onnx_bytes,
    tiny_cnn,
)
from xai_core.testing.runner import (
    Check,
    Report,
    SkipCheck,
    parametrize_entries,
    run_checks,
)
from xai_core.testing.state import (
    rng_changed_by,
    watched_state,
)

CHECKS = (
    "protocol",
    "result",
    "dtype",
    "grid",
    "inputs_untouched",
    "global_rng",
    "state_restored",
    "state_restored_on_error",
    "batch_invariance",
    "stateless",
    "multi_target",
    "targets_honoured",
    "sign",
    "onnx",
    "global_summary",
)


def explainer_checks(
    cls: type,
    *,
    model: nn.Module | ModelAdapter | None = None,
    inputs: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
    evidence_options: dict[str, Any] | None = None,
    atol: float = 1e-4,
) -> list[Check]:
    """The conformance checks for ``cls``, each runnable on its own; those that cannot apply to
    it (by its tags, or to the model given) carry the reason in ``skip``.

    :param model: the model the checks run on (default: :func:`tiny_cnn`); needed for methods
        that require attention.
    :param inputs: a small batch for ``model`` (default: 3 random images fitting it).
    :param options: the method's options for every call.
    :param evidence_options: options for the known-answer checks on the kit's evidence CNN, if
        ``options`` name something only ``model`` has (a layer); default: ``options``.
    """
    case = _Case(cls, model, inputs, dict(options or {}), evidence_options, atol)
    subject = str(getattr(cls, "name", None) or cls.__qualname__)
    if options:  # the pytest id says which options, like scikit-learn's estimator repr
        subject += "(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"
    return [
        Check(name, getattr(case, f"check_{name}"), subject, case.skip_reason(name))
        for name in CHECKS
    ]


def check_explainer(
    cls: type, *, expected_failures: Mapping[str, str] | None = None, **kwargs: Any
) -> Report:
    """Run every check of :func:`explainer_checks` (same keywords); return the :class:`Report`,
    or raise one :class:`ConformanceError` listing each failure, and each check listed in
    ``expected_failures`` (``{"check": "why"}``) that passed."""
    return run_checks(explainer_checks(cls, **kwargs), cls.__qualname__, expected_failures)


def parametrize_with_checks(
    explainers: list[type | tuple[type, dict[str, Any]]],
    *,
    expected_failures: Mapping[str, str] | Any = None,
) -> Any:
    """A pytest decorator: one test per (explainer, check), with ``name-check`` ids::

        @parametrize_with_checks([MyExplainer, (MyOther, {"options": {"size": 3}})])
        def test_conformance(check):
            check()

    An entry is a class, or ``(class, keywords of explainer_checks)``, whose keywords may hold
    that entry's own ``expected_failures``. ``expected_failures`` is a ``{"check": "why"}``
    mapping for every class, or a function of the class returning one; a listed check is a
    strict xfail, a check that cannot apply a skip with its reason.
    """
    return parametrize_entries(explainer_checks, explainers, expected_failures)


# What the ONNX adapter offers from a graph: the white-box capabilities a method may read there.
ONNX_WHITE_BOX = frozenset({Capability.LAYERS, Capability.CLASSIFIER_WEIGHTS, Capability.ATTENTION})
# Layer edits (Ablation-/Recipro-CAM): the graph's tail re-run in torch on the edited copies.
ONNX_CAPABILITIES = ONNX_WHITE_BOX | {
    Capability.FORWARD,
    Capability.GRADIENTS,
    Capability.LAYER_EDITS,
}


def _layer_names(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    )


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _is_explainer_class(cls: Any) -> bool:
    try:
        _check_explainer_class(cls)
    except PluginError:
        return False
    return True


def grid_fits(grid: tuple[int, ...], size: tuple[int, ...]) -> bool:
    """Whether ``grid`` is ``size`` scaled down by one factor for every axis (up to rounding):
    a transposed or unrelated grid is not."""
    if len(grid) != len(size) or any(g < 1 or g > s for g, s in zip(grid, size, strict=True)):
        return False
    return any(
        all(abs(g - s * gj / sj) <= 1 for g, s in zip(grid, size, strict=True))
        for gj, sj in zip(grid, size, strict=True)
    )


class _Case:
    def __init__(
        self,
        cls: type,
        model: Any,
        inputs: torch.Tensor | None,
        options: dict[str, Any],
        evidence_options: dict[str, Any] | None,
        atol: float,
    ) -> None:
        self.cls, self.options, self.atol = cls, options, atol
        self.evidence_options = options if evidence_options is None else dict(evidence_options)
        self.info = ExplainerInfo.from_class(cls) if _is_explainer_class(cls) else None
        self.tags = self.info.tags if self.info else None
        self.given_inputs, self.default_model = inputs is not None, model is None
        if model is None:
            needs = getattr(getattr(cls, "tags", None), "requires", frozenset())
            if Capability.ATTENTION in needs:
                _fail(f"{cls.__qualname__} needs attention: pass model= and inputs= explicitly.")
            with torch.random.fork_rng(devices=[]):  # tiny_cnn seeds; the caller's RNG stays
                model = tiny_cnn()
        self.model = model
        self.adapter = Registry(entry_points_group=None).adapt(model)
        if inputs is None:
            generator = torch.Generator().manual_seed(1)
            channels = self.adapter.input_spec.channels or 3
            shape = (
                (3, channels, 16, 16)
                if (self.adapter.input_spec.rank or 4) == 4
                else (3, channels, 8, 8, 8)
            )
            inputs = torch.randn(shape, generator=generator).to(self.adapter.device)
        self.inputs = inputs
        self._evidence: tuple[ModelAdapter, torch.Tensor] | None = None

    # -- which checks apply ---------------------------------------------------------------------

    def skip_reason(self, name: str) -> str | None:
        tags = self.tags
        if tags is None:
            return None  # every check then fails, naming the protocol check
        if name in ("state_restored", "state_restored_on_error") and self._module() is None:
            return f"the model is a {self.adapter.kind} model, whose state the kit cannot read"
        evidence = name in ("targets_honoured", "sign") or (
            name == "grid" and not self._non_square()
        )
        if evidence and Capability.ATTENTION in tags.requires:
            return "the known-answer checks run on a small CNN without attention" + (
                "; pass non-square inputs= to check the grid" if name == "grid" else ""
            )
        if name == "onnx":
            return self._onnx_skip_reason()
        if name == "global_summary" and tags.scope is not Scope.GLOBAL:
            return "a local method: it has no dataset summary to merge"
        return None

    def _onnx_skip_reason(self) -> str | None:
        """Why the method is not run on the model's ONNX export, or ``None``: model-agnostic
        methods that need only forward passes run there, and so do methods reading layers,
        classifier weights or attention (CAM, the Grad-CAM family, attention maps), which the
        ONNX adapter offers from the graph."""
        assert self.tags is not None
        requires = self.tags.requires
        white_box = requires & ONNX_WHITE_BOX
        if not white_box:
            if self.tags.dependence is not Dependence.MODEL_AGNOSTIC:
                return (
                    "a model-specific method that reads no layer, classifier weights or "
                    "attention: it is not expected to run on an ONNX model"
                )
            extra = sorted(c.value for c in requires - {Capability.FORWARD})
            if extra:
                return (
                    f"needs {', '.join(extra)} only: on ONNX that re-runs the whole exported graph "
                    f"in torch; the kit compares forward-only methods and those reading layers, "
                    f"classifier weights or attention"
                )
        else:
            beyond = sorted(c.value for c in requires - ONNX_CAPABILITIES)
            if beyond:
                return f"needs {', '.join(beyond)}, which the ONNX adapter does not offer"
        if self._module() is None:
            return f"the model under test is a {self.adapter.kind} model already"
        return None

    # -- running ----------------------------------------------------------------------------------

    def run(
        self,
        inputs: torch.Tensor | None = None,
        targets: Any = None,
        adapter: ModelAdapter | None = None,
        options: dict[str, Any] | None = None,
    ) -> Explanation:
        if self.info is None:
            _fail("the class does not follow the Explainer protocol (see the protocol check).")
        x = self.inputs if inputs is None else inputs
        opts = dict(self.options if options is None else options)
        try:
            return run_explainer(self.info, adapter or self.adapter, x, targets, opts)
        except PluginContractError as exc:  # the core's own result check caught it first
            raise ConformanceError(str(exc)) from exc

    def _module(self) -> nn.Module | None:
        return torch_module_of(self.adapter)

    def _non_square(self) -> bool:
        return self.given_inputs and len(set(self.inputs.shape[2:])) > 1

    def evidence(self) -> tuple[ModelAdapter, torch.Tensor]:
        """The evidence CNN's adapter and inputs (built once), or a skip when the method cannot
        run on it."""
        if self._evidence is None:
            adapter = Registry(entry_points_group=None).adapt(evidence_cnn())
            reason = Registry(entry_points_group=None).unsupported_reason(self.info, adapter)
            if reason is not None:
                raise SkipCheck(f"the method cannot run on the kit's evidence CNN: {reason}")
            self._evidence = adapter, evidence_inputs()
        return self._evidence

    def run_evidence(self, targets: Any) -> Explanation:
        adapter, x = self.evidence()
        try:
            return self.run(x, targets, adapter, self.evidence_options)
        except (CapabilityError, InputError) as exc:  # e.g. a method for 3D volumes only
            raise SkipCheck(
                f"the method refused the kit's 2D evidence CNN ({type(exc).__name__}: {exc})"
            ) from exc

    def _allclose(self, a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 0.0) -> None:
        scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
        atol = max(atol, self.atol)
        if a.shape != b.shape or not torch.allclose(a, b, atol=atol * scale, rtol=1e-4):
            diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            _fail(
                f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}, max difference {diff:.3g}."
            )

    # -- the checks -------------------------------------------------------------------------------

    def check_protocol(self) -> None:
        try:
            _check_explainer_class(self.cls)
        except PluginError as exc:
            _fail(str(exc))
        params = inspect.signature(self.cls.explain).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            _fail(
                "explain() takes **kwargs, so misspelt options would be silently ignored; "
                "declare every option as a keyword-only parameter."
            )
        try:
            self.cls()
        except TypeError as exc:
            _fail(f"the class must be constructible without arguments: {exc}")

    def check_result(self) -> None:
        exp = self.run()
        n, spatial = self.inputs.shape[0], tuple(self.inputs.shape[2:])
        if tuple(exp.maps.shape) != (n, *spatial):
            _fail(
                f"maps have shape {tuple(exp.maps.shape)}; expected {(n, *spatial)} for one "
                f"target and one layer."
            )
        for raw in exp.raw:
            if raw.device != self.inputs.device:
                _fail(f"raw maps are on {raw.device}, inputs on {self.inputs.device}.")
            if raw.ndim != self.inputs.ndim or raw.shape[:2] != (n, 1):
                _fail(f"a raw map has shape {tuple(raw.shape)}; expected (N, K, *spatial).")
        if not bool(torch.isfinite(exp.maps).all()):
            _fail("maps contain NaN or infinite values.")
        if exp.scores.shape[0] != n:
            _fail(f"scores have shape {tuple(exp.scores.shape)}; expected ({n}, outputs).")

    def check_dtype(self) -> None:
        exp = self.run()
        for i, raw in enumerate(exp.raw):
            if raw.dtype != self.inputs.dtype:
                _fail(
                    f"dtype: raw map {i} is {raw.dtype} but the inputs are {self.inputs.dtype}; "
                    f"return maps in the inputs' dtype (a float64 map doubles memory and breaks "
                    f"code that mixes it with the inputs)."
                )

    def check_grid(self) -> None:
        if self._non_square():
            exp, size = self.run(), tuple(self.inputs.shape[2:])
        else:  # the evidence CNN's non-square inputs: a transposed grid shows
            exp = self.run_evidence(None)
            size = tuple(self.evidence()[1].shape[2:])
        for i, raw in enumerate(exp.raw):
            grid = tuple(raw.shape[2:])
            if not grid_fits(grid, size):
                transposed = grid[::-1] == size or grid_fits(grid[::-1], size)
                _fail(
                    f"wrong grid: raw map {i} has grid {grid} for inputs of size {size}"
                    + ("; it looks transposed (H and W swapped)" if transposed else "")
                    + ". A map's grid is the input's, or a layer's grid of the same aspect."
                )

    def check_inputs_untouched(self) -> None:
        before = self.inputs.clone()
        self.run()
        if not torch.equal(before, self.inputs):
            _fail("explain() modified the caller's inputs in place.")
        if self.inputs.requires_grad:
            _fail("explain() left requires_grad set on the caller's inputs.")

    def check_global_rng(self) -> None:
        changed = rng_changed_by(self.run)
        if changed:
            _fail(
                f"global RNG: explain() changed the caller's global random state ("
                f"{'; '.join(changed)}). Draw from your own torch.Generator / "
                f"np.random.default_rng(seed), or wrap seeding in torch.random.fork_rng()."
            )

    def check_state_restored(self) -> None:
        module = self._module()
        assert module is not None  # skipped otherwise
        with watched_state(module) as changed:
            self.run()
            if problem := changed():
                _fail(f"after a successful call, the model's {problem}.")

    def check_state_restored_on_error(self) -> None:
        module = self._module()
        assert module is not None  # skipped otherwise
        classes = int(self.run().scores.shape[1])
        with watched_state(module) as changed:
            try:
                self.run(targets=classes)  # one past the last class: must fail mid-call
            except TargetError:
                pass
            else:
                _fail(f"an out-of-range target ({classes}) did not raise TargetError.")
            if problem := changed():
                _fail(f"after a failed call, the model's {problem}.")

    def check_batch_invariance(self) -> None:
        whole = self.run()
        targets = whole.targets[:, 0].tolist() if whole.targets is not None else None
        for i in range(self.inputs.shape[0]):
            single = self.run(self.inputs[i : i + 1], None if targets is None else [targets[i]])
            self._allclose(single.maps[0], whole.maps[i], f"sample {i} alone vs in a batch")

    def check_stateless(self) -> None:
        first, second = self.run(), self.run()
        self._allclose(first.maps, second.maps, "two identical calls")

    def check_multi_target(self) -> None:
        n = self.inputs.shape[0]
        both = self.run(targets=[[0, 1]] * n)
        expected = (n, 2, *self.inputs.shape[2:])
        if tuple(both.maps.shape) != expected:
            _fail(
                f"maps for 2 targets per sample have shape {tuple(both.maps.shape)}; "
                f"expected {expected}."
            )
        for k in (0, 1):
            one = self.run(targets=k)
            self._allclose(both.maps[:, k], one.maps, f"target {k} within 2 targets vs alone")

    def check_targets_honoured(self) -> None:
        # Class 0 is every sample's top class; each class's evidence is in its own square. The
        # map of class k must weigh k's square more than the other's (absolute values: the sign
        # is the sign check's business).
        inside = {k: evidence_masks(k) for k in (0, 1)}
        for k, other in ((1, 0), (0, 1)):
            heat = self.run_evidence(k).maps.detach().abs().cpu()
            own = heat[inside[k]].mean()
            rival = heat[inside[other]].mean()
            if not bool(own > rival):
                _fail(
                    f"target ignored: the map asked for class {k} weighs class {other}'s evidence "
                    f"({float(rival):.3g} on average) at least as much as class {k}'s own "
                    f"({float(own):.3g}); class 0 is the top class. Explain the targets given "
                    f"(targets.resolve(scores)), not the top class."
                )

    def check_sign(self) -> None:
        # Class k's evidence raises its score only inside its square: a correct map is higher
        # there than anywhere else, on average; a sign-flipped one is lower.
        for k in (0, 1):
            heat = self.run_evidence(k).maps.detach().cpu()
            mask = evidence_masks(k)
            own, rest = heat[mask].mean(), heat[~mask].mean()
            spread = float(heat.abs().max())
            if not float(own - rest) > 0.05 * spread:
                _fail(
                    f"sign: the map of class {k} is not higher where its evidence is (mean "
                    f"{float(own):.3g} inside, {float(rest):.3g} outside); is it sign-flipped? "
                    f"Higher must mean more important (docs/conventions.md, Maps)."
                )

    def check_onnx(self) -> None:
        module = self._module()
        assert module is not None  # skipped otherwise
        # The kit's default model is exported once per process; a model passed in, each time.
        data = onnx_bytes() if self.default_model else onnx_bytes(module, self.inputs)
        try:
            onnx = OnnxAdapter(data, providers=["CPUExecutionProvider"])
        except ModelError as exc:  # e.g. a float64 model: onnxruntime has no such kernels
            raise SkipCheck(f"onnxruntime cannot run the model's ONNX export: {exc}") from exc
        x = self.inputs.cpu()
        assert self.tags is not None and self.info is not None
        white_box = bool(self.tags.requires & ONNX_WHITE_BOX)
        if white_box:
            missing = sorted(c.value for c in self.tags.requires - onnx.capabilities)
            if missing:
                raise SkipCheck(f"the model's ONNX export offers no {', '.join(missing)}")
            reason = Registry(entry_points_group=None).unsupported_reason(self.info, onnx)
            if reason is not None:
                raise SkipCheck(f"the method cannot run on the model's ONNX export: {reason}")
        on_torch = self.run()
        options = self._onnx_options(onnx, x, on_torch) if white_box else self.options
        try:
            on_onnx = self.run(x, adapter=onnx, options=options)
        except XaiError as exc:
            if white_box and isinstance(exc, CapabilityError):
                # A white-box method may need what this graph lacks (an operator the gradient
                # pass cannot differentiate, a capability beyond the protocols): said, not passed.
                raise SkipCheck(f"the method refused the model's ONNX export: {exc}") from exc
            kind = "a white-box method" if white_box else "a model-agnostic method"
            _fail(
                f"onnx: {kind} must run on the model exported to ONNX (its adapter offers "
                f"{sorted(c.value for c in onnx.capabilities)}); it raised "
                f"{type(exc).__name__}: {exc}"
            )
        self._same_maps(on_onnx.maps, on_torch.maps.cpu())

    def _same_maps(self, onnx: torch.Tensor, torch_: torch.Tensor) -> None:
        """Equal up to float rounding relative to the maps' own magnitude (raw maps can be
        small: an absolute tolerance would pass a mirrored map)."""
        what = "onnx: maps on the ONNX export vs PyTorch"
        if onnx.shape != torch_.shape:
            _fail(f"{what}: shapes {tuple(onnx.shape)} vs {tuple(torch_.shape)}.")
        scale = max(float(onnx.abs().max()), float(torch_.abs().max()))
        diff = float((onnx.double() - torch_.double()).abs().max())
        if not diff <= max(1e-3 * scale, self.atol * 1e-3):  # also catches NaN
            share = diff / (scale or 1.0)
            _fail(f"{what}: max difference {diff:.3g}, {share:.3g} of the maps' largest value.")

    def _onnx_options(self, onnx: OnnxAdapter, x: torch.Tensor, on_torch: Explanation) -> dict:
        """The options with the layers the PyTorch run used named as the ONNX graph names
        them (the tensor holding the same values), so that both explain the same layers."""
        parameters = inspect.signature(self.cls.explain).parameters
        accepted = [k for k in ("layer", "layers") if k in parameters]
        assert self.tags is not None
        if not accepted or Capability.LAYERS not in self.tags.requires:
            return self.options
        given = [k for k in accepted if self.options.get(k) is not None]
        if given and not _layer_names(self.options[given[0]]):
            return self.options  # indices or other non-name options mean the same on both
        torch_layers = list(on_torch.layers)
        # The option the caller used; else ``layer`` for one layer (no layer axis, as on torch).
        key = given[0] if given else ("layer" if len(torch_layers) == 1 else "layers")
        key = key if key in accepted else accepted[0]
        torch_adapter: Any = self.adapter  # a TorchAdapter: the check runs for modules only
        with torch_adapter.session():  # eval mode, as during the explanation; state restored
            recorded = torch_adapter.record_layers(self.inputs, torch_layers)
        graph = onnx.record_layers(x, onnx.layer_names()).order
        names = []
        for layer in torch_layers:
            value = recorded.last(layer).cpu()
            scale = max(float(value.abs().max()), 1.0)
            same = [
                name
                for name, got in graph
                if got.shape == value.shape and torch.allclose(got, value, atol=1e-4 * scale)
            ]
            if not same:
                raise SkipCheck(
                    f"no tensor of the ONNX graph equals the output of layer {layer!r}, so the "
                    f"two runs cannot be compared on the same layer"
                )
            names.append(same[-1])
        return {**self.options, key: names if key == "layers" else names[0]}

    def check_global_summary(self) -> None:
        whole = self.run()
        summary = whole.details.get("global")
        if summary is None:
            _fail("a global method returns its mergeable summary in details['global']; none.")
        targets = whole.targets
        half = self.inputs.shape[0] // 2 or 1
        parts = [
            self.run(self.inputs[s], None if targets is None else targets[s])
            for s in (slice(0, half), slice(half, None))
        ]
        try:
            merged = parts[0].details["global"] + parts[1].details["global"]
        except Exception as exc:
            _fail(f"the summaries of two batches do not add with +: {type(exc).__name__}: {exc}")
        self._same_summary(merged, summary)

    def _same_summary(self, merged: Any, whole: Any) -> None:
        what = "the summaries of two halves added vs the summary of the whole batch"
        if dataclasses.is_dataclass(whole):
            for f in dataclasses.fields(whole):
                a, b = getattr(merged, f.name), getattr(whole, f.name)
                if isinstance(b, torch.Tensor):
                    self._allclose(a.double(), b.double(), f"{what} ({f.name})")
                elif a != b:
                    _fail(f"{what} ({f.name}): {a!r} vs {b!r}.")
        elif isinstance(whole, torch.Tensor):
            self._allclose(merged.double(), whole.double(), what)
        elif merged != whole:
            _fail(f"{what}: {merged!r} vs {whole!r}.")
