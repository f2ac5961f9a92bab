"""xai-core: explain what image models look at, with methods found as plugins.

The public API::

    import xai_core

    xai_core.list_explainers()                      # what is installed
    exp = xai_core.explain(model, x, method="gradcam", targets=[3, 1])
    exp.maps                                        # (N, H, W) on the model's device
    xai_core.compare(model, x, masks=m)             # every method x every metric
"""

from __future__ import annotations

from typing import Any

from xai_core.core import errors
from xai_core.core.adapters import InputSpec, ModelAdapter
from xai_core.core.api import explain
from xai_core.core.errors import XaiError
from xai_core.core.explanation import Explanation
from xai_core.core.hookspecs import hookimpl
from xai_core.core.registry import Registry, get_registry, reset_registry
from xai_core.core.tags import Capability, Dependence, Scope, Tags
from xai_core.core.targets import Region, ResolvedTargets, Targets
from xai_core.core.types import Attribution, Explainer, ExplainerInfo
from xai_core.torch.adapter import TorchAdapter
from xai_core.workflows.audit import audit
from xai_core.workflows.compare import Comparison, compare

__version__ = "0.1.0"


def list_explainers(**filters: Any) -> list[ExplainerInfo]:
    """Installed, usable explainers; filters: ``scope``, ``dependence``, ``requires``, ``model``."""
    return get_registry().list_explainers(**filters)


def adapt(model: Any, **options: Any) -> ModelAdapter:
    """The :class:`ModelAdapter` xai-core would use for ``model``."""
    return get_registry().adapt(model, **options)


__all__ = [
    "Attribution",
    "Capability",
    "Comparison",
    "Dependence",
    "Explainer",
    "ExplainerInfo",
    "Explanation",
    "InputSpec",
    "ModelAdapter",
    "Region",
    "Registry",
    "ResolvedTargets",
    "Scope",
    "Tags",
    "Targets",
    "TorchAdapter",
    "XaiError",
    "adapt",
    "audit",
    "compare",
    "errors",
    "explain",
    "get_registry",
    "hookimpl",
    "list_explainers",
    "reset_registry",
]
