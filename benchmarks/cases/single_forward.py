"""The methods that cost one forward pass (CAM on ResNet-18 and DenseNet-121, attention rollout
on a ViT), against that forward pass."""

from __future__ import annotations

import torch
from harness import Case, Config, Contender, Row, bound_row, measure
from models import image, make_model

ORDER = 50


def single_forward_case(method: str, model_name: str) -> Case:
    cid = f"{method}/{model_name}"

    def run(cfg: Config) -> list[Row]:
        import xai_core

        model = make_model(model_name, cfg)
        batch = cfg.vit_batch if method == "rollout" else cfg.cam_batch
        x = image(cfg, batch)

        def fwd() -> None:
            with torch.inference_mode():
                model(x)

        bound = Contender("1 forward", fwd, cfg.repeats + 2, warmup=fwd)
        ours = Contender(
            f"xai-core {method}", lambda: xai_core.explain(model, x, method=method), cfg.repeats + 2
        )
        ours.warmup = ours.fn
        measure([bound, ours])
        what = f"{model_name} {cfg.size}px batch {batch}"
        target = "cam-bound" if method == "cam" else None
        return [bound_row(f"{cid}/b{batch}", what, ours, bound, target)]

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [
        single_forward_case("cam", "resnet18"),
        single_forward_case("cam", "densenet121"),
        single_forward_case("rollout", "vit_b_16"),
    ]
