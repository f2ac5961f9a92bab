"""The model as a ``torch.fx`` graph: traced once per model and cached while its modules stay."""

from __future__ import annotations

import weakref

import torch
from torch import fx, nn

from xai_occlusion.incremental.options import Unsupported

# Traces per model, with the identity of every submodule at tracing time: a model whose modules
# were replaced since is traced again.
_traces: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], fx.GraphModule]] = (
    weakref.WeakKeyDictionary()
)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(module)``, cached per model; :class:`Unsupported` if it fails."""
    key = tuple(id(m) for m in module.modules())
    cached = _traces.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    if isinstance(module, torch.jit.ScriptModule):
        raise Unsupported("a TorchScript module has no Python graph to trace")
    try:
        gm = fx.symbolic_trace(module)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise Unsupported(
            f"torch.fx cannot trace the model ({type(error).__name__}: {first})"
        ) from error
    _traces[module] = (key, gm)
    return gm
