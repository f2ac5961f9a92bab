"""The explainer protocol and what an explainer hands back to the core."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from xai_core.core.adapters import ModelAdapter
from xai_core.core.errors import PluginError
from xai_core.core.tags import Tags
from xai_core.core.targets import Targets

# What a registered method, metric, reader or executor may be called (`xai explain -m NAME`).
NAME = re.compile(r"^[a-z][a-z0-9_\-.]*$")


def check_registered_class(cls: Any, kind: str, method: str, example: str) -> None:
    """The checks every registered explainer or metric class passes first: a class, named by
    a lower-case identifier, with its ``method``; a :class:`PluginError` saying what is wrong."""
    if not isinstance(cls, type):
        article = "an" if kind[0] in "aeiou" else "a"
        raise PluginError(f"register() takes {article} {kind} class; got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME.match(name):
        raise PluginError(
            f"{cls.__qualname__}.name must be a lower-case identifier such as {example!r}; "
            f"got {name!r}."
        )
    if not callable(getattr(cls, method, None)):
        raise PluginError(f"{cls.__qualname__} has no {method}() method.")


@dataclass
class Attribution:
    """What an explainer returns; the core turns it into an :class:`~xai_core.Explanation`.

    ``maps`` holds one tensor per layer (or a single tensor for input-space methods), each of
    shape ``(N, K, *spatial)``: ``N`` samples, ``K`` targets per sample, at the resolution the
    method computes (a layer's grid for Grad-CAM, the input grid for occlusion). Values are raw:
    higher means more important, no normalisation. ``scores`` are the model's ``(N, outputs)``
    scores on the unperturbed batch.
    """

    maps: list[torch.Tensor] | torch.Tensor
    scores: torch.Tensor
    layers: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Explainer(Protocol):
    """An explanation method.

    * ``name``: the identifier users type (``"gradcam"``), unique across installed plugins;
    * ``tags``: scope, dependence, and the model capabilities the method requires;
    * ``explain(model, inputs, targets, **options)``: runs inside the model's session (eval mode,
      state restored afterwards) and returns an :class:`Attribution`. It calls
      ``targets.resolve(scores)`` on its first, unperturbed forward pass. Its keyword-only
      parameters are its options: the core rejects any other option by name.

    Explainers are stateless: the core makes a new instance for every call. A class may also
    define ``unsupported_reason(model) -> str | None`` (a classmethod) for checks finer than
    capabilities, e.g. CAM needing a global-average-pooling head.
    """

    name: ClassVar[str]
    tags: ClassVar[Tags]

    def explain(
        self, model: ModelAdapter, inputs: torch.Tensor, targets: Targets, **options: Any
    ) -> Attribution: ...


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered class comes from."""

    plugin: str  # the entry-point (or in-process) plugin name
    distribution: str | None  # the installed distribution, None for in-process plugins
    version: str | None


@dataclass(frozen=True)
class ExplainerInfo:
    """One row of :func:`xai_core.list_explainers`."""

    name: str
    tags: Tags
    plugin: str
    distribution: str | None
    version: str | None
    summary: str
    options: tuple[str, ...]
    cls: type = field(repr=False, compare=False)

    @property
    def scope(self) -> str:
        return self.tags.scope.value

    @property
    def dependence(self) -> str:
        return self.tags.dependence.value

    @classmethod
    def from_class(cls, explainer: type, source: PluginInfo | None = None) -> ExplainerInfo:
        """Describe an explainer class (``source``: the plugin that registered it, if any)."""
        source = source or PluginInfo(explainer.__module__, None, None)
        doc = getattr(explainer, "summary", None) or inspect.getdoc(explainer) or ""
        params = inspect.signature(explainer.explain).parameters.values()
        return cls(
            name=explainer.name,
            tags=explainer.tags,
            plugin=source.plugin,
            distribution=source.distribution,
            version=source.version,
            summary=doc.strip().splitlines()[0] if doc.strip() else "",
            options=tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY),
            cls=explainer,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "explainer",
            **self.tags.as_dict(),
            "plugin": self.distribution or self.plugin,
            "version": self.version,
            "summary": self.summary,
            "options": list(self.options),
            "status": "ok",
        }
