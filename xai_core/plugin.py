"""The core's own implementations of the extension hooks, registered like a plugin.

This module is where the layers meet: the registry (``xai_core.core``) registers it under the
name ``xai-core`` before loading any entry point, and it wires in the PyTorch and ONNX adapters,
the model loaders and readers of ``xai_core.io`` and the in-process executor. Its
implementations are asked before any plugin's, and their names cannot be taken over
(docs/writing-a-plugin.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from xai_core.core.adapters import ModelAdapter
from xai_core.core.executors import LocalExecutor
from xai_core.core.hookspecs import hookimpl
from xai_core.io.models import load_builtin
from xai_core.io.readers import BUILTIN_READERS
from xai_core.onnx.adapter import OnnxAdapter, is_onnx_model
from xai_core.torch.adapter import TorchAdapter


@hookimpl(tryfirst=True)
def adapt_model(model: Any, options: dict[str, Any]) -> ModelAdapter | None:
    """PyTorch modules and ONNX models (the registry asks this before any plugin)."""
    if isinstance(model, nn.Module):
        return TorchAdapter(model, input_spec=options.get("input_spec"))
    if is_onnx_model(model):
        return OnnxAdapter(model, providers=options.get("providers"))
    return None


@hookimpl(tryfirst=True)
def load_model(spec: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """ONNX, TorchScript, torchvision/timm state_dicts, Hugging Face folders, demo: models."""
    return load_builtin(spec, arch=options.get("arch"), num_classes=options.get("num_classes"))


@hookimpl(tryfirst=True)
def register_readers(register: Callable[[Any], None]) -> None:
    for reader in BUILTIN_READERS:
        register(reader)


@hookimpl(tryfirst=True)
def register_executors(register: Callable[[Any], None]) -> None:
    register(LocalExecutor)
