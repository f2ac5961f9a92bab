"""What a call must leave as it was: the model's state and the caller's global random state."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from xai_core.torch.capture import hook_count


def model_state(module: nn.Module) -> dict[str, Any]:
    return {
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in module.parameters()],
        "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "hooks": hook_count(module),
    }


def state_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """What changed between two :func:`model_state` snapshots, in words, or ``None``."""
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


def prepare_state(module: nn.Module) -> None:
    """A state a call must not clobber: training mode, one frozen parameter, a set ``.grad``."""
    module.train()
    params = list(module.parameters())
    if params:
        params[0].requires_grad_(False)
        params[-1].grad = torch.full_like(params[-1], 0.5)


def reset_state(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None


def rng_states() -> dict[str, Any]:
    """The caller's global random states: torch (CPU and every CUDA device), NumPy, ``random``."""
    states: dict[str, Any] = {
        "torch.manual_seed / torch's global generator": torch.get_rng_state(),
        "np.random.seed / NumPy's global generator": np.random.get_state(),
        "random.seed / Python's random module": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda.manual_seed / CUDA generators"] = torch.cuda.get_rng_state_all()
    return states


@contextmanager
def scrambled_rng() -> Iterator[None]:
    """Every global generator in a state no seeding reaches (seeded, then drawn from), so that
    an explainer that seeds with any value shows; the caller's states come back afterwards."""
    saved = rng_states()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        torch.manual_seed(20_240_611)  # seeds CUDA too
        torch.rand(1)
        if cuda:
            torch.cuda.manual_seed_all(20_240_611)  # and draw on each device: not a seed state
            for d in range(torch.cuda.device_count()):
                torch.rand(1, device=f"cuda:{d}")
        np.random.seed(20_240_611)
        np.random.rand()
        random.seed(20_240_611)
        random.random()
        yield
    finally:
        torch.set_rng_state(saved["torch.manual_seed / torch's global generator"])
        np.random.set_state(saved["np.random.seed / NumPy's global generator"])
        random.setstate(saved["random.seed / Python's random module"])
        if cuda and "torch.cuda.manual_seed / CUDA generators" in saved:
            torch.cuda.set_rng_state_all(saved["torch.cuda.manual_seed / CUDA generators"])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def rng_change(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The global generators whose state differs between two :func:`rng_states`."""
    return [name for name in before if name in after and not _same(before[name], after[name])]


@contextmanager
def watched_state(module: nn.Module) -> Iterator[Callable[[], str | None]]:
    """Put ``module`` in a state a call must not clobber (:func:`prepare_state`) and yield a
    function saying what has changed since (or ``None``); the module is reset afterwards."""
    prepare_state(module)
    try:
        before = model_state(module)
        yield lambda: state_change(before, model_state(module))
    finally:
        reset_state(module)


def rng_changed_by(call: Callable[[], Any]) -> list[str]:
    """The global random states ``call()`` changed, run from scrambled states (see
    :func:`scrambled_rng`), in words; empty when it left them alone."""
    with scrambled_rng():
        before = rng_states()
        call()
        return rng_change(before, rng_states())
