"""From a read input to the tensor a model takes: channels, size, mean/std, slices.

The settings usually come from a small JSON file next to the model, found in this order:
``<model file>.json`` (``net.onnx.json``), ``<model stem>.json`` (``net.json``), then ``xai.json``
in the model's folder::

    {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "channels": 3, "class_names": ["normal", "pneumonia"]}

Explicit options (the command line's) override the file: ``Preprocess.from_sidecar(model,
size=(256, 256))``. Unknown keys are an error, so that a typo cannot silently change results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xai_core.core.errors import (
    InputError,
    ModelError,
    OptionError,
    UnknownOptionError,
    did_you_mean,
)

SIDECAR_NAME = "xai.json"
SIDECAR_KEYS = ("size", "mean", "std", "channels", "slice_axis", "class_names")
# ITU-R BT.601 luma, as Pillow's convert("L"): the usual grey of an RGB picture.
LUMINANCE = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocess:
    """How to turn a :class:`~xai_core.io.inputs.LoadedInput` into a model's input tensor.

    * ``size``: (H, W) to resize images (and each slice of a volume) to, or (D, H, W) for a
      volume; ``None`` keeps the size. Bilinear (antialiased when shrinking, like torchvision's
      ``Resize``) for 2D, trilinear for 3D.
    * ``mean``, ``std``: per channel (or one value for all), applied after scaling to [0, 1].
    * ``channels``: 1 or 3; grey becomes RGB by repetition, RGB becomes grey by luminance.
    * ``slice_axis``: 0, 1 or 2 (D, H or W of a volume) to feed a volume as a batch of 2D
      slices along that axis, as knee-MRI models do; ``None`` keeps it a volume.
    """

    size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None
    slice_axis: int | None = None

    def __post_init__(self) -> None:
        # Accept lists and scalars (JSON, CLI) but store tuples, so instances stay hashable.
        size = _tuple(self.size, int, "size")
        if size is not None and (len(size) not in (2, 3) or min(size) < 1):
            raise OptionError(f"size must be (H, W) or (D, H, W) of positive ints; got {size}.")
        mean, std = _tuple(self.mean, float, "mean"), _tuple(self.std, float, "std")
        if std is not None and any(s == 0 for s in std):
            raise OptionError(f"std must not contain 0; got {std}.")
        if self.channels not in (None, 1, 3):
            raise OptionError(f"channels must be 1 or 3; got {self.channels!r}.")
        if self.slice_axis not in (None, 0, 1, 2):
            raise OptionError(f"slice_axis must be 0, 1 or 2 (D, H, W); got {self.slice_axis!r}.")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def from_sidecar(cls, model: str | Path | None, **overrides: Any) -> Preprocess:
        """Settings from the model's sidecar JSON (if any), with non-None ``overrides`` on top."""
        names = {f.name for f in fields(cls)}
        for name in overrides:
            if name not in names:
                raise UnknownOptionError(
                    f"Preprocess has no option {name!r}.{did_you_mean(name, names)}"
                )
        settings = read_sidecar(model) if model is not None else {}
        values = {k: v for k, v in settings.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_tensor(self, loaded: Any) -> torch.Tensor:
        """(N, C, H, W) for an image (N = 1) or a sliced volume; (1, C, D, H, W) for a volume.

        ``loaded`` is a LoadedInput or its ``array``: (C, H, W) or (C, D, H, W) in [0, 1].
        """
        array = np.asarray(getattr(loaded, "array", loaded), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(array))
        if x.ndim == 3:
            x = x[None]
        elif x.ndim == 4 and self.slice_axis is not None:
            x = x.movedim(1 + self.slice_axis, 0)  # (C, D, H, W) -> (slices, C, rows, cols)
        elif x.ndim == 4:
            x = x[None]
        else:
            raise InputError(f"Expected (C, H, W) or (C, D, H, W); got shape {tuple(array.shape)}.")
        x = self._channels(x)
        x = self._resize(x)
        return self._normalise(x).contiguous()

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        have = x.shape[1]
        if self.channels is None or have == self.channels:
            return x
        if have == 1 and self.channels == 3:
            return x.repeat(1, 3, *([1] * (x.ndim - 2)))
        if have == 3 and self.channels == 1:
            weights = torch.tensor(LUMINANCE, dtype=x.dtype).view(1, 3, *([1] * (x.ndim - 2)))
            return (x * weights).sum(dim=1, keepdim=True)
        raise InputError(f"Cannot turn {have} channels into {self.channels}.")

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return x
        if x.ndim == 4:
            if len(self.size) != 2:
                raise OptionError(f"A 2D input needs size (H, W); got {self.size}.")
            if tuple(x.shape[2:]) == self.size:
                return x
            # Antialiasing keeps a 3000-pixel X-ray shrunk to 224 from aliasing (as Pillow does).
            return F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        size = self.size if len(self.size) == 3 else (x.shape[2], *self.size)
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None and self.std is None:
            return x
        channels = x.shape[1]
        shape = (1, channels, *([1] * (x.ndim - 2)))
        mean = _per_channel(self.mean or (0.0,), channels, "mean").view(shape)
        std = _per_channel(self.std or (1.0,), channels, "std").view(shape)
        return (x - mean) / std


def find_sidecar(model: str | Path) -> Path | None:
    """The settings file for ``model`` (see the module documentation), or None."""
    path = Path(model)
    if not path.is_file():  # a demo name, or a file that is not there: nothing to look next to
        return None
    candidates = [path.with_name(path.name + ".json")]
    if path.suffix:
        candidates.append(path.with_suffix(".json"))
    candidates.append(path.parent / SIDECAR_NAME)
    return next((c for c in candidates if c != path and c.is_file()), None)


def read_sidecar(model: str | Path) -> dict[str, Any]:
    """The validated settings for ``model`` ({} without a sidecar); the file under ``"path"``.

    Raises :class:`ModelError` naming the file when it is not valid JSON, has unknown keys, or
    has a value of the wrong kind.
    """
    path = find_sidecar(model)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"The model settings file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"The model settings file {path} must hold a JSON object.")
    for key in data:
        if key not in SIDECAR_KEYS:
            raise ModelError(
                f"Unknown key {key!r} in {path}.{did_you_mean(key, SIDECAR_KEYS)} "
                f"Known keys: {', '.join(SIDECAR_KEYS)}."
            )
    names = data.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise ModelError(f"class_names in {path} must be a list of strings.")
    try:  # check the preprocessing values now, with the file's name in the message
        Preprocess(**{k: v for k, v in data.items() if k != "class_names"})
    except (OptionError, TypeError, ValueError) as exc:
        raise ModelError(f"Invalid settings in {path}: {exc}") from exc
    return {**data, "path": str(path)}


def _tuple(value: Any, kind: type, name: str) -> tuple | None:
    if value is None:
        return None
    items = value if isinstance(value, list | tuple) else [value]
    try:
        return tuple(kind(v) for v in items)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{name} must be a number or a list of numbers; got {value!r}.") from exc


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> torch.Tensor:
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise OptionError(f"{name} has {len(values)} values for an input of {channels} channels.")
    return torch.tensor(values, dtype=torch.float32)
