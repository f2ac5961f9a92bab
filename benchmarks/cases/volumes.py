"""3D volumes: occlusion and Grad-CAM on a small 3D CNN, with the contenders of the 2D cases."""

from __future__ import annotations

from harness import CLASSES, Case, Config, K, Row, bound_row, measure, peer_row
from models import make_model, volume

from cases.gradcam import gradcam_run
from cases.occlusion import captum_contender, monai_contender, occlusion_bound, occlusion_contenders

ORDER = 60


def occlusion3d_case() -> Case:
    cid = "occlusion3d/conv3d"

    def run(cfg: Config) -> list[Row]:
        model = make_model("conv3d", cfg)
        x = volume(cfg)
        window, stride = cfg.volume_window
        total = ((cfg.volume - window) // stride + 1) ** 3
        what = f"3D CNN {cfg.volume}^3, window {window} stride {stride} ({total} windows)"
        bound, best, _ = occlusion_bound(model, x, total, cfg)
        ours1, ours5, plain = occlusion_contenders(model, x, window, stride, cfg, best)
        bound.warmup = bound.fn
        capc = captum_contender(model, x, window, stride, CLASSES, cfg.chunk, cfg)
        mon = monai_contender(model, x, window, stride, cfg)
        measure([bound, ours1, ours5, *plain, capc, mon])
        return [
            bound_row(f"{cid}/k1", what + ours1.mode, ours1, bound, None),
            *[bound_row(f"{cid}/{p.tag}", what + p.mode, p, bound, None) for p in plain],
            bound_row(f"{cid}/k{K}", what + ours5.mode, ours5, bound, None),
            peer_row(f"{cid}/k{K}", what + f", {K} targets (loop over {K} targets)", ours5, capc),
            peer_row(f"{cid}/k{K}", what + f", {K} targets (all classes at once)", ours5, mon),
        ]

    return Case(cid, run)


def gradcam3d_case() -> Case:
    cid = "gradcam3d/conv3d"

    def run(cfg: Config) -> list[Row]:
        model = make_model("conv3d", cfg)
        x = volume(cfg, cfg.volume_batch)
        layers = ["stage1", "stage2", "stage3"]
        what = f"3D CNN {cfg.volume}^3 batch {x.shape[0]}, 3 stages x {K} classes"
        return gradcam_run(cid, model, x, layers, what, cfg, targets=False)

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [occlusion3d_case(), gradcam3d_case()]
