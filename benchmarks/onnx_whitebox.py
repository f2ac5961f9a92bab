"""Grad-CAM and CAM on an ONNX file: xai-core vs their bound and vs the same method on PyTorch.

    python benchmarks/onnx_whitebox.py            # ResNet-18, 224 px, batch 8 (docs/performance.md)
    python benchmarks/onnx_whitebox.py --quick    # 64 px, batch 2, one repeat (smoke test)

The *bound* is the work no ONNX Grad-CAM can avoid, written by hand with onnxruntime and torch:
one onnxruntime run of a session that outputs the feature map too, then the head (global average
pooling and the linear layer, its weights read from the file) in torch with one backward pass
per target, and the map; for CAM the same run and one weighted sum. xai-core adds finding the
layers, the tail interpreter, the check of its scores against onnxruntime's, and the result
contract. Contenders run interleaved (repeat r of each before repeat r + 1 of any); medians.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnx import helper, numpy_helper

import xai_core

LAYER = "/layer4/layer4.1/relu_1/Relu_output_0"  # the TorchScript exporter's name for layer4


def export(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            buffer,
            input_names=["x"],
            output_names=["scores"],
            dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def bound(data: bytes, threads: int):
    """Hand-written ONNX Grad-CAM and CAM: one session with the feature map as an output."""
    proto = onnx.load_model_from_string(data)
    proto.graph.output.append(helper.make_tensor_value_info(LAYER, 1, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    initializers = proto.graph.initializer
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in initializers}
    w, b = weights[gemm.input[1]], weights[gemm.input[2]]

    def gradcam(x: torch.Tensor, targets: list[int]) -> torch.Tensor:
        _, a = session.run(["scores", LAYER], {"x": x.numpy()})
        a = torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)
        scores = torch.nn.functional.linear(a.mean((2, 3)), w, b)
        maps = []
        for k in targets:
            (g,) = torch.autograd.grad(scores[:, k].sum(), a, retain_graph=True)
            maps.append(torch.einsum("nc,nchw->nhw", g.mean((2, 3)), a.detach()).clamp(min=0))
        return torch.stack(maps, 1)

    def cam(x: torch.Tensor, targets: list[int]) -> torch.Tensor:
        _, a = session.run(["scores", LAYER], {"x": x.numpy()})
        return torch.einsum("kc,nchw->nkhw", w[targets], torch.from_numpy(a))

    return gradcam, cam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 2, one repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, batch = (64, 2) if args.quick else (224, 8)
    repeats = args.repeats or (1 if args.quick else 7)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    data = export(model, x)
    adapter = xai_core.adapt(data, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    bound_gradcam, bound_cam = bound(data, args.threads)

    print(f"ResNet-18, {size} px, batch {batch}, {args.threads} threads, median of {repeats}")
    print("| case | xai-core ONNX (s) | bound (s) | ratio | xai-core torch (s) | ONNX / torch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, k in (("gradcam", 1), ("gradcam", 5), ("cam", 1), ("cam", 5)):
        targets = list(range(k))
        per_sample = [targets] * batch
        hand = bound_gradcam if method == "gradcam" else bound_cam
        options = {"method": method, "targets": per_sample}
        contenders = {
            "onnx": lambda o=options: xai_core.explain(adapter, x, **o),
            "bound": lambda h=hand, t=targets: h(x, t),
            "torch": lambda o=options: xai_core.explain(model, x, **o),
            "forward": lambda: plain.run(["scores"], {"x": x.numpy()}),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for fn in contenders.values():
            fn()  # warm-up: sessions, the CAM probe, caches
        for _ in range(repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ratios = [o / b for o, b in zip(times["onnx"], times["bound"], strict=True)]
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"| {method} k={k} | {med['onnx']:.3f} | {med['bound']:.3f} | "
            f"{statistics.median(ratios):.2f}x | {med['torch']:.3f} | "
            f"{med['onnx'] / med['torch']:.2f}x |"
        )
    print(f"(onnxruntime forward alone: {med['forward']:.3f} s)")


if __name__ == "__main__":
    main()
