"""A conformance check for explainers, for plugin authors and for the built-in plugins.

Run every check and get one error listing each failure::

    from xai_core.testing import check_explainer
    check_explainer(MyExplainer)                      # on a tiny built-in CNN
    check_explainer(MyViTMethod, model=my_vit, inputs=x, options={"layer": 3})

Or one pytest test per check::

    @pytest.mark.parametrize("check", explainer_checks(MyExplainer), ids=lambda c: c.name)
    def test_conformance(check):
        check()

The checks: the class follows the protocol (name, typed tags, keyword-only options, no
``**kwargs`` swallowing typos); a call returns maps of the documented shape, finite, on the
input's device; the inputs are not modified; hooks are removed and the model's state (training
flags, ``requires_grad``, ``.grad``, parameters and buffers) is restored after a call and after a
call that fails mid-way on an invalid target; results do not depend on the batch size or on
earlier calls; several targets per sample give the same maps as one target at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import ModelAdapter
from xai_core.core.api import run_explainer
from xai_core.core.errors import ConformanceError, PluginContractError, PluginError, TargetError
from xai_core.core.explanation import Explanation
from xai_core.core.registry import Registry, _check_explainer_class
from xai_core.core.tags import Capability
from xai_core.core.types import ExplainerInfo
from xai_core.torch.capture import hook_count


def tiny_cnn(dims: int = 2, channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    """A small conv -> BatchNorm -> ReLU -> conv -> ReLU -> GAP -> linear network."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv(channels, 6, 3, padding=1),
        norm(6),
        nn.ReLU(),
        conv(6, 8, 3, padding=1),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so restoring them is tested
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


@dataclass
class Check:
    """One named conformance check; calling it raises :class:`ConformanceError` on failure."""

    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()


def explainer_checks(
    cls: type,
    *,
    model: nn.Module | ModelAdapter | None = None,
    inputs: torch.Tensor | None = None,
    options: dict[str, Any] | None = None,
    atol: float = 1e-4,
) -> list[Check]:
    """The conformance checks for ``cls``, each runnable on its own."""
    case = _Case(cls, model, inputs, dict(options or {}), atol)
    return [
        Check(name, getattr(case, f"check_{name}"))
        for name in (
            "protocol",
            "result",
            "inputs_untouched",
            "state_restored",
            "state_restored_on_error",
            "batch_invariance",
            "stateless",
            "multi_target",
        )
    ]


def check_explainer(cls: type, **kwargs: Any) -> None:
    """Run every check of :func:`explainer_checks`; raise one error listing all failures."""
    failures = []
    for check in explainer_checks(cls, **kwargs):
        try:
            check()
        except Exception as exc:
            failures.append(f"- {check.name}: {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceError(f"{cls.__qualname__} fails conformance:\n" + "\n".join(failures))


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _model_state(module: nn.Module) -> dict[str, Any]:
    return {
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in module.parameters()],
        "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "hooks": hook_count(module),
    }


def _same_state(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    for key in ("training", "requires_grad", "hooks"):
        if before[key] != after[key]:
            return f"{key} changed: {before[key]} -> {after[key]}"
    for i, (a, b) in enumerate(zip(before["grads"], after["grads"], strict=True)):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            return f"the .grad of parameter {i} changed"
    for name, tensor in before["tensors"].items():
        if not torch.equal(tensor, after["tensors"][name]):
            return f"parameter or buffer {name!r} changed"
    return None


class _Case:
    def __init__(
        self,
        cls: type,
        model: Any,
        inputs: torch.Tensor | None,
        options: dict[str, Any],
        atol: float,
    ) -> None:
        self.cls, self.options, self.atol = cls, options, atol
        self.info = ExplainerInfo.from_class(cls) if _is_explainer_class(cls) else None
        if model is None:
            needs = getattr(getattr(cls, "tags", None), "requires", frozenset())
            if Capability.ATTENTION in needs:
                _fail(f"{cls.__qualname__} needs attention: pass model= and inputs= explicitly.")
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

    def run(self, inputs: torch.Tensor | None = None, targets: Any = None) -> Explanation:
        if self.info is None:
            _fail("the class does not follow the Explainer protocol (see the protocol check).")
        x = self.inputs if inputs is None else inputs
        try:
            return run_explainer(self.info, self.adapter, x, targets, dict(self.options))
        except PluginContractError as exc:  # the core's own result check caught it first
            raise ConformanceError(str(exc)) from exc

    def _allclose(self, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
        if a.shape != b.shape or not torch.allclose(a, b, atol=self.atol * scale, rtol=1e-4):
            diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            _fail(
                f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}, max difference {diff:.3g}."
            )

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

    def check_inputs_untouched(self) -> None:
        before = self.inputs.clone()
        self.run()
        if not torch.equal(before, self.inputs):
            _fail("explain() modified the caller's inputs in place.")
        if self.inputs.requires_grad:
            _fail("explain() left requires_grad set on the caller's inputs.")

    def _module(self) -> nn.Module | None:
        return getattr(self.adapter, "module", None)

    def _prepare_state(self, module: nn.Module) -> None:
        # A state explanations must not clobber: training mode, one frozen parameter, a grad.
        module.train()
        params = list(module.parameters())
        if params:
            params[0].requires_grad_(False)
            params[-1].grad = torch.full_like(params[-1], 0.5)

    def _restore(self, module: nn.Module) -> None:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(True)
            p.grad = None

    def check_state_restored(self) -> None:
        module = self._module()
        if module is None:
            return
        self._prepare_state(module)
        try:
            before = _model_state(module)
            self.run()
            problem = _same_state(before, _model_state(module))
            if problem:
                _fail(f"after a successful call, the model's {problem}.")
        finally:
            self._restore(module)

    def check_state_restored_on_error(self) -> None:
        module = self._module()
        classes = int(self.run().scores.shape[1]) if self.info else 0
        if module is not None:
            self._prepare_state(module)
        try:
            before = _model_state(module) if module is not None else None
            try:
                self.run(targets=classes)  # one past the last class: must fail mid-call
            except TargetError:
                pass
            else:
                _fail(f"an out-of-range target ({classes}) did not raise TargetError.")
            if module is not None:
                problem = _same_state(before, _model_state(module))
                if problem:
                    _fail(f"after a failed call, the model's {problem}.")
        finally:
            if module is not None:
                self._restore(module)

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


def _is_explainer_class(cls: Any) -> bool:
    try:
        _check_explainer_class(cls)
    except PluginError:
        return False
    return True
