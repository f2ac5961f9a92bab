"""ViT-B/16 on ONNX: what opening the file and capturing tensors cost, and the attention methods
on the ONNX file vs the same methods on the PyTorch model.

    python benchmarks/onnx_vit.py            # ViT-B/16 (random weights), 224 px, batch 2
    python benchmarks/onnx_vit.py --size 64  # 4 x 4 patches (the test's size)

Set-up, each measured in this run against the straightforward way (ratios < 1: ours faster):

* shape inference: onnx's ``infer_shapes`` on the whole model (it serialises the weights twice)
  vs on a copy without the weights' bytes (``xai_core.onnx.graph._inferred``);
* a copy with extra outputs: ``CopyFrom`` + ``SerializeToString`` of the whole model per set of
  layers vs the model's bytes serialised once, followed by a message holding only the outputs
  (``Graph.with_outputs``).

Then each attention method once on a warm adapter (its session for the layers opened), ONNX vs
PyTorch, and the first call (which opens the session).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import onnx
import torch
from onnx import ModelProto, helper
from torchvision.models.vision_transformer import VisionTransformer

import xai_core
from xai_core.onnx.graph import Graph, _inferred

METHODS = [
    ("attention", {}),
    ("rollout", {}),
    ("grad_rollout", {"targets": [[1, 3], [2, 2]]}),
    ("gradcam", {"targets": [[1, 3], [2, 2]]}),
]


def export(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), buffer, input_names=["x"], output_names=["scores"],
            dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return buffer.getvalue()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_with_outputs(proto: ModelProto, names: list[str]) -> bytes:
    """The straightforward copy with extra outputs (what the adapter did before)."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    for name in names:
        copy.graph.output.append(helper.make_tensor_value_info(name, 1, None))
    return copy.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = VisionTransformer(args.size, 16, 12, 12, 768, 3072).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    data = export(model, x)
    print(f"ViT-B/16, {args.size} px, batch 2, model {len(data) / 2**20:.0f} MiB")

    proto = onnx.load_model_from_string(data)
    whole = timed(lambda: onnx.shape_inference.infer_shapes(proto), args.repeats)
    lite = timed(lambda: _inferred(onnx.load_model_from_string(data)), args.repeats)
    parse = timed(lambda: onnx.load_model_from_string(data), args.repeats)
    lite -= parse  # _inferred is timed on a freshly parsed model: take the parse out
    print(f"shape inference: whole model {whole:.2f} s, without weights {lite:.2f} s "
          f"({lite / whole:.2f}x)")  # fmt: skip

    graph = Graph(_inferred(onnx.load_model_from_string(data)))
    names = graph.attention()
    graph.with_outputs(names)  # the one serialisation, paid by the first copy
    old = timed(lambda: copy_with_outputs(graph.proto, names), args.repeats)
    new = timed(lambda: graph.with_outputs(names), args.repeats)
    print(f"copy with 12 extra outputs: CopyFrom + serialise {old:.2f} s, bytes + outputs "
          f"{new:.2f} s ({new / old:.2f}x)")  # fmt: skip

    start = time.perf_counter()
    adapter = xai_core.adapt(data)
    print(f"xai_core.adapt(ViT-B/16 bytes): {time.perf_counter() - start:.2f} s")
    print("| method | first ONNX call (s) | ONNX (s) | PyTorch (s) | ONNX / PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    for method, options in METHODS:
        start = time.perf_counter()
        xai_core.explain(adapter, x, method=method, **options)
        first = time.perf_counter() - start
        on_onnx = timed(lambda m=method, o=options: xai_core.explain(adapter, x, method=m, **o),
                        args.repeats)  # fmt: skip
        on_torch = timed(lambda m=method, o=options: xai_core.explain(model, x, method=m, **o),
                         args.repeats)  # fmt: skip
        print(f"| {method} | {first:.2f} | {on_onnx:.2f} | {on_torch:.2f} | "
              f"{on_onnx / on_torch:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
