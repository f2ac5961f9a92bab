"""The core's own implementations of the extension hooks, registered like a plugin.

The registry registers this module under the name ``xai-core`` before loading any entry point,
with ``tryfirst`` implementations: its model loaders, readers and the ``local`` executor are
asked before any plugin's, and their names cannot be taken over (docs/writing-a-plugin.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xai_core.hookspecs import hookimpl


@hookimpl(tryfirst=True)
def load_model(spec: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """ONNX, TorchScript, torchvision/timm state_dicts, Hugging Face folders, demo: models."""
    from xai_core.io.models import load_builtin

    return load_builtin(spec, arch=options.get("arch"), num_classes=options.get("num_classes"))


@hookimpl(tryfirst=True)
def register_readers(register: Callable[[Any], None]) -> None:
    from xai_core.io.readers import BUILTIN_READERS

    for reader in BUILTIN_READERS:
        register(reader)


@hookimpl(tryfirst=True)
def register_executors(register: Callable[[Any], None]) -> None:
    from xai_core.executors import LocalExecutor

    register(LocalExecutor)
