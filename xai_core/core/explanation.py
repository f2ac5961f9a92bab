"""The result of :func:`xai_core.explain`: raw maps plus everything needed to trust them.

Conventions (docs/conventions.md): higher always means more important; raw maps are kept as the
method computed them; maps on the input grid are upsampled bilinearly (2D) or trilinearly (3D)
with ``align_corners=False``, never bicubically (it overshoots and invents negative heat);
normalised maps are min-max per map, and a constant map normalises to zeros, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.errors import LayerNotFoundError


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize ``(..., *spatial)`` maps to ``size`` (bilinear in 2D, trilinear in 3D)."""
    spatial = maps.shape[-len(size) :]
    if tuple(spatial) == tuple(size):
        return maps
    lead = maps.shape[: -len(size)]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    flat = maps.reshape(-1, 1, *spatial)
    if not flat.is_floating_point():
        flat = flat.float()
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False)
    return out.reshape(*lead, *size)


def normalize(
    maps: torch.Tensor, spatial_dims: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Min-max each map (the last ``spatial_dims`` axes) to [0, 1]; constant maps become 0.

    The one min-max normalisation (maps, metrics, reports, 16-bit images): with ``valid`` (a
    bool mask broadcastable to one map), the range is taken over the valid pixels only and the
    others become 0. NumPy callers convert: ``normalize(torch.from_numpy(a), a.ndim).numpy()``.
    """
    flat = maps.flatten(-spatial_dims)
    if valid is None:
        low = flat.amin(dim=-1, keepdim=True)
        span = flat.amax(dim=-1, keepdim=True) - low
    else:
        keep = valid.flatten(-spatial_dims) if valid.dim() >= spatial_dims else valid
        low = torch.where(keep, flat, math.inf).amin(dim=-1, keepdim=True)
        span = torch.where(keep, flat, -math.inf).amax(dim=-1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    if valid is not None:
        scaled = torch.where(keep, scaled, 0)
    return scaled.reshape(maps.shape)


@dataclass
class Explanation:
    """Attribution maps and their provenance.

    * ``raw``: one tensor per layer, ``(N, K, *grid)`` at the method's own resolution;
    * ``maps``: on the input's spatial grid. ``(N, *spatial)`` for one target per sample and one
      layer; a target axis ``(N, K, ...)`` is kept when several targets per sample were asked
      for, and a layer axis ``(N, [K,] L, ...)`` when several layers were;
    * ``targets``: ``(N, K)`` class indices (``None`` for a callable target); ``scores``: the
      model's ``(N, outputs)`` scores on the batch, ``(N, C, *spatial)`` for segmentation models.
    * ``regions``: for segmentation outputs, the ``(N, K, *out_spatial)`` bool regions whose
      logits each target summed (:class:`~xai_core.Region`); ``None`` otherwise.
    """

    method: str
    raw: list[torch.Tensor]
    layers: list[str]
    targets: torch.Tensor | None
    scores: torch.Tensor
    input_shape: tuple[int, ...]
    multi_target: bool = False
    multi_layer: bool = False
    plugin: str | None = None
    version: str | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    regions: torch.Tensor | None = None

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return tuple(self.input_shape[2:])

    @property
    def device(self) -> torch.device:
        return self.raw[0].device

    @cached_property
    def full(self) -> torch.Tensor:
        """All maps on the input grid, always ``(N, K, L, *spatial)``."""
        size = self.spatial_size
        return torch.stack([upsample(m, size) for m in self.raw], dim=2)

    def _squeeze(self, full: torch.Tensor) -> torch.Tensor:
        if not self.multi_layer:
            full = full.squeeze(2)
        if not self.multi_target:
            full = full.squeeze(1)
        return full

    @property
    def maps(self) -> torch.Tensor:
        """Maps on the input grid, shaped by what was asked (see the class docstring)."""
        return self._squeeze(self.full)

    def normalized(self) -> torch.Tensor:
        """:attr:`maps`, each map min-max scaled to [0, 1] (constant maps are all zeros)."""
        return self._squeeze(normalize(self.full, len(self.spatial_size)))

    def layer(self, name: str) -> torch.Tensor:
        """Maps of one layer on the input grid, ``(N, *spatial)`` or ``(N, K, *spatial)``."""
        if name not in self.layers:
            raise LayerNotFoundError(
                f"No maps for layer {name!r}; this explanation has {self.layers}."
            )
        full = self.full[:, :, self.layers.index(name)]
        return full if self.multi_target else full.squeeze(1)

    def numpy(self, normalized: bool = False) -> np.ndarray:
        """The maps as a NumPy array on the host, for display and saving."""
        maps = self.normalized() if normalized else self.maps
        return maps.detach().to("cpu", torch.float32).numpy()

    def to(self, device: torch.device | str) -> Explanation:
        """A copy with every tensor moved to ``device``."""
        moved = Explanation(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        moved.raw = [m.to(device) for m in self.raw]
        moved.scores = self.scores.to(device)
        moved.targets = None if self.targets is None else self.targets.to(device)
        moved.regions = None if self.regions is None else self.regions.to(device)
        return moved

    def cpu(self) -> Explanation:
        return self.to("cpu")

    def summary(self) -> dict[str, Any]:
        """JSON-friendly metadata (no maps)."""
        return {
            "method": self.method,
            "plugin": self.plugin,
            "version": self.version,
            "layers": self.layers,
            "targets": None if self.targets is None else self.targets.tolist(),
            "input_shape": list(self.input_shape),
            "seconds": self.seconds,
            "options": {k: repr(v) for k, v in self.options.items()},
            "model": self.model,
        }
