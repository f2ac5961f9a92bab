"""The file layer of the ``xai`` command line: inputs, models and outputs on disk.

* :mod:`xai_core.io.inputs`: find PNG/JPEG, DICOM (files and series) and NIfTI inputs and read
  them into arrays in [0, 1]; :class:`Preprocess` turns those into model input tensors.
* :mod:`xai_core.io.readers`: the registered readers (the core's and plugins', through the
  ``register_readers`` hook) and :class:`~xai_core.io.readers.ReadOptions`.
* :mod:`xai_core.io.limits`: the limit on the size an input file declares, checked before
  decoding (decompression bombs); ``XAI_CORE_MAX_INPUT_BYTES``.
* :mod:`xai_core.io.models`: load ONNX, TorchScript, torchvision/timm + state_dict, Hugging Face
  or demo models (or a plugin's, through the ``load_model`` hook), never unpickling arbitrary
  objects.
* :mod:`xai_core.io.outputs`: atomic writes and a :class:`RunLedger` for resumable batches.
"""

from __future__ import annotations

from xai_core.io.inputs import (
    InputItem,
    InputKind,
    LoadedInput,
    find_inputs,
    read_item,
)
from xai_core.io.models import load_model
from xai_core.io.outputs import (
    RunLedger,
    atomic_open,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from xai_core.io.preprocess import Preprocess, find_sidecar, read_sidecar

__all__ = [
    "InputItem",
    "InputKind",
    "LoadedInput",
    "Preprocess",
    "RunLedger",
    "atomic_open",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "find_inputs",
    "find_sidecar",
    "load_model",
    "read_item",
    "read_sidecar",
]
