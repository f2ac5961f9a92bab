"""Grad-CAM on DenseNet-121 (4 dense blocks x K classes) against its bound (one forward, one
backward per target), pytorch-grad-cam and Captum. The contenders serve the 3D case too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from harness import (
    CLASSES,
    Case,
    Config,
    Contender,
    K,
    Row,
    bound_row,
    measure,
    missing,
    peer,
    peer_row,
    timed_laps,
)
from models import image, make_model
from torch import nn

ORDER = 40


def gradcam_bound(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> Callable[[], None]:
    """One forward pass recording the layers, then one backward pass per target down to them."""
    modules = dict(model.named_modules())

    def run() -> None:
        acts: list[torch.Tensor] = []
        handles = [modules[n].register_forward_hook(lambda m, a, o: acts.append(o)) for n in layers]
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            scores = model(x.detach().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.requires_grad_(True)
        for k in CLASSES:
            torch.autograd.grad(scores[:, k].sum(), acts, retain_graph=k < CLASSES[-1])

    return run


def gradcam_contenders(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str], cfg: Config
) -> list[Contender]:
    import xai_core

    modules = dict(model.named_modules())
    n = x.shape[0]
    ours = Contender(
        f"xai-core ({len(layers)} layers x {K} targets)",
        lambda: xai_core.explain(
            model, x, method="gradcam", targets=[CLASSES] * n, layers=list(layers)
        ),
        cfg.repeats,
    )
    bound = Contender(f"1 forward + {K} backwards", gradcam_bound(model, x, layers), cfg.repeats)
    ours.warmup, bound.warmup = ours.fn, bound.fn
    pgc = peer("pytorch_grad_cam")
    captum = peer("captum.attr")

    def per_layer_and_class(
        make: Callable[[nn.Module], Any], call: Callable[[Any, int], Any], few: bool
    ) -> list[Callable[[], Any]]:
        """A peer's loop: one explainer per layer (``make``), one ``call`` per class; ``few``:
        the first layer and class only (the warm-up)."""
        calls: list[Callable[[], Any]] = []
        classes = CLASSES[:1] if few else CLASSES
        for name in layers[:1] if few else layers:
            explainer = make(modules[name])
            calls += [lambda e=explainer, c=c: call(e, c) for c in classes]
        return calls

    def pgc_loop(few: bool = False) -> list[float]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        calls = per_layer_and_class(
            lambda m: pgc.GradCAM(model=model, target_layers=[m]),
            lambda cam, c: cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * n),
            few,
        )
        try:
            return timed_laps(calls)
        finally:
            model.zero_grad(set_to_none=True)  # its backward fills the parameters' .grad

    def captum_loop(few: bool = False) -> list[float]:
        return timed_laps(
            per_layer_and_class(
                lambda m: captum.LayerGradCam(model, m),
                lambda lgc, c: lgc.attribute(x, target=c, relu_attributions=True),
                few,
            )
        )

    def peer_contender(
        label: str, module: Any, loop: Callable[..., list[float]]
    ) -> Contender:
        return Contender(
            f"{label} (loop: {len(layers)} layers x {K} classes)",
            module and loop,
            cfg.slow_repeats,
            warmup=lambda: loop(few=True),
            missing=missing(module),
        )

    return [
        ours,
        bound,
        peer_contender("pytorch-grad-cam GradCAM", pgc, pgc_loop),
        peer_contender("captum LayerGradCam", captum, captum_loop),
    ]


def gradcam_rows(cid: str, what: str, contenders: list[Contender], targets: bool) -> list[Row]:
    ours, bound, *peers = contenders
    rows = [bound_row(cid, what, ours, bound, "gradcam-bound" if targets else None)]
    ran = [p for p in peers if p.status is None and p.median is not None]
    fastest = min(ran, key=lambda p: p.median) if ran else None
    for p in peers:
        target = "gradcam-peer" if targets and p is fastest else None
        rows.append(peer_row(cid, what, ours, p, target=target))
    return rows


def gradcam_run(
    cid: str,
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    what: str,
    cfg: Config,
    targets: bool,
) -> list[Row]:
    """Time the contenders of one case; its rows (``targets``: checked against TARGETS)."""
    contenders = gradcam_contenders(model, x, layers, cfg)
    measure(contenders)
    return gradcam_rows(f"{cid}/b{x.shape[0]}", what, contenders, targets=targets)


def gradcam_case() -> Case:
    cid = "gradcam/densenet121"

    def run(cfg: Config) -> list[Row]:
        model = make_model("densenet121", cfg)
        x = image(cfg, cfg.gradcam_batch)
        layers = [f"features.denseblock{i}" for i in range(1, 5)]
        what = f"densenet121 {cfg.size}px batch {x.shape[0]}, 4 dense blocks x {K} classes"
        return gradcam_run(cid, model, x, layers, what, cfg, targets=True)

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [gradcam_case()]
