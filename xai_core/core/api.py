"""``explain()``: one call from a model and a batch to an :class:`Explanation`.

The flow (docs/architecture.md): find the method in the registry; adapt the model; check the
model offers what the method needs; validate inputs, targets and options; run the explainer inside
the model's session (eval mode, hooks and state restored in ``finally``); wrap the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from xai_core.core.adapters import InputSpec, ModelAdapter, check_protocols, torch_module_of
from xai_core.core.contract import check_attribution
from xai_core.core.errors import (
    CapabilityError,
    ChannelMismatchError,
    DeviceError,
    InputError,
    InputRankError,
    InputTypeError,
    ModelRunError,
    OptionError,
    OptionTypeError,
    SpatialSizeError,
    UnknownOptionError,
    XaiError,
    did_you_mean,
)
from xai_core.core.explanation import Explanation
from xai_core.core.options import check_option_values
from xai_core.core.progress import settable
from xai_core.core.registry import explainer_options, get_registry
from xai_core.core.tags import Capability, Scope
from xai_core.core.targets import Targets, TargetSpec
from xai_core.core.types import Attribution, ExplainerInfo


def check_masks(masks: Any, inputs: torch.Tensor) -> torch.Tensor:
    """Ground-truth masks as booleans ``(N, *spatial)``, one per sample on the input grid
    (``(N, 1, *spatial)`` is accepted too); an :class:`InputError` otherwise."""
    if not isinstance(masks, torch.Tensor):
        raise InputError(f"masks must be a tensor (N, *spatial); got {type(masks).__name__}.")
    if masks.ndim == inputs.ndim:
        masks = masks[:, 0]
    if tuple(masks.shape) != (inputs.shape[0], *inputs.shape[2:]):
        raise InputError(
            f"masks must have shape {(inputs.shape[0], *inputs.shape[2:])} (one per sample, on the "
            f"input grid); got {tuple(masks.shape)}."
        )
    return masks.bool()


def validate_inputs(inputs: Any, adapter: ModelAdapter) -> None:
    """Raise a typed error that says what is wrong with ``inputs`` for this model."""
    if not isinstance(inputs, torch.Tensor):
        raise InputTypeError(
            f"inputs must be a torch.Tensor of shape (N, C, H, W) or (N, C, D, H, W); got "
            f"{type(inputs).__name__}. Convert with torch.as_tensor(...)."
        )
    if not inputs.is_floating_point():
        raise InputTypeError(
            f"inputs must be floating point; got {inputs.dtype}. Convert with inputs.float() and "
            f"scale them as the model was trained (e.g. / 255 and normalise)."
        )
    if inputs.ndim not in (4, 5):
        raise InputError(
            f"inputs must be a batch (N, C, H, W) for 2D or (N, C, D, H, W) for 3D models; got "
            f"shape {tuple(inputs.shape)}. For a single image use inputs.unsqueeze(0)."
        )
    spec = adapter.input_spec
    if spec.rank is not None and inputs.ndim != spec.rank:
        want = (
            "(N, C, H, W)"
            if spec.rank == 4
            else "(N, C, D, H, W)"
            if spec.rank == 5
            else f"{spec.rank}-D"
        )
        raise InputRankError(
            f"This model takes {want} inputs; got shape {tuple(inputs.shape)}.",
            expected=spec.rank,
            got=inputs.ndim,
        )
    if inputs.shape[0] == 0:
        raise InputError("The batch is empty (N = 0); pass at least one sample.")
    if any(s == 0 for s in inputs.shape[1:]):
        raise InputError(f"inputs have an empty dimension: shape {tuple(inputs.shape)}.")
    if spec.channels is not None and inputs.shape[1] != spec.channels:
        hint = (
            "For a grayscale image and an RGB model use inputs.expand(-1, 3, ...)."
            if inputs.shape[1] == 1 and spec.channels == 3
            else ""
        )
        raise ChannelMismatchError(
            f"This model takes {spec.channels} input channels; got {inputs.shape[1]} "
            f"(shape {tuple(inputs.shape)}, channels are dimension 1).",
            hint,
            expected=spec.channels,
            got=int(inputs.shape[1]),
        )
    if spec.spatial is not None:
        fixed = tuple(spec.spatial)
        got = tuple(inputs.shape[2:])
        if len(fixed) == len(got) and any(
            f is not None and f != g for f, g in zip(fixed, got, strict=True)
        ):
            raise SpatialSizeError(
                f"This model was exported for spatial size {fixed}; got {got}.",
                "Resize the inputs.",
                expected=fixed,
                got=got,
            )
    if spec.dtype is not None and inputs.dtype != spec.dtype:
        raise InputTypeError(
            f"inputs are {inputs.dtype} but the model computes in {spec.dtype}; convert with "
            f"inputs.to({spec.dtype}) (or the model, e.g. model.double())."
        )
    if not _same_device(inputs.device, adapter.device):
        raise DeviceError(
            f"inputs are on {inputs.device} but the model runs on {adapter.device}; move them "
            f"with inputs.to({str(adapter.device)!r})."
        )
    finite = torch.isfinite(inputs)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(
            f"inputs contain {bad} NaN or infinite value(s); explanations of non-finite inputs are "
            f"meaningless. Check the preprocessing."
        )


def _check_differentiable_model(info: ExplainerInfo, adapter: ModelAdapter) -> None:
    """Parameters made under ``torch.inference_mode()`` are inference tensors: autograd can
    never save them for a backward pass, and cloning them would change the user's model."""
    module = torch_module_of(adapter)
    if module is not None and any(
        t.is_inference() for t in (*module.parameters(), *module.buffers())
    ):
        raise CapabilityError(
            f"{info.name!r} needs gradients, but the model's parameters were created or loaded "
            f"under torch.inference_mode() (inference tensors), which autograd cannot "
            f"differentiate through. Build or load the model outside inference_mode "
            f"(torch.no_grad() is fine), or use a method without gradients (e.g. 'occlusion')."
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def check_options(info: ExplainerInfo, options: dict[str, Any]) -> None:
    """Refuse unknown option names, then values that do not fit the options' annotations
    (:mod:`xai_core.core.options`), before anything runs."""
    accepted = explainer_options(info.cls)
    for name in options:
        if name not in accepted:
            raise UnknownOptionError(
                f"The method {info.name!r} has no option {name!r}.{did_you_mean(name, accepted)} "
                f"Its options are: {', '.join(settable(accepted)) or 'none'}."
            )
    check_option_values(info.name, info.cls, options)


def runnable(
    method: str,
    model: Any,
    *,
    scope: Scope | None = None,
    wrong_scope: str = "",
    options: dict[str, Any] | None = None,
    adapter_options: dict[str, Any] | None = None,
) -> tuple[ExplainerInfo, ModelAdapter]:
    """The one lookup before a method runs: ``(info, adapter)`` for ``method`` on ``model``.

    Looks the method up (unknown or conflicting names raise), refuses one of another ``scope``
    (an :class:`OptionError` ending with ``wrong_scope``, the caller's advice), checks
    ``options`` (before the model is adapted), adapts ``model`` (an adapter is used as is) and
    asks :meth:`Registry.unsupported_reason`; a :class:`CapabilityError` then lists the
    methods (of ``scope``) that can run on this model.
    """
    registry = get_registry()
    info = registry.get_explainer(method)
    if scope is not None and info.tags.scope is not scope:
        raise OptionError(f"{method!r} is a {info.tags.scope.value} method; {wrong_scope}")
    if options is not None:
        check_options(info, options)
    adapter = registry.adapt(model, **(adapter_options or {}))
    check_protocols(adapter, info.tags.requires)  # AdapterProtocolError names what is missing
    reason = registry.unsupported_reason(info, adapter)
    if reason is not None:
        working = [i.name for i in registry.list_explainers(scope=scope, model=adapter)]
        raise CapabilityError(
            f"{reason}. Methods that can run on this model: {', '.join(working) or 'none'}."
        )
    return info, adapter


def explain(
    model: Any,
    inputs: torch.Tensor,
    *,
    method: str,
    targets: TargetSpec = None,
    input_spec: InputSpec | None = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s scores on ``inputs`` with the installed method ``method``.

    :param model: a ``torch.nn.Module``, an ONNX model (path, bytes or InferenceSession), a
        :class:`~xai_core.ModelAdapter`, or anything a plugin's ``adapt_model`` accepts.
    :param inputs: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float tensor on the model's device.
    :param method: a name from :func:`list_explainers`, e.g. ``"gradcam"``.
    :param targets: what to explain (see :mod:`xai_core.core.targets`); default: the top class.
    :param input_spec: what a PyTorch model takes (``InputSpec(rank=4, channels=3)``), for a
        model whose first convolution does not tell it (see :class:`~xai_core.InputSpec`).
    :param options: the method's own options (e.g. ``layer=...`` for Grad-CAM).
    :returns: an :class:`Explanation`; ``.maps`` is ``(N, *spatial)`` for one target and layer.
    """
    if not isinstance(method, str):
        raise OptionTypeError(
            f"method must be the name (str) of an installed method, e.g. 'gradcam'; got "
            f"{method!r} ({type(method).__name__}). See xai_core.list_explainers()."
        )
    info, adapter = runnable(
        method,
        model,
        options=options,
        adapter_options=None if input_spec is None else {"input_spec": input_spec},
    )
    return run_explainer(info, adapter, inputs, targets, options)


def run_explainer(
    info: ExplainerInfo,
    adapter: ModelAdapter,
    inputs: torch.Tensor,
    targets: TargetSpec,
    options: dict[str, Any],
) -> Explanation:
    """Validate, run one explainer inside the model's session, and wrap its result."""
    check_options(info, options)
    check_protocols(adapter, info.tags.requires)
    validate_inputs(inputs, adapter)
    if Capability.GRADIENTS in info.tags.requires:
        _check_differentiable_model(info, adapter)
    request = Targets(targets, inputs.shape[0], adapter.device)
    explainer = info.cls()  # a fresh instance per call: explainers keep no state between calls
    start = time.perf_counter()
    # Gradient methods need autograd whatever the caller's grad mode: a caller under
    # torch.no_grad() or torch.inference_mode() gets the same maps as one without
    # (docs/conventions.md, "Grad mode").
    with adapter.session(), torch.inference_mode(False), torch.enable_grad():
        if inputs.is_inference():
            # A tensor made under inference_mode can never enter an autograd graph: a normal
            # copy of it can (cloned outside inference mode, without recording a graph).
            with torch.no_grad():
                inputs = inputs.clone()
        with model_failures(adapter, inputs):
            result = explainer.explain(adapter, inputs, request, **options)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    seconds = time.perf_counter() - start
    return _wrap(result, info, request, inputs, adapter, options, seconds)


@contextmanager
def model_failures(adapter: ModelAdapter, inputs: torch.Tensor) -> Iterator[None]:
    """Turn an error raised because the model cannot run on ``inputs`` at all (too small for
    its pooling, a reshape that wants another size: torch's own message) into a
    :class:`ModelRunError` (a ``ModelError`` and a ``RuntimeError``) naming the shape. Told by
    one plain forward pass of the first sample, made only after something failed: when that
    pass runs, the error was not the inputs' and is raised as it was (an explainer's bug stays
    visible as itself)."""
    try:
        yield
    except (XaiError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        try:
            with torch.no_grad(), adapter.session():
                adapter.forward(inputs[:1])
        except Exception:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise ModelRunError(
                f"The model cannot run on inputs of shape {tuple(inputs.shape)}: {first}. "
                f"Check the size and channels it was trained on (a network with several "
                f"poolings needs inputs of tens of pixels at least) and the preprocessing."
            ) from exc
        raise


def _wrap(
    result: Attribution,
    info: ExplainerInfo,
    request: Targets,
    inputs: torch.Tensor,
    adapter: ModelAdapter,
    options: dict[str, Any],
    seconds: float,
) -> Explanation:
    check_attribution(result, info, request, inputs)  # a plugin's bug: PluginContractError
    assert request.resolved is not None  # checked just above
    maps = result.maps if isinstance(result.maps, list) else [result.maps]
    multi_layer = bool(result.details.pop("multi_layer", len(maps) > 1))
    return Explanation(
        method=info.name,
        raw=maps,
        layers=list(result.layers),
        targets=request.resolved.indices,
        scores=result.scores.detach(),
        input_shape=tuple(inputs.shape),
        multi_target=request.multi,
        multi_layer=multi_layer,
        plugin=info.distribution or info.plugin,
        version=info.version,
        seconds=seconds,
        options={k: v for k, v in options.items() if k != "progress"},  # a callback, not a setting
        model=adapter.describe(),
        details=result.details,
        regions=request.resolved.region,
    )
