"""What every model adapter offers: a forward pass on torch tensors, and a list of capabilities."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from xai_core.core.tags import Capability


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, as far as the adapter can tell (``None``: unknown)."""

    rank: int | None = None  # 4 for (N, C, H, W), 5 for (N, C, D, H, W)
    channels: int | None = None
    spatial: tuple[int | None, ...] | None = None  # fixed spatial size (ONNX files), if any
    dtype: torch.dtype | None = None  # floating dtype the model computes in (PyTorch modules)


class ModelAdapter(ABC):
    """A model seen through the capabilities explainers need.

    Subclasses set ``kind`` (a short name), ``capabilities``, ``device`` and ``input_spec``.
    ``forward`` maps an ``(N, C, *spatial)`` tensor on ``device`` to ``(N, outputs)`` scores (or
    ``(N, classes, *spatial)`` for segmentation models) on the same device; it is called inside
    :meth:`session`, which an explanation enters exactly once.
    """

    kind: str = "model"
    capabilities: frozenset[Capability] = frozenset({Capability.FORWARD})
    device: torch.device = torch.device("cpu")
    input_spec: InputSpec = InputSpec()

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scores (logits) for a batch; gradients flow when the adapter has that capability."""

    @contextmanager
    def session(self) -> Iterator[ModelAdapter]:
        """Set the model up for an explanation and restore it afterwards (default: nothing)."""
        yield self

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description, reported in every :class:`~xai_core.Explanation`."""
        return {
            "kind": self.kind,
            "device": str(self.device),
            "capabilities": sorted(c.value for c in self.capabilities),
        }

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs)
