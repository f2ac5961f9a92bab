"""Gradients of target scores with respect to tensors of an ONNX graph (Grad-CAM on ONNX).

onnxruntime has no backward pass for inference graphs, so the forward runs on onnxruntime with
the layers as extra outputs, and only the *tail* of the graph (the nodes from those tensors to
the output) runs again in torch, through :mod:`xai_core.onnx.interpreter`, from the tensors
onnxruntime computed; autograd then differentiates it, one backward pass per target through the
retained graph. The tail's scores must equal onnxruntime's (else the interpreter would explain
another function than the deployed one): a difference beyond float rounding is an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from xai_core.core.adapters import LayerGradientResult
from xai_core.core.errors import CapabilityError
from xai_core.core.targets import Targets
from xai_core.onnx.interpreter import check_supported, run, shared_constant

if TYPE_CHECKING:
    from xai_core.onnx.adapter import OnnxAdapter

# The tail recomputes the scores in another order of float operations than onnxruntime's
# kernels (fused convolutions, other GEMM blocking): equal up to this relative tolerance.
SCORE_TOLERANCE = 1e-3


def tail_gradients(
    adapter: OnnxAdapter, inputs: torch.Tensor, layers: list[str], targets: Targets
) -> LayerGradientResult:
    graph = adapter.graph()
    tail = graph.tail(layers)
    check_supported(tail.nodes)  # before any work: a typed error naming the operator
    constants = _constants(adapter, tail)
    output = adapter.output_name
    runs = []  # per chunk: (kept rows, onnxruntime's values, the tail's values)
    for chunk, kept in adapter.chunks(inputs):
        fetched = adapter.run_chunk(chunk, [output, *layers, *tail.feeds])
        values: dict[str, torch.Tensor] = {**constants, graph.input: chunk}
        for name in tail.feeds:
            value = fetched[name]
            if name in layers and value.is_floating_point():
                value = value.detach().clone().requires_grad_(True)  # a leaf of the tail
            values[name] = value
        with torch.enable_grad():
            run(tail.nodes, values)
        runs.append((kept, fetched, values))

    scores = torch.cat([f[output][:k] for k, f, _ in runs]).to(torch.float32)
    if all(output in v for _, _, v in runs):  # re-run, or itself a layer (then a leaf)
        recomputed = torch.cat([v[output][:k] for k, _, v in runs]).to(torch.float32)
        if tail.nodes:
            _check_scores(recomputed.detach(), scores, tail.nodes)
    else:
        recomputed = scores
    chosen = targets.resolve(scores).select(recomputed)  # (N, K), differentiable
    # The tensor of each layer the scores depend on in torch's graph, per chunk.
    live = [
        name
        for name in layers
        if all(isinstance(v.get(name), torch.Tensor) and v[name].requires_grad for _, _, v in runs)
    ]
    tensors = [v[name] for name in live for _, _, v in runs]

    def gradients() -> Iterator[dict[str, torch.Tensor | None]]:
        for k in range(chosen.shape[1]):
            grads = (
                torch.autograd.grad(
                    chosen[:, k].sum(), tensors, retain_graph=True, allow_unused=True
                )
                if tensors
                else []
            )
            found: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
            for i, name in enumerate(live):
                per_chunk = grads[i * len(runs) : (i + 1) * len(runs)]
                if any(g is None for g in per_chunk):
                    continue  # the score does not depend on this layer
                found[name] = torch.cat(
                    [g[:k_] for g, (k_, _, _) in zip(per_chunk, runs, strict=True)]
                )
            yield found

    activations = {name: torch.cat([f[name][:k] for k, f, _ in runs]).detach() for name in layers}
    return LayerGradientResult(
        scores=scores.detach(),
        activations=activations,
        calls=dict.fromkeys(layers, 1),
        gradients=gradients(),
    )


def differentiable_forward(adapter: OnnxAdapter, inputs: torch.Tensor) -> torch.Tensor:
    """Scores that autograd can take back to ``inputs`` (``Capability.GRADIENTS``): the whole
    graph re-run in torch, checked against onnxruntime's scores of the same batch."""
    graph = adapter.graph()
    tail = graph.tail([graph.input])
    check_supported(tail.nodes)
    constants = _constants(adapter, tail)
    output = adapter.output_name
    x = inputs.to(adapter.torch_dtype)
    size = adapter.fixed_batch or x.shape[0]
    parts, reference = [], []
    for start in range(0, x.shape[0], size):
        chunk = x[start : start + size]
        kept = chunk.shape[0]
        if kept < size:  # a fixed batch size: pad (differentiably), then drop the padding
            chunk = torch.cat([chunk, chunk[-1:].expand(size - kept, *chunk.shape[1:])])
        feeds = [f for f in tail.feeds if f != graph.input]
        fetched = adapter.run_chunk(chunk.detach().contiguous(), [output, *feeds])
        values = {**constants, **{f: fetched[f] for f in feeds}, graph.input: chunk}
        run(tail.nodes, values)
        parts.append(values[output][:kept])
        reference.append(fetched[output][:kept])
    scores = torch.cat(parts).to(torch.float32)
    _check_scores(scores.detach(), torch.cat(reference).to(torch.float32), tail.nodes)
    return scores


