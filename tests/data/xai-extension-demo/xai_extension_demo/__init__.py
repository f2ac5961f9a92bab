"""The three extension hooks, implemented outside xai_core/ (used by tests/test_extension_hooks.py).

* ``load_model``: ``toy:tiny`` builds a small, seeded CNN (no file is read);
* ``register_readers``: ``.npyimg`` files, a NumPy ``.npy`` array (C, H, W) or (H, W) of values
  in [0, 1], its header checked (and the size limit applied) before any data is read;
* ``register_executors``: ``chunked-threads`` runs the batch steps of a chunk in threads and
  merges the parts in the data's order, so its results equal the local executor's bitwise.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

import xai_core
from xai_core.core.errors import InputFileError, ModelError
from xai_core.io.inputs import LoadedInput

PREFIX = "toy:"
TOYS = {"tiny": (1, 3)}  # name: (input channels, classes)


def build_toy(name: str) -> nn.Module:
    channels, classes = TOYS[name]
    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


@xai_core.hookimpl
def load_model(spec, options):
    """toy:NAME models built in code."""
    if not spec.startswith(PREFIX):
        return None
    name = spec[len(PREFIX) :]
    if name not in TOYS:
        raise ModelError(f"Unknown toy model {name!r}; toys: {', '.join(TOYS)}.")
    channels, classes = TOYS[name]
    info = {
        "name": name,
        "class_names": [f"toy{c}" for c in range(classes)],
        "preprocess": {"channels": channels, "size": [32, 32]},
    }
    return build_toy(name), info


class NpyImageReader:
    """A ``.npyimg`` file: a .npy array of values in [0, 1], (H, W) or (C, H, W)."""

    name = "npyimg"

    @staticmethod
    def claims(path: Path) -> bool:
        return path.suffix.lower() == ".npyimg"

    @staticmethod
    def read(path: Path, options) -> LoadedInput:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = header(f)
            except ValueError as exc:
                raise InputFileError(path, f"not a .npy array ({exc})") from exc
        if dtype.hasobject or dtype.kind not in "fiub":
            raise InputFileError(path, f"holds {dtype} values; numbers only")
        if len(shape) not in (2, 3):
            raise InputFileError(path, f"shape {shape} is neither (H, W) nor (C, H, W)")
        options.check_size(path, shape, dtype.itemsize, f"{shape} of {dtype}")
        array = np.load(path, allow_pickle=False).astype(np.float32)
        array = np.clip(array if array.ndim == 3 else array[None], 0.0, 1.0)
        display = np.round(array.mean(axis=0) * 255).astype(np.uint8)
        return LoadedInput(np.ascontiguousarray(array), display, {"shape": list(shape)})


@xai_core.hookimpl
def register_readers(register):
    register(NpyImageReader)


class ChunkedThreads:
    """Steps of ``chunk`` batches at a time in a thread pool; parts merged in order."""

    name = "chunked-threads"
    chunk = 2

    def map(self, step, batches):
        pending = []
        with ThreadPoolExecutor(max_workers=self.chunk) as pool:
            for batch in batches:
                pending.append(batch)
                if len(pending) == self.chunk:
                    yield from pool.map(step, pending)
                    pending = []
            yield from pool.map(step, pending)

    def reduce(self, parts):
        total = None
        for part in parts:
            total = part if total is None else total + part
        return total


@xai_core.hookimpl
def register_executors(register):
    register(ChunkedThreads)
