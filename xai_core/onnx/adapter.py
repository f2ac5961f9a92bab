"""ONNX adapter: a ``.onnx`` path, its bytes, or an ``onnxruntime.InferenceSession``.

Inputs and outputs stay torch tensors. On a CUDA provider they are bound to the session with
I/O binding (no host copy); on the CPU provider numpy views share the tensors' memory. A model
exported with a fixed batch size is run in chunks of that size, the last one padded.

White-box methods read the graph (:mod:`xai_core.onnx.graph`): a layer is a graph tensor
recorded as an extra output of a copy of the model (one cached session per set of layers), the
classifier weights are the head's initializers, and gradients come from re-running the graph's
tail in torch (:mod:`xai_core.onnx.gradients`). The forward itself is always onnxruntime's.

The adapter pickles (to run in a worker process, :mod:`xai_core.core.executors`): what is
kept is the model's path or bytes and the providers asked for; unpickling opens a new session.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xai_core.core.adapters import (
    AttentionGradientResult,
    InputSpec,
    LayerGradientResult,
    LayerRecord,
    ModelAdapter,
    NormParameters,
)
from xai_core.core.errors import (
    CapabilityError,
    LayerNotFoundError,
    LayerTypeError,
    ModelError,
    UnknownLayerError,
    did_you_mean,
)
from xai_core.core.tags import Capability
from xai_core.core.targets import Targets
from xai_core.onnx.gradients import differentiable_forward, edited_tail, tail_gradients
from xai_core.onnx.graph import Graph, Linear, load_proto
from xai_core.onnx.interpreter import constant
from xai_core.onnx.rewrite import fused_attention_error

log = logging.getLogger("xai_core")

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_CACHED_SESSIONS = 4  # sessions with extra outputs kept per adapter (one per set of layers)

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
    """Runs an ONNX model with onnxruntime. When its graph can be read (a path or bytes), it
    also offers layers (graph tensors captured as extra outputs), gradients (the graph's tail
    re-run in torch) and, with a linear head of constant weights, classifier weights."""

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
        self._sessions: dict[frozenset[str], Any] = {}  # least recently used first
        self._sessions_lock = threading.Lock()
        self._default: str | None = None
        self._linear_cache: dict[str, Linear] | None = None
        self.torch_constants: dict[str, torch.Tensor] = {}  # the gradient pass's weights
        self._graph = None
        if self._source is not None:
            try:
                self._graph = Graph(load_proto(self._source))
            except Exception as exc:  # onnxruntime runs it; only the white-box part is lost
                log.warning("ONNX model: forward only, its graph could not be read (%s)", exc)
        caps = {Capability.FORWARD}
        if self._graph is not None:
            caps |= {Capability.LAYERS, Capability.GRADIENTS, Capability.LAYER_EDITS}
            if self._linears():
                caps.add(Capability.CLASSIFIER_WEIGHTS)
            if self._graph.attention() or self._graph.fused:
                caps.add(Capability.ATTENTION)  # fused: refused by name when it is asked for
        self.capabilities = frozenset(caps)

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

    # -- running: the model, or a copy with extra outputs ----------------------------------------

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """onnxruntime's scores; when autograd is recording and the input requires grad, the
        graph re-run in torch from onnxruntime's feeds (:mod:`xai_core.onnx.gradients`)."""
        if inputs.requires_grad and torch.is_grad_enabled() and self._graph is not None:
            return differentiable_forward(self, inputs)
        return self.run_outputs(inputs, [self.output_name])[self.output_name].to(torch.float32)

    def chunks(self, inputs: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
        """``(chunk, kept)``: the batch as the model takes it; a model exported with a fixed
        batch size gets chunks of that size, the last padded (its first ``kept`` rows count)."""
        x = inputs.detach().to(self.torch_dtype).contiguous()
        size = self.fixed_batch
        if size is None:
            yield x, x.shape[0]
            return
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            kept = chunk.shape[0]
            if kept < size:  # pad the last chunk to the exported batch size
                chunk = torch.cat([chunk, chunk[-1:].expand(size - kept, *chunk.shape[1:])])
            yield chunk.contiguous(), kept

    def run_outputs(self, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The values ``names`` (the output, or any layer) for a batch, in the model's dtype."""
        parts = [(self.run_chunk(chunk, names), kept) for chunk, kept in self.chunks(inputs)]
        if self.fixed_batch is None or (len(parts) == 1 and parts[0][1] == self.fixed_batch):
            return parts[0][0]  # one unpadded chunk
        return {name: torch.cat([got[name][:kept] for got, kept in parts]) for name in names}

    def run_chunk(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """One onnxruntime run of the session that outputs ``names`` (cached per set)."""
        wanted = list(dict.fromkeys(names))
        session = self._session_for(wanted)
        if x.device.type == "cuda":
            return self._run_bound(session, x, wanted)
        values = session.run(wanted, {self.input_name: x.numpy()})
        return {
            name: torch.from_numpy(np.ascontiguousarray(v))
            for name, v in zip(wanted, values, strict=True)
        }

    def _session_for(self, names: Sequence[str]) -> Any:
        extra = frozenset(names) - {self.output_name}
        if not extra:
            return self.session_
        with self._sessions_lock:  # explanations in several threads share the cache
            return self._cached_session(extra)

    def _cached_session(self, extra: frozenset[str]) -> Any:
        session = self._sessions.pop(extra, None)
        if session is None:
            data = self.graph().with_outputs(sorted(extra))
            options = _onnxruntime().SessionOptions()
            options.log_severity_level = 3
            providers = self.session_.get_providers()
            session = _onnxruntime().InferenceSession(data, options, providers=providers)
        self._sessions[extra] = session  # most recently used last
        while len(self._sessions) > _CACHED_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return session

    def _run_bound(
        self, session: Any, x: torch.Tensor, names: list[str]
    ) -> dict[str, torch.Tensor]:
        """Run on CUDA memory through I/O binding: the tensors never visit the host."""
        device = x.device.index or 0
        binding = session.io_binding()
        binding.bind_input(
            self.input_name, "cuda", device, self.np_dtype, list(x.shape), x.data_ptr()
        )
        dims = self.output_shape
        if names == [self.output_name] and dims and all(d is not None for d in dims[1:]):
            out = torch.empty((x.shape[0], *dims[1:]), device=x.device, dtype=self.torch_dtype)
            binding.bind_output(
                self.output_name, "cuda", device, self.np_dtype, list(out.shape), out.data_ptr()
            )
            session.run_with_iobinding(binding)
            return {self.output_name: out}
        # Shapes unknown ahead of time: onnxruntime allocates the outputs on the device.
        for name in names:
            binding.bind_output(name, "cuda", device)
        session.run_with_iobinding(binding)
        return {
            name: torch.from_dlpack(value)
            for name, value in zip(names, binding.get_outputs(), strict=True)
        }

    # -- the graph (LayerAccess, ClassifierHead) --------------------------------------------------

    def graph(self) -> Graph:
        if self._graph is None:
            raise CapabilityError(
                "This ONNX model was given as an InferenceSession whose file is not known, so its "
                "graph cannot be read: pass the .onnx path or bytes for layers and gradients."
            )
        return self._graph

    def layer_names(self) -> list[str]:
        return self.graph().layers()

    def layer_table(self) -> list[tuple[str, str, tuple[int | None, ...] | None]]:
        """``(name, operator, shape)`` of every layer (``xai layers model.onnx``)."""
        graph = self.graph()
        return [(n, graph.producer[n].op, graph.shape(n)) for n in graph.layers()]

    def layer_names_of(self, spec: Any) -> list[str]:
        items = [spec] if isinstance(spec, str) else spec
        if isinstance(items, str | bytes) or not isinstance(items, Sequence) or not items:
            raise LayerTypeError(
                f"A layer of an ONNX model is a tensor name (str) or a non-empty list of them; "
                f"got {type(spec).__name__}."
            )
        layers = set(self.layer_names())
        for item in items:
            if not isinstance(item, str):
                raise LayerTypeError(
                    f"A layer of an ONNX model is a tensor name (str); got {type(item).__name__}."
                )
            if item not in layers:
                raise UnknownLayerError(
                    f"The ONNX graph has no layer (a float tensor computed from the input) "
                    f"named {item!r}.{did_you_mean(item, layers)}",
                    "List them with xai_core.adapt(path).layer_names().",
                )
        return list(dict.fromkeys(items))

    def default_layer(self, inputs: torch.Tensor) -> str:
        if self._default is None:
            self._default = self.graph().default_layer()
            log.info(
                "xai-core chose ONNX layer %r (the last feature map before pooling)", self._default
            )
        return self._default

    def extra_tokens(self) -> int | None:
        return None

    def record_layers(
        self, inputs: torch.Tensor, layers: Sequence[str], *, inputs_of: Sequence[str] = ()
    ) -> LayerRecord:
        graph = self.graph()
        sources = {name: self._input_of(name) for name in inputs_of}
        got = self.run_outputs(inputs, [self.output_name, *layers, *sources.values()])
        rank = graph.order.get
        order = [(n, got[n]) for n in sorted(dict.fromkeys(layers), key=lambda n: rank(n, -1))]
        fed = [(n, got[sources[n]]) for n in sorted(sources, key=lambda n: rank(n, -1))]
        return LayerRecord(got[self.output_name].to(torch.float32), order, fed)

    def _input_of(self, name: str) -> str:
        linear = self._linears().get(name)
        if linear is not None:
            return linear.input
        node = self.graph().producer.get(name)
        if node is None or not node.inputs:
            raise LayerNotFoundError(f"No node of the ONNX graph computes {name!r}.")
        return node.inputs[0]

    def _linears(self) -> dict[str, Linear]:
        if self._linear_cache is None:
            self._linear_cache = self.graph().linears() if self._graph is not None else {}
        return self._linear_cache

    def linear_layers(self) -> list[str]:
        return list(self._linears())

    def linear_weights(self, layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        linear = self._linears().get(layer)
        if linear is None:
            raise LayerNotFoundError(
                f"{layer!r} is not a linear layer (Gemm, MatMul) of the graph."
            )
        bias = None if linear.bias is None else constant(linear.bias, self.device)
        return constant(linear.weight, self.device), bias

    def norm_parameters(self, layer: str) -> NormParameters | None:
        found = self.graph().layer_norms().get(layer)
        if found is None:
            return None
        shape, weight, bias, eps = found
        bias = None if bias is None else constant(bias, self.device)
        return NormParameters(shape, constant(weight, self.device), bias, eps)

    # -- gradients (LayerGradients) -------------------------------------------------------------

    def layer_gradients(
        self, inputs: torch.Tensor, layers: Sequence[str], targets: Targets
    ) -> LayerGradientResult:
        """onnxruntime's forward with the layers as extra outputs, then the tail of the graph
        after them re-run in torch (:mod:`xai_core.onnx.gradients`) for the backward passes."""
        return tail_gradients(self, inputs, list(layers), targets)

    def run_with_layer_output(self, inputs, layer, edit, *, variants=1) -> torch.Tensor:
        """``LayerOutputEditing``: the tail after ``layer`` re-run in torch on the edited copies
        (:func:`xai_core.onnx.gradients.edited_tail`)."""
        return edited_tail(self, inputs, layer, edit, variants)

    # -- attention (AttentionAccess, AttentionGradients) -----------------------------------------

    def attention_layers(self) -> list[str]:
        """The outputs of the graph's self-attention softmaxes (:meth:`Graph.attention`);
        ``UnsupportedOperatorError`` naming a fused attention operator the graph still has."""
        graph = self.graph()
        if graph.fused:
            raise fused_attention_error(graph.fused[0], graph.fused_reason(graph.fused[0]))
        return graph.attention()

    def windowed_attention(self) -> str | None:
        return self.graph().windowed_attention()  # a window partition before the attention

    def attention_weights(
        self, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        layers = self.attention_layers()
        # The outputs gradient rollout asks for (the tail's feeds too, a few small tensors):
        # attention maps and gradient rollout then share one session, opened once per model.
        names = [self.output_name, *layers, *self.graph().tail(layers).feeds]
        got = self.run_outputs(inputs, names)
        calls = [(name, _attention_shaped(name, got[name])) for name in layers]
        return got[self.output_name].to(torch.float32), calls

    def attention_gradients(
        self, inputs: torch.Tensor, targets: Targets
    ) -> AttentionGradientResult:
        """The softmax outputs captured, then the tail after them re-run in torch (the whole
        transformer after the first attention) for one backward pass per target."""
        layers = self.attention_layers()
        run = tail_gradients(self, inputs, layers, targets)
        calls = [(name, _attention_shaped(name, run.activations[name])) for name in layers]

        def gradients() -> Iterator[list[torch.Tensor | None]]:
            for grads in run.gradients:
                yield [grads[name] for name in layers]

        return AttentionGradientResult(run.scores, calls, gradients())


def _attention_shaped(name: str, weights: torch.Tensor) -> torch.Tensor:
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise CapabilityError(
            f"The softmax {name!r} of this ONNX graph outputs {tuple(weights.shape)}, not "
            f"attention weights (N, heads, T, T): xai-core reads attention only in that layout."
        )
    return weights
