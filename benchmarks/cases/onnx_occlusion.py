"""Occlusion on the ONNX export of ResNet-18 through an onnxruntime ``InferenceSession``, against
the same number of ``session.run`` calls at the best batch size."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from harness import Case, Config, Contender, Row, best_batch, bound_label, bound_row, measure
from models import image, make_model

ORDER = 20


def onnx_case(cfg_window: int, cfg_stride: int) -> Case:
    cid = f"occlusion-onnx/resnet18/w{cfg_window}s{cfg_stride}"

    def run(cfg: Config) -> list[Row]:
        import numpy as np
        import onnxruntime as ort
        from xai_occlusion import default_chunk_size

        import xai_core

        model = make_model("resnet18", cfg)
        x = image(cfg)
        window, stride = cfg_window, cfg_stride
        total = ((cfg.size - window) // stride + 1) ** 2
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "resnet18.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                    dynamo=False,
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        xn = x.numpy()

        def ort_forward(batch: np.ndarray) -> None:
            session.run(["y"], {"x": batch})

        best, speeds = best_batch(lambda b: ort_forward(np.repeat(xn, b, axis=0)), cfg.batch_sizes)
        plain_chunk = default_chunk_size(incremental=False, device=x.device)  # what ours uses
        xb = np.ascontiguousarray(np.repeat(xn, best, axis=0))

        def bound_run() -> None:
            ort_forward(xn)
            for start in range(0, total, best):
                ort_forward(xb[: min(best, total - start)])

        bound = Contender(
            bound_label(total + 1, "onnxruntime runs", best, speeds, plain_chunk),
            bound_run,
            cfg.repeats,
            warmup=bound_run,
        )
        ours = Contender(
            "xai-core k1 (onnxruntime)",
            lambda: xai_core.explain(
                session,
                x,
                method="occlusion",
                targets=0,
                window=window,
                stride=stride,
            ),
            cfg.repeats,
        )
        ours.warmup = ours.fn
        measure([bound, ours])
        what = f"ONNX resnet18 {cfg.size}px, window {window} stride {stride}, 1 target"
        return [bound_row(f"{cid}/k1", what, ours, bound, "onnx-bound")]

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [onnx_case(*cfg.windows[-1])]
