"""The embedded demo: synthetic medical data, small trained models, and ``xai demo``.

``load_model(name)`` gives one of the shipped models in eval mode, its weights read with
``torch.load(..., weights_only=True)``: ``"cnn"`` and ``"vit"`` (chest X-rays, 3 classes),
``"cnn_shortcut"`` (trained where a corner marker went with disease), ``"cnn3d"`` (CT volumes,
2 classes). ``onnx_path()`` is the clean CNN exported to ONNX. Models take
``preprocess(batch.images)``::

    from xai_core import demo

    batch = demo.data.make_xrays(8, seed=0)
    scores = demo.load_model("cnn")(demo.preprocess(batch.images))

The weights, the ONNX file and ``manifest.json`` (accuracies, seeds, sha256) are written by
``scripts/train_demo.py``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xai_core.core.errors import ModelError, did_you_mean
from xai_core.demo import data
from xai_core.demo.data import CT_CLASSES, XRAY_CLASSES, preprocess
from xai_core.demo.models import DemoCNN, DemoCNN3D, DemoViT

MODELS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "cnn": (DemoCNN, XRAY_CLASSES),
    "cnn_shortcut": (DemoCNN, XRAY_CLASSES),
    "vit": (DemoViT, XRAY_CLASSES),
    "cnn3d": (DemoCNN3D, CT_CLASSES),
}
CLASS_NAMES = {name: classes for name, (_, classes) in MODELS.items()}

__all__ = [
    "CLASS_NAMES",
    "MODELS",
    "data",
    "load_model",
    "manifest",
    "onnx_path",
    "preprocess",
    "preprocess_settings",
    "weights_dir",
]


def weights_dir() -> Path:
    """The folder of the shipped weights (the package is installed as files, never zipped)."""
    return Path(str(resources.files(__name__) / "weights"))


def manifest() -> dict[str, Any]:
    """``weights/manifest.json``: per model its training recipe, seeds and held-out accuracies;
    the preprocessing; the sha256 of every weight file."""
    return json.loads((weights_dir() / "manifest.json").read_text())


def load_model(name: str) -> nn.Module:
    """A shipped demo model on the CPU, in eval mode (see the module docstring for the names)."""
    if name not in MODELS:
        raise ModelError(
            f"No demo model {name!r}.{did_you_mean(name, MODELS)} Choose from {list(MODELS)}."
        )
    cls, classes = MODELS[name]
    path = weights_dir() / f"{name}.pt"
    if not path.is_file():
        raise ModelError(f"The demo weights {path} are missing; run scripts/train_demo.py.")
    model = cls(classes=len(classes))
    # weights_only: a weight file can never run code, even one swapped on disk.
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def onnx_path() -> Path:
    """The ONNX export of the clean chest-X-ray CNN: input ``image`` ``(batch, 1, 64, 64)``,
    preprocessed as for the torch model; output ``logits`` ``(batch, 3)``."""
    return weights_dir() / "cnn.onnx"


def preprocess_settings(name: str) -> dict[str, Any]:
    """What the command line's Preprocess needs for a demo model."""
    cnn3d = name == "cnn3d"
    mean, std = (data.CT_MEAN, data.CT_STD) if cnn3d else (data.XRAY_MEAN, data.XRAY_STD)
    size = (32, 32, 32) if cnn3d else (64, 64)
    return {"size": size, "mean": (mean,), "std": (std,), "channels": 1}
