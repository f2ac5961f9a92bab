"""Typed tags: what an explainer is and what it needs from a model.

Tags are enums inside a frozen dataclass, so a typo ("model_agnostic", "gradient") fails loudly
at import time of the plugin instead of silently filtering it out later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, TypeVar

from xai_core.core.errors import TagError


class Scope(StrEnum):
    """Whether an explanation concerns one input (local) or a whole dataset (global)."""

    LOCAL = "local"
    GLOBAL = "global"


class Dependence(StrEnum):
    """Whether the method looks inside the model (specific) or only calls it (agnostic)."""

    MODEL_SPECIFIC = "model-specific"
    MODEL_AGNOSTIC = "model-agnostic"


class Capability(StrEnum):
    """Something a model adapter can offer and an explainer can require."""

    FORWARD = "forward"  # a batch in, class scores out
    GRADIENTS = "gradients"  # autograd through the model
    LAYERS = "layers"  # named internal modules whose outputs can be captured
    CLASSIFIER_WEIGHTS = "classifier-weights"  # a linear head whose weights can be read
    ATTENTION = "attention"  # attention weights of transformer blocks
    LAYER_EDITS = "layer-edits"  # a forward pass with a layer's output replaced (Ablation-CAM)


E = TypeVar("E", bound=Enum)


def coerce_enum(kind: type[E], value: Any) -> E:
    """``value`` as a member of ``kind``, accepting the member itself or its string value."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise TagError(f"{value!r} is not a valid {kind.__name__}; use one of {allowed}.") from None


@dataclass(frozen=True)
class Tags:
    """The tags every explainer declares.

    ``requires`` lists the capabilities a model must offer for the method to run; the registry
    uses it to say which methods can run on a given model, and to refuse the others with a reason.
    """

    scope: Scope
    dependence: Dependence
    requires: frozenset[Capability] = field(default_factory=lambda: frozenset({Capability.FORWARD}))

    def __init__(
        self,
        scope: Scope | str,
        dependence: Dependence | str,
        requires: Iterable[Capability | str] = (Capability.FORWARD,),
    ) -> None:
        if isinstance(requires, str | Capability):
            raise TagError("Tags.requires takes a collection of capabilities, not a single one.")
        object.__setattr__(self, "scope", coerce_enum(Scope, scope))
        object.__setattr__(self, "dependence", coerce_enum(Dependence, dependence))
        needs = frozenset(coerce_enum(Capability, c) for c in requires) | {Capability.FORWARD}
        object.__setattr__(self, "requires", needs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope.value,
            "dependence": self.dependence.value,
            "requires": sorted(c.value for c in self.requires),
        }
