"""ONNX adapter: a ``.onnx`` path, its bytes, or an ``onnxruntime.InferenceSession``.

Inputs and outputs stay torch tensors. On a CUDA provider they are bound to the session with
I/O binding (no host copy); on the CPU provider numpy views share the tensors' memory. A model
exported with a fixed batch size is run in chunks of that size, the last one padded.

The adapter pickles (to run in a worker process, :mod:`xai_core.core.executors`): what is
kept is the
model's path or bytes and the providers asked for; unpickling opens a new session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xai_core.core.adapters import InputSpec, ModelAdapter
from xai_core.core.errors import ModelError
from xai_core.core.tags import Capability

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TYPES = {
    "tensor(float)": (np.float32, torch.float32),
    "tensor(float16)": (np.float16, torch.float16),
    "tensor(double)": (np.float64, torch.float64),
}


def _onnxruntime():
    try:
        import onnxruntime  # an optional dependency (the `onnx` extra)
    except ImportError as exc:  # pragma: no cover - the test environment has it
        raise ModelError(
            "ONNX models need onnxruntime: pip install 'xai-core[onnx]' (or [onnx-gpu] for CUDA)."
        ) from exc
    onnxruntime.set_default_logger_severity(3)  # errors only: no provider-fallback noise
    return onnxruntime


def _session_source(session: Any) -> str | bytes | None:
    """The path or bytes an ``InferenceSession`` was opened from (onnxruntime keeps them)."""
    path = getattr(session, "_model_path", None)
    return path if path else getattr(session, "_model_bytes", None)


def is_onnx_model(model: object) -> bool:
    if isinstance(model, bytes | bytearray):
        return True
    if isinstance(model, str | os.PathLike):
        return str(model).lower().endswith(".onnx")
    return type(model).__name__ == "InferenceSession" and hasattr(model, "get_providers")


class OnnxAdapter(ModelAdapter):
    """Runs an ONNX model with onnxruntime; offers the forward capability only."""

    kind = "onnx"
    capabilities = frozenset({Capability.FORWARD})

    def __init__(self, model: Any, providers: list[str] | None = None) -> None:
        ort = _onnxruntime()
        self._providers = None if providers is None else list(providers)
        self._source = _session_source(model) if isinstance(model, ort.InferenceSession) else model
        available = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not wanted:
            raise ModelError(
                f"None of the requested providers {providers} is available; onnxruntime offers "
                f"{available}."
            )
        if isinstance(model, ort.InferenceSession):
            self.session_ = model
        else:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            source = bytes(model) if isinstance(model, bytes | bytearray) else str(model)
            if isinstance(model, str | os.PathLike) and not Path(model).is_file():
                raise ModelError(f"ONNX model file not found: {model}")
            try:
                self.session_ = ort.InferenceSession(source, options, providers=wanted)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise ModelError(f"onnxruntime could not load the model: {exc}") from exc
        self.provider = self.session_.get_providers()[0]
        self.device = (
            torch.device("cuda", 0)
            if self.provider == "CUDAExecutionProvider"
            else (torch.device("cpu"))
        )
        inputs, outputs = self.session_.get_inputs(), self.session_.get_outputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise ModelError(
                f"xai-core explains models with one image input; this one has {names}."
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        if inputs[0].type not in _ORT_TYPES:
            raise ModelError(f"Unsupported ONNX input type {inputs[0].type}; expected float.")
        self.np_dtype, self.torch_dtype = _ORT_TYPES[inputs[0].type]
        shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        self.fixed_batch = shape[0] if shape and shape[0] is not None and shape[0] > 0 else None
        self.output_shape = [d if isinstance(d, int) else None for d in outputs[0].shape]
        self.input_spec = InputSpec(
            rank=len(shape) or None,
            channels=shape[1] if len(shape) > 1 else None,
            spatial=tuple(shape[2:]) if len(shape) > 2 else None,
        )

    def __getstate__(self) -> dict[str, Any]:
        if self._source is None:
            raise TypeError(
                "This OnnxAdapter wraps an InferenceSession whose model path or bytes are not "
                "known, so it cannot be pickled; pass the .onnx path or bytes instead."
            )
        source = bytes(self._source) if isinstance(self._source, bytearray) else self._source
        return {"source": source, "providers": self._providers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], providers=state["providers"])  # a new session

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider": self.provider, "fixed_batch": self.fixed_batch}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.detach().to(self.torch_dtype)
        if self.fixed_batch is None:
            return self._run(x)
        size = self.fixed_batch
        parts = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            missing = size - chunk.shape[0]
            if missing:  # pad the last chunk to the exported batch size, then drop the padding
                chunk = torch.cat([chunk, chunk[-1:].expand(missing, *chunk.shape[1:])])
            parts.append(self._run(chunk)[: size - missing])
        return torch.cat(parts)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if x.device.type == "cuda":
            return self._run_bound(x)
        (out,) = self.session_.run([self.output_name], {self.input_name: x.numpy()})
        return torch.from_numpy(np.ascontiguousarray(out)).to(torch.float32)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Run on CUDA memory through I/O binding: the tensors never visit the host."""
        binding = self.session_.io_binding()
        binding.bind_input(
            self.input_name, "cuda", x.device.index or 0, self.np_dtype, list(x.shape), x.data_ptr()
        )
        dims = self.output_shape
        if dims and all(d is not None for d in dims[1:]):
            out = torch.empty((x.shape[0], *dims[1:]), device=x.device, dtype=self.torch_dtype)
            binding.bind_output(
                self.output_name,
                "cuda",
                x.device.index or 0,
                self.np_dtype,
                list(out.shape),
                out.data_ptr(),
            )
            self.session_.run_with_iobinding(binding)
            return out.to(torch.float32)
        # Output shape unknown ahead of time: let onnxruntime allocate it on the device.
        binding.bind_output(self.output_name, "cuda", x.device.index or 0)
        self.session_.run_with_iobinding(binding)
        value = binding.get_outputs()[0]
        return torch.from_dlpack(value).to(torch.float32)
