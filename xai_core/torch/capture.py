"""The one place where xai-core touches a user's ``nn.Module``: hooks and state.

Context managers:

* :func:`preserved_state` puts the model in eval mode with frozen parameters for the duration of
  an explanation and restores, in ``finally``, every module's training flag, every parameter's
  ``requires_grad`` and ``.grad``, and the normalisation layers' running statistics. It holds the
  model's :func:`session_lock` throughout, so threads explaining one model take turns.
* :func:`capture` registers forward hooks that record layer outputs, and removes them in
  ``finally`` also when the body raises.
* :func:`capture_attention` records the attention weights of ``nn.MultiheadAttention`` and of
  custom modules that call :func:`record_attention`, likewise removing its hooks in ``finally``.

Why forward hooks and ``torch.autograd.grad`` instead of backward hooks: a module's backward
hook misfires when the next operation is an in-place ReLU (DenseNet) and fires once per use of a
module used twice. A forward hook sees each output exactly once per call; the gradient of the
stored tensor is then asked of autograd directly.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from xai_core.core.errors import CapabilityError, LayerNotFoundError, LayerTypeError

_STAT_LAYERS = (nn.modules.batchnorm._NormBase,)


# What a module that computes multi-head attention itself holds (duck typing, not class names):
# a head count, and query and key projections under the names the common libraries use.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "heads")
_PROJECTIONS = (("qkv",), ("query", "key"), ("q", "k"), ("q_proj", "k_proj"), ("to_qkv",))


def computes_attention(module: nn.Module) -> bool:
    """True for a module that looks like it computes multi-head attention from its input itself:
    an integer head count and query/key projection sub-modules (timm's ``Attention`` and its
    EVA/BEiT/Swin variants, Hugging Face's ``ViTAttention``/``ViTSelfAttention`` and kin).
    Whether it really does is shown when it runs: :func:`xai_core.torch.capture.capture_attention`
    reads the weights of its ``F.scaled_dot_product_attention`` or softmax call, and refuses a
    module in which it finds neither."""
    heads = next((getattr(module, a) for a in _HEAD_COUNTS if hasattr(module, a)), None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return False
    children = dict(module.named_children())
    return any(all(isinstance(children.get(n), nn.Module) for n in names) for names in _PROJECTIONS)


def is_attention_module(module: nn.Module) -> bool:
    """True for ``nn.MultiheadAttention``, for custom modules that opt in to the attention
    contract by setting ``xai_attention = True`` (see docs/methods/attention.md), and for modules
    recognised by their structure (:func:`computes_attention`)."""
    return (
        isinstance(module, nn.MultiheadAttention)
        or bool(getattr(module, "xai_attention", False))
        or computes_attention(module)
    )


# One re-entrant lock per model, held for a whole session: two threads explaining one model take
# turns (each saves the state the user left, not the other's eval-mode/frozen state, and each
# forward runs in eval mode), sessions on different models run in parallel, and the thread that
# holds a session may open another on the same model (an explainer calling explain()).
_session_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_session_locks_guard = threading.Lock()


def _forget_session_locks() -> None:
    # A child forked while another thread held a session (a DataLoader worker started during an
    # explanation) inherits that lock held forever: only the forking thread survives the fork.
    global _session_locks, _session_locks_guard
    _session_locks = weakref.WeakKeyDictionary()
    _session_locks_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_session_locks)


def session_lock(module: nn.Module) -> threading.RLock:
    """The re-entrant lock that :func:`preserved_state` holds on ``module`` (one per model)."""
    with _session_locks_guard:
        lock = _session_locks.get(module)
        if lock is None:
            lock = _session_locks[module] = threading.RLock()
        return lock


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients; the exact prior state restored on exit.

    Holds :func:`session_lock` of ``module`` throughout (docs/conventions.md, "Thread safety").
    """
    with session_lock(module), _preserved(module):
        yield module


@contextmanager
def _preserved(module: nn.Module) -> Iterator[nn.Module]:
    training = {m: m.training for m in module.modules()}
    # Parameters created under torch.inference_mode() can be frozen but never unfrozen outside
    # it, and autograd cannot record them anyway: they are left alone.
    params = [p for p in module.parameters() if not p.is_inference()]
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    stats = {
        (m, name): buf.detach().clone()
        for m in module.modules()
        if isinstance(m, _STAT_LAYERS)
        for name, buf in m.named_buffers(recurse=False)
        if buf is not None
    }
    try:
        module.eval()
        for p in params:
            # Gradients are taken with respect to activations only: freezing parameters keeps
            # autograd from building weight-gradient paths and leaves ``.grad`` untouched.
            p.requires_grad_(False)
        yield module
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag, grad in zip(params, requires_grad, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for (m, name), saved in stats.items():
                current = getattr(m, name)
                if current is not None and not torch.equal(current, saved):
                    current.copy_(saved)


@dataclass
class Captured:
    """Outputs recorded by :func:`capture`, one list entry per call of each layer.

    A module used twice in one forward pass (a shared block) records two entries; methods
    decide which to use and say so (Grad-CAM uses the last call).
    """

    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    order: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # in firing order
    # With inputs=True: every positional tensor argument of each call, in firing order.
    arguments: list[tuple[str, tuple[torch.Tensor, ...]]] = field(default_factory=list)

    def last(self, name: str) -> torch.Tensor:
        calls = self.outputs.get(name)
        if not calls:
            raise LayerNotFoundError(
                f"Layer {name!r} was never called during the forward pass, so it has no output "
                f"to explain. Choose a layer that the model's forward() uses."
            )
        return calls[-1]

    def clear(self) -> None:
        for calls in self.outputs.values():
            calls.clear()
        self.order.clear()
        self.arguments.clear()


@contextmanager
def capture(
    layers: Mapping[str, nn.Module],
    *,
    detach: bool = False,
    strict: bool = True,
    inputs: bool = False,
) -> Iterator[Captured]:
    """Record the output of each named layer on every forward call while the block runs.

    The hook hands the rest of the network a *clone* of the layer's output and stores the
    original: an in-place operation downstream (``ReLU(inplace=True)``, DenseNet's functional
    ``F.relu(..., inplace=True)``) then changes the clone, never the stored activation, and
    ``torch.autograd.grad`` with respect to the stored tensor is the gradient of the layer's true
    output. With ``detach=True`` (methods that need no gradient) the stored copy is detached.
    With ``strict=False`` layers whose output is not a tensor are skipped instead of refused.
    With ``inputs=True`` the layer's first positional *input* is recorded instead (detached), and
    the output is left alone: this is how a classifier head's input is read.
    """
    record = Captured({name: [] for name in layers})
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[object, ...], output: object) -> object:
            if inputs:
                if args and isinstance(args[0], torch.Tensor):
                    record.outputs[name].append(args[0].detach())
                    record.order.append((name, args[0].detach()))
                tensors = tuple(a.detach() for a in args if isinstance(a, torch.Tensor))
                record.arguments.append((name, tensors))
                return None
            if not isinstance(output, torch.Tensor):
                if not strict:
                    return None
                raise LayerTypeError(
                    f"Layer {name!r} returns {type(output).__name__}, not a tensor; choose a "
                    f"layer whose output is a feature map."
                )
            if _aliases_an_input(output, args):
                # An Identity tap, a view or an in-place activation returns memory the model
                # still holds; an edit made upstream later would change the record.
                output = output.clone()
            stored = output.detach() if detach else output
            record.outputs[name].append(stored)
            record.order.append((name, stored))
            return output.clone()

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _aliases_an_input(output: torch.Tensor, args: tuple[object, ...]) -> bool:
    pointer = output.untyped_storage().data_ptr()
    return any(
        isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == pointer for a in args
    )


@contextmanager
def edited_output(
    module: nn.Module, name: str, edit: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While the block runs, ``module``'s output ``A`` is replaced by ``edit(A)`` (which may
    hold more rows than ``A``: variants of each sample, see ``TorchAdapter.run_with_layer_
    output``). A layer called twice in one forward pass is refused: which call to edit would be
    a guess. The hook is removed in ``finally``."""
    calls = 0

    def hook(_module: nn.Module, _args: tuple[object, ...], output: object) -> object:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise LayerTypeError(
                f"Layer {name!r} runs more than once per forward pass, so replacing its output "
                f"is ambiguous; choose a layer the model calls once."
            )
        if not isinstance(output, torch.Tensor):
            raise LayerTypeError(
                f"Layer {name!r} returns {type(output).__name__}, not a tensor; choose a "
                f"layer whose output is a feature map."
            )
        return edit(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hook_count(module: nn.Module) -> int:
    """How many hooks of any kind are registered on ``module`` and its children (for checks)."""
    total = 0
    for m in module.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total


# -- attention weights ----------------------------------------------------------------------------
#
# Attention maps need the softmax weights ``(B, heads, T, T)`` of every attention call. Two sources:
#
# * ``nn.MultiheadAttention``: models call it with ``need_weights=False`` (torchvision's ViT) and
#   may take the fused fast path, which never materialises the weights. A forward pre-hook asks
#   for them (``need_weights=True, average_attn_weights=False``) and a forward hook reads
#   ``output[1]``, then hands the caller what it asked for (``None`` or the head average).
# * custom modules that opt in with ``xai_attention = True`` and call :func:`record_attention` in
#   their forward (docs/methods/attention.md). A module that declares the contract but records
#   nothing (e.g. it calls ``F.scaled_dot_product_attention``) is an error, never an empty map.
# * modules recognised by their structure (a head count and query/key projections: timm's
#   ``Attention``, Hugging Face's ``ViTAttention``, ...; see ``computes_attention``). While one of
#   them runs, a ``TorchFunctionMode`` computes each ``F.scaled_dot_product_attention`` call
#   explicitly, ``softmax(q k^T * scale + mask) @ v``, checks it against the fused kernel, hands
#   the model the explicit output (so the weights are in the autograd graph) and records the
#   weights; an eager ``softmax`` over ``(B, heads, T, T)`` is recorded as it is. The model's
#   flags (``fused_attn``, ``_attn_implementation``) are never touched.

_attention_sink: ContextVar[Callable[[nn.Module, torch.Tensor], None] | None] = ContextVar(
    "xai_core_attention_sink", default=None
)

# nn.MultiheadAttention.forward's parameters after (query, key, value), to read positional flags.
_MHA_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def record_attention(module: nn.Module, weights: torch.Tensor) -> None:
    """Hand the softmax ``weights`` ``(B, heads, T, T)`` that ``module`` just used to xai-core.

    For custom attention modules (class attribute ``xai_attention = True``): call it in
    ``forward`` with the very tensor that multiplies the values, so gradients with respect to it
    are the gradients of the model's output. A no-op costing one context-variable read unless
    :func:`capture_attention` is active for ``module``.
    """
    sink = _attention_sink.get()
    if sink is not None:
        sink(module, weights)


# The softmax entry points a module's forward may call (``x.softmax`` arrives as TensorBase's).
_SOFTMAXES = frozenset(
    {torch.softmax, torch.Tensor.softmax, torch._C.TensorBase.softmax, F.softmax}
)


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention``'s output and its softmax weights ``(..., L, S)``,
    computed without a fused kernel (the arguments are SDPA's; dropout is refused)."""
    if dropout_p:
        raise CapabilityError(
            f"An attention call used dropout_p={dropout_p} although the model is in eval mode; "
            f"its attention weights are random and cannot be explained."
        )
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query: share key/value heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    weights = logits.softmax(dim=-1)
    return weights @ value, weights


class _AttentionMode(TorchFunctionMode):
    """Materialises the attention weights of the structurally recognised module running now.

    ``running`` is the stack of such modules whose forward is in progress (pushed and popped by
    their forward hooks): a call is attributed to the innermost one. Outside them every function
    runs untouched.
    """

    def __init__(self, running: list[nn.Module], sink: Callable[[nn.Module, torch.Tensor], None]):
        super().__init__()
        self.running, self.sink = running, sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.running or (
            func is not F.scaled_dot_product_attention and func not in _SOFTMAXES
        ):
            return func(*args, **kwargs)
        module = self.running[-1]
        # Nothing below is seen by another mode (a capture around this one): one record a call.
        with torch._C.DisableTorchFunction():
            if func is F.scaled_dot_product_attention:
                output, weights = explicit_attention(*args, **kwargs)
                with torch.no_grad():
                    fused = func(*args, **kwargs)
                _check_same(module, output, fused)
            else:
                output = weights = func(*args, **kwargs)
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if weights.ndim != 4 or dim not in (-1, 3):
                    return output  # not a (B, heads, T, T) attention softmax
        self.sink(module, weights)
        return output


def _check_same(module: nn.Module, explicit: torch.Tensor, fused: torch.Tensor) -> None:
    """The explicit attention must be the model's own: refuse a map of something else."""
    tolerance = 1e-5 if explicit.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(explicit.detach(), fused, atol=tolerance, rtol=10 * tolerance):
        difference = (explicit.detach() - fused).abs().max().item()
        raise CapabilityError(
            f"{type(module).__name__}'s F.scaled_dot_product_attention differs from its explicit "
            f"softmax(q k^T * scale + mask) @ v by {difference:.3g}; xai-core cannot show "
            f"attention weights it cannot reproduce. Record them yourself "
            f"(docs/methods/attention.md, custom attention modules)."
        )


@contextmanager
def capture_attention(modules: Mapping[str, nn.Module]) -> Iterator[Captured]:
    """Record the attention weights of each named attention module on every call.

    Yields a :class:`Captured` whose ``outputs[name]`` lists one ``(B, heads, T, T)`` tensor per
    call and whose ``order`` lists ``(name, weights)`` in call order. Weights are stored as the
    module produced them (not detached): under ``torch.enable_grad()`` with an input that
    requires grad they are in the autograd graph. A module that finishes a call without weights
    raises :class:`~xai_core.core.errors.CapabilityError` from inside the forward pass. Hooks are
    removed in ``finally``, also when the body raises.
    """
    for name, module in modules.items():
        if not is_attention_module(module):
            raise LayerTypeError(
                f"Layer {name!r} ({type(module).__name__}) is not an attention module: use an "
                f"nn.MultiheadAttention or a module with `xai_attention = True` that calls "
                f"xai_core.torch.capture.record_attention (docs/methods/attention.md)."
            )
    record = Captured({name: [] for name in modules})
    custom = {m: name for name, m in modules.items() if not isinstance(m, nn.MultiheadAttention)}
    handles = []

    def store(name: str, weights: torch.Tensor) -> None:
        record.outputs[name].append(weights)
        record.order.append((name, weights))

    outer = _attention_sink.get()

    def sink(module: nn.Module, weights: torch.Tensor) -> None:
        name = custom.get(module)
        if name is not None:
            store(name, weights)
        if outer is not None:  # a capture around this one still sees its modules
            outer(module, weights)

    def mha_hooks(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        asked: list[tuple[bool, bool]] = []  # the caller's flags, one entry per call in flight

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            kwargs = {**dict(zip(_MHA_ARGS, args[3:], strict=False)), **kwargs}
            flags = (kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True))
            asked.append(flags)
            kwargs.update(need_weights=True, average_attn_weights=False)
            return args[:3], kwargs

        def post(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
            need, average = asked.pop()
            weights = output[1]
            if weights is None:
                raise CapabilityError(
                    f"Attention module {name!r} returned no weights although need_weights=True "
                    f"was requested; its forward() must return (output, weights) like "
                    f"nn.MultiheadAttention."
                )
            store(name, weights)
            # The caller gets what it asked for: code around the module sees what it always sees.
            return output[0], ((weights.mean(dim=1) if average else weights) if need else None)

        return pre, post

    def custom_hooks(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        before: list[int] = []

        def pre(_m: nn.Module, _args: Any) -> None:
            before.append(len(record.outputs[name]))

        def post(m: nn.Module, _args: Any, _output: Any) -> None:
            if len(record.outputs[name]) != before.pop():
                return
            if not getattr(m, "xai_attention", False):
                raise CapabilityError(
                    f"Attention module {name!r} ({type(m).__name__}) computed its attention "
                    f"neither with F.scaled_dot_product_attention nor with a softmax over "
                    f"(B, heads, T, T), so xai-core cannot read its weights. Set "
                    f"`xai_attention = True` on it and call "
                    f"xai_core.torch.capture.record_attention(self, weights) "
                    f"(docs/methods/attention.md)."
                )
            raise CapabilityError(
                f"Attention module {name!r} ({type(m).__name__}) declares "
                f"`xai_attention = True` but recorded no weights during its forward pass. "
                f"Fused attention (F.scaled_dot_product_attention, flash kernels) never "
                f"materialises them: compute softmax(q k^T / sqrt(d)) explicitly and call "
                f"xai_core.torch.capture.record_attention(self, weights) with the (B, heads, T, T) "
                f"weights used to mix the values (docs/methods/attention.md)."
            )

        return pre, post

    running: list[nn.Module] = []  # recognised modules whose forward is in progress

    def track(pre: Callable[..., Any], post: Callable[..., Any]) -> tuple[Any, Any]:
        def track_pre(m: nn.Module, args: Any) -> None:
            running.append(m)
            pre(m, args)

        def track_post(m: nn.Module, args: Any, output: Any) -> None:
            running.pop()
            post(m, args, output)

        return track_pre, track_post

    token = _attention_sink.set(sink)
    try:
        with ExitStack() as stack:
            for name, module in modules.items():
                if isinstance(module, nn.MultiheadAttention):
                    pre, post = mha_hooks(name)
                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    handles.append(module.register_forward_hook(post, with_kwargs=True))
                    continue
                pre, post = custom_hooks(name)
                if not getattr(module, "xai_attention", False):  # recognised by its structure
                    pre, post = track(pre, post)
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
            if len(custom) > sum(bool(getattr(m, "xai_attention", False)) for m in custom):
                stack.enter_context(_AttentionMode(running, record_attention))
            yield record
    finally:
        for handle in handles:
            handle.remove()
        _attention_sink.reset(token)
