"""The conformance checks for metrics (the protocol of :mod:`xai_core.core.metrics`).

A metric is computed on the kit's evidence CNN (two 32x48 images, the evidence of the top class in
a known square, used as the ground-truth mask) with an input-times-gradient explanation, or on the
model, inputs, masks and explainer you pass. The checks: the protocol (name, direction, needs,
range, keyword-only options); the result contract (one real value per sample, never infinite);
values within the declared range; for metrics that need masks, the mask itself as the map scores
better (by the declared direction) than its complement, and a sample whose mask is empty gets
NaN; a constant map gives finite values or NaN, never an error; the same values twice (with
the same ``seed``, for a metric that takes one); the caller's global random state, the model's
state, the inputs and the explanation left as they were; each sample's value the same alone as
within a batch (not for ``measured_once`` metrics, whose value is one measurement of the batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import ModelAdapter, torch_module_of
from xai_core.core.api import run_explainer
from xai_core.core.contract import check_metric_result
from xai_core.core.errors import ConformanceError, PluginContractError, PluginError
from xai_core.core.explanation import Explanation
from xai_core.core.metrics import (
    Direction,
    MetricContext,
    Need,
    check_metric_class,
    metric_measured_once,
    metric_options,
    metric_range,
)
from xai_core.core.registry import Registry
from xai_core.core.tags import Capability, Tags
from xai_core.core.targets import Targets
from xai_core.core.types import Attribution, ExplainerInfo, PluginInfo
from xai_core.testing.models import evidence_cnn, evidence_inputs, evidence_masks
from xai_core.testing.runner import Check, Report, parametrize_entries, run_checks
from xai_core.testing.state import (
    rng_changed_by,
    watched_state,
)

CHECKS = (
    "protocol",
    "result",
    "range",
    "direction",
    "nan_where_undefined",
    "constant_map",
    "deterministic",
    "global_rng",
    "model_untouched",
    "inputs_untouched",
    "batch_invariance",
)


class InputTimesGradient:
    """The kit's reference explanation: input times the gradient of the target's logit."""

    name = "input_x_gradient"
    tags = Tags("local", "model-specific", requires={Capability.GRADIENTS})

    def explain(self, model: ModelAdapter, inputs: torch.Tensor, targets: Targets) -> Attribution:
        x = inputs.detach().requires_grad_(True)
        scores = model.forward(x)
        picked = targets.resolve(scores).select(scores)  # (N, K)
        grads = [torch.autograd.grad(picked[:, k].sum(), x, retain_graph=True)[0]
                 for k in range(picked.shape[1])]  # fmt: skip
        maps = torch.stack([(g * inputs).sum(1) for g in grads], dim=1)
        return Attribution(maps=maps.detach(), scores=scores.detach())


class ConstantMap(InputTimesGradient):
    """A map that says nothing: zeros everywhere."""

    name = "constant_map"

    def explain(self, model: ModelAdapter, inputs: torch.Tensor, targets: Targets) -> Attribution:
        scores = model.forward(inputs)
        k = targets.resolve(scores).count
        maps = inputs.new_zeros((inputs.shape[0], k, *inputs.shape[2:]))
        return Attribution(maps=maps, scores=scores.detach())


def _given(maps: torch.Tensor) -> ExplainerInfo:
    """An explainer returning ``maps`` ``(N, *spatial)`` for whatever it is asked."""

    class GivenMap(ConstantMap):
        name = "given_map"

        def explain(
            self, model: ModelAdapter, inputs: torch.Tensor, targets: Targets
        ) -> Attribution:
            scores = model.forward(inputs)
            k = targets.resolve(scores).count
            given = maps.to(inputs.device, inputs.dtype)[:, None]
            return Attribution(given.expand(-1, k, *given.shape[2:]), scores.detach())

    return ExplainerInfo.from_class(GivenMap)


def metric_checks(
    cls: type,
    *,
    model: nn.Module | ModelAdapter | None = None,
    inputs: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    explainer: type = InputTimesGradient,
    explainer_options: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    atol: float = 1e-6,
) -> list[Check]:
    """The conformance checks for the metric class ``cls``, each runnable on its own.

    :param model: default: the kit's evidence CNN; ``inputs`` and ``masks`` (``(N, *spatial)``
        bool, the ground truth of metrics that need masks) go with it.
    :param explainer: the explainer class whose maps are scored (default: input x gradient).
    :param options: the metric's options for every call.
    """
    case = _Case(cls, model, inputs, masks, explainer, explainer_options, options, atol)
    subject = str(getattr(cls, "name", None) or cls.__qualname__)
    return [
        Check(name, getattr(case, f"check_{name}"), subject, case.skip_reason(name))
        for name in CHECKS
    ]


def check_metric(
    cls: type, *, expected_failures: Mapping[str, str] | None = None, **kwargs: Any
) -> Report:
    """Run every check of :func:`metric_checks` (same keywords); return the :class:`Report` or
    raise one :class:`ConformanceError` listing each failure (see :func:`check_explainer`)."""
    return run_checks(metric_checks(cls, **kwargs), cls.__qualname__, expected_failures)


def parametrize_metrics(
    metrics: list[type | tuple[type, dict[str, Any]]],
    *,
    expected_failures: Mapping[str, str] | Any = None,
) -> Any:
    """:func:`~xai_core.testing.parametrize_with_checks` for metric classes."""
    return parametrize_entries(metric_checks, metrics, expected_failures)


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _same_values(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-5, equal_nan=True)


class _Case:
    def __init__(
        self,
        cls: type,
        model: Any,
        inputs: torch.Tensor | None,
        masks: torch.Tensor | None,
        explainer: type,
        explainer_options: dict[str, Any] | None,
        options: dict[str, Any] | None,
        atol: float,
    ) -> None:
        self.cls, self.atol = cls, atol
        self.options = dict(options or {})
        if model is None:
            model = evidence_cnn()
            inputs = evidence_inputs() if inputs is None else inputs
            masks = evidence_masks(0) if masks is None else masks  # class 0: the top class
        if inputs is None:
            raise ConformanceError("metric_checks: pass inputs= with model=.")
        self.registry = Registry(entry_points_group=None)
        self.adapter = self.registry.adapt(model)
        self.inputs = inputs.to(self.adapter.device)
        self.masks = None if masks is None else masks.to(self.adapter.device).bool()
        self.explainer = ExplainerInfo.from_class(explainer)
        self.explainer_options = dict(explainer_options or {})
        self.source = PluginInfo(cls.__module__, None, None)

    def skip_reason(self, name: str) -> str | None:
        needs = getattr(self.cls, "needs", frozenset())
        if name == "range" and _range(self.cls) is None:
            return "the metric declares no range"
        if name == "direction":
            if Need.MASKS not in needs:
                return "the known answer is a ground-truth mask; the metric needs none"
            if self.masks is None:
                return "no masks= given"
        if name == "nan_where_undefined":
            if Need.MASKS not in needs:
                return "the metric needs no masks: no sample is undefined by construction"
            if self.masks is None:
                return "no masks= given"
        if name in ("deterministic", "batch_invariance") and _measured_once(self.cls):
            return "a measured_once metric: one measurement of the batch (a timing), not a "\
                "function of each sample"  # fmt: skip
        if name == "model_untouched" and self._module() is None:
            return f"the model is a {self.adapter.kind} model, whose state the kit cannot read"
        return None

    def _module(self) -> nn.Module | None:
        return torch_module_of(self.adapter)

    def explanation(self, inputs: torch.Tensor, info: ExplainerInfo | None = None) -> Explanation:
        return run_explainer(
            info or self.explainer, self.adapter, inputs, None, dict(self.explainer_options)
        )

    def compute(
        self,
        inputs: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        explainer: ExplainerInfo | None = None,
        options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The metric's values, checked against the result contract, as float64 on the CPU."""
        x = self.inputs if inputs is None else inputs
        info = explainer or self.explainer
        exp = self.explanation(x, info)

        def rerun(inputs=x, model=self.adapter, targets=exp.targets[:, 0]) -> Explanation:
            adapter = self.registry.adapt(model)
            return run_explainer(info, adapter, inputs, targets, dict(self.explainer_options))

        context = MetricContext(
            model=self.adapter,
            inputs=x,
            explanation=exp,
            method=info.name,
            rerun=rerun,
            masks=self.masks if masks is None and inputs is None else masks,
        )
        result = self.cls().compute(context, **dict(self.options if options is None else options))
        try:
            return check_metric_result(result, self.cls.name, self.source, x.shape[0])
        except PluginContractError as exc:
            raise ConformanceError(str(exc)) from exc

    # -- the checks -------------------------------------------------------------------------------

    def check_protocol(self) -> None:
        try:
            check_metric_class(self.cls)
        except PluginError as exc:
            _fail(str(exc))
        params = inspect.signature(self.cls.compute).parameters.values()
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if len(positional) != 2:  # self, context
            _fail(
                f"compute(self, context, *, options...) takes its options keyword-only; it has "
                f"positional parameters {positional}."
            )
        try:
            self.cls()
        except TypeError as exc:
            _fail(f"the class must be constructible without arguments: {exc}")

    def check_result(self) -> None:
        self.compute()

    def check_range(self) -> None:
        low, high = _range(self.cls)
        values = self.compute()
        seen = values[~values.isnan()]
        outside = seen[(seen < low) | (seen > high)]
        if outside.numel():
            _fail(
                f"range: {outside.numel()} value(s) outside the declared range [{low}, {high}], "
                f"e.g. {float(outside[0]):.6g}."
            )

    def check_direction(self) -> None:
        # The ground truth itself as the map must score better, by the declared direction, than
        # its complement: a metric whose direction is declared the wrong way round fails.
        assert self.masks is not None  # skipped otherwise
        truth = self.compute(explainer=_given(self.masks.float()))
        wrong = self.compute(explainer=_given((~self.masks).float()))
        higher = self.cls.direction is Direction.HIGHER
        t, w = float(truth.nanmean()), float(wrong.nanmean())
        if not (t > w if higher else t < w):
            better = "higher" if higher else "lower"
            _fail(
                f"direction: the ground-truth mask as the map scored {t:.4g}, its complement "
                f"{w:.4g}; with direction {self.cls.direction.value!r} the truth must score "
                f"{better}. Is the direction declared the wrong way round?"
            )

    def check_nan_where_undefined(self) -> None:
        assert self.masks is not None  # skipped otherwise
        masks = self.masks.clone()
        masks[0] = False  # sample 0: nothing to point at, so the metric is undefined there
        values = self.compute(masks=masks, inputs=self.inputs)
        if not bool(values[0].isnan()):
            _fail(
                f"a sample with an empty mask got {float(values[0]):.6g}; a metric undefined "
                f"for a sample returns NaN there (never 0, which would be ranked)."
            )
        if masks.shape[0] > 1 and bool(values[1:].isnan().all()):
            _fail("an empty mask for sample 0 made every sample's value NaN.")

    def check_constant_map(self) -> None:
        self.compute(explainer=ExplainerInfo.from_class(ConstantMap))  # finite or NaN: the contract

    def check_deterministic(self) -> None:
        options = dict(self.options)
        if "seed" in metric_options(self.cls):
            options.setdefault("seed", 0)
        first, second = self.compute(options=options), self.compute(options=options)
        if not _same_values(first, second, self.atol):
            _fail(
                f"two identical calls gave {first.tolist()} and {second.tolist()}; a metric is a "
                f"function of its inputs (take a seed option and a local torch.Generator)."
            )

    def check_global_rng(self) -> None:
        changed = rng_changed_by(self.compute)
        if changed:
            _fail(
                f"global RNG: compute() changed the caller's global random state "
                f"({'; '.join(changed)}). Use a local torch.Generator, or torch.random.fork_rng()."
            )

    def check_model_untouched(self) -> None:
        module = self._module()
        assert module is not None  # skipped otherwise
        with watched_state(module) as changed:
            self.compute()
            if problem := changed():
                _fail(f"after compute(), the model's {problem}.")

    def check_inputs_untouched(self) -> None:
        inputs = self.inputs.clone()
        masks = None if self.masks is None else self.masks.clone()
        self.compute()
        if not torch.equal(inputs, self.inputs):
            _fail("compute() modified the inputs in place.")
        if masks is not None and not torch.equal(masks, self.masks):
            _fail("compute() modified the masks in place.")

    def check_batch_invariance(self) -> None:
        whole = self.compute()
        for i in range(self.inputs.shape[0]):
            masks = None if self.masks is None else self.masks[i : i + 1]
            alone = self.compute(self.inputs[i : i + 1], masks)
            if not _same_values(alone, whole[i : i + 1], max(self.atol, 1e-5)):
                _fail(
                    f"sample {i} alone scored {float(alone[0]):.6g}, within the batch "
                    f"{float(whole[i]):.6g}: each value must depend on its own sample only."
                )


def _range(cls: type) -> tuple[float, float] | None:
    try:
        return metric_range(cls)
    except (TypeError, ValueError, IndexError):
        return None  # a malformed range is the protocol check's finding


def _measured_once(cls: type) -> bool:
    return metric_measured_once(cls)
