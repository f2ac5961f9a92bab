"""Model adapters: what explainers can ask of a model, whatever framework it comes from."""

from xai_core.adapters.base import InputSpec, ModelAdapter

__all__ = ["InputSpec", "ModelAdapter"]