def _constants(adapter: OnnxAdapter, tail) -> dict[str, torch.Tensor]:
    """The graph's constants the tail reads, as torch tensors on the adapter's device (cached:
    a network's weights are converted once)."""
    cache = adapter.torch_constants
    graph = adapter.graph()
    for node in tail.nodes:
        for name in node.inputs:
            if name and name in graph.constants and name not in cache:
                cache[name] = shared_constant(graph.constants[name], adapter.device)
    return cache


def _check_scores(recomputed: torch.Tensor, scores: torch.Tensor, nodes) -> None:
    error = float((recomputed - scores).abs().max()) if scores.numel() else 0.0
    scale = 1.0 + float(scores.abs().max()) if scores.numel() else 1.0
    if not error <= SCORE_TOLERANCE * scale:  # also catches NaN
        ops = sorted({n.op for n in nodes})
        raise CapabilityError(
            f"Re-running the graph after the chosen layers in torch gives scores {error:.3g} "
            f"away from onnxruntime's (tolerance {SCORE_TOLERANCE * scale:.3g}): one of the "
            f"operators {ops} behaves differently in xai-core's ONNX interpreter, so its "
            f"gradients would explain another function. Please report it; meanwhile use a "
            f"method without gradients (cam, occlusion)."
        )


def edited_tail(
    adapter: OnnxAdapter, inputs: torch.Tensor, layer: str, edit, variants: int
) -> torch.Tensor:
    """``LayerOutputEditing`` on ONNX (Ablation-CAM, Recipro-CAM): onnxruntime runs the graph
    once per chunk with ``layer`` and the tail's other feeds as extra outputs; the tail then runs
    in torch, first unedited (checked against onnxruntime's scores like the gradients' tail),
    then on ``edit(A)``, ``variants`` copies per sample. Floating feeds from before the layer
    that carry the batch (a residual) are repeated per copy. A tail whose shapes are fixed to
    the batch it was given (a ``Reshape`` to an upstream ``Shape``) fails on the copies: that is
    a ``CapabilityError`` naming the layer."""
    graph = adapter.graph()
    tail = graph.tail([layer])
    check_supported(tail.nodes)
    constants = _constants(adapter, tail)
    output = adapter.output_name
    parts = []
    for chunk, kept in adapter.chunks(inputs):
        fetched = adapter.run_chunk(chunk, [output, layer, *tail.feeds])
        plain = run(tail.nodes, {**constants, **{f: fetched[f] for f in tail.feeds}})
        _check_scores(plain[output].to(torch.float32), fetched[output].to(torch.float32),
                      tail.nodes)
        values = dict(constants)
        for name in tail.feeds:
            value = fetched[name]
            if name == layer:
                value = edit(value[:kept])
            elif value.is_floating_point() and value.ndim and value.shape[0] == chunk.shape[0]:
                value = value[:kept].repeat_interleave(variants, 0)
            values[name] = value
        try:
            scores = run(tail.nodes, values)[output]
        except (RuntimeError, IndexError, ValueError) as error:
            raise CapabilityError(
                f"The ONNX graph after layer {layer!r} depends on the batch size it was run with "
                f"({type(error).__name__}: {error}); edited copies of that layer's output cannot "
                f"go through it. Choose a layer nearer the output."
            ) from error
        parts.append(scores)
    return torch.cat(parts).to(torch.float32)
