"""A Ray executor for xai-core: dataset work over an actor pool (``engine="ray"``).

Registers the executor ``ray`` (:class:`~xai_ray.executor.RayExecutor`) with the core's
``register_executors`` hook. Nothing here imports Ray: it is imported when a run uses the
engine, so installing this plugin costs nothing to the local engine (docs/scale.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xai_core
from xai_ray.executor import RayExecutor

__all__ = ["RayExecutor"]


@xai_core.hookimpl
def register_executors(register: Callable[[Any], None]) -> None:
    register(RayExecutor)
