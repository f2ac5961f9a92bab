"""Score-CAM and Ablation-CAM on ResNet-18 against pytorch-grad-cam's ``ScoreCAM`` and
``AblationCAM`` at ``layer4`` (512 channels), one target, two images.

Score-CAM cannot avoid its work: every channel's mask is a forward pass of the whole model on a
masked image, in both libraries (the same 32 masked copies per pass). Ablation-CAM can: the
ablated copies of the layer's output need only the part of the model after the layer, which
xai-core runs on them (``LayerOutputEditing``); pytorch-grad-cam runs the whole model once per
channel (its default 32 copies per pass) with the layer's output swapped in.
"""

from __future__ import annotations

from typing import Any

from harness import Case, Config, Contender, Row, measure, missing, peer, peer_row
from models import image, make_model

ORDER = 46
LAYER = "layer4"
TARGET = 3
MASKS_PER_PASS = 32  # Score-CAM: masked images per forward pass, both libraries


def _pgc_call(pgc: Any, cls_name: str, model: Any, x: Any, batch: int | None) -> Any:
    """One pytorch-grad-cam call as its users make it (hooks released afterwards)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def call() -> None:
        cam = getattr(pgc, cls_name)(model=model, target_layers=[getattr(model, LAYER)])
        if batch is not None:
            cam.batch_size = batch
        try:
            cam(input_tensor=x, targets=[ClassifierOutputTarget(TARGET)] * x.shape[0])
        finally:
            cam.activations_and_grads.release()

    return call


def cam_peer_case(method: str, cls_name: str, ours_options: dict[str, Any],
                  peer_batch: int | None) -> Case:
    cid = f"{method}/resnet18"

    def run(cfg: Config) -> list[Row]:
        import xai_core

        model = make_model("resnet18", cfg).eval()
        n = 1 if cfg.quick else 2
        x = image(cfg, n)
        pgc = peer("pytorch_grad_cam")

        def fn() -> None:
            xai_core.explain(model, x, method=method, targets=TARGET, layer=LAYER,
                             **ours_options)

        options = ", ".join(f"{k}={v}" for k, v in ours_options.items()) or "defaults"
        ours = Contender(f"xai-core ({options})", fn, cfg.repeats, warmup=fn)
        batch = f"batch_size={peer_batch}" if peer_batch else "default batch_size=32"
        theirs = Contender(
            f"pytorch-grad-cam {cls_name} ({batch})",
            pgc and _pgc_call(pgc, cls_name, model, x, peer_batch),
            cfg.slow_repeats,
            missing=missing(pgc),
        )
        measure([ours, theirs])
        channels = model.fc.in_features
        what = f"resnet18 {cfg.size}px batch {n}, {LAYER} ({channels} channels), 1 target"
        return [peer_row(f"{cid}/b{n}", what, ours, theirs)]

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [
        cam_peer_case("scorecam", "ScoreCAM", {"batch_size": MASKS_PER_PASS}, MASKS_PER_PASS),
        cam_peer_case("ablationcam", "AblationCAM", {}, None),
    ]
