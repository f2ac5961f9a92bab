"""Occlusion on 2D images (ResNet-18, DenseNet-121; two window sizes), 1 and K targets, against
its bound (the same forward passes at the model's best batch size), Captum and MONAI. The
bound and peer contenders here serve the 3D and memory cases too."""

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
    best_batch,
    bound_label,
    bound_row,
    log,
    measure,
    missing,
    peer,
    peer_row,
    timed_laps,
)
from models import image, make_model
from torch import nn

ORDER = 10


def forwards(model: Callable[[torch.Tensor], Any], x: torch.Tensor, total: int, batch: int):
    """Occlusion's bound: the unperturbed forward, then ``total`` inputs ``batch`` at a time."""
    xb = x[:1].expand(batch, *x.shape[1:]).contiguous()

    def run() -> None:
        with torch.inference_mode():
            model(x)
            for start in range(0, total, batch):
                model(xb[: min(batch, total - start)])

    return run


def occlusion_contenders(
    model: nn.Module, x: torch.Tensor, window: int, stride: int, cfg: Config, best: int
) -> tuple[Contender, Contender, list[Contender]]:
    """xai-core's occlusion with its defaults for 1 and K targets, and plain occlusion for 1
    target (the path the bound describes) when the plugin chose incremental inference (an option
    of newer xai-occlusion), also with ``chunk_size`` = the bound's best batch when that differs
    from the default: the gap between the two is the chunk size's, not the plugin's. The first
    call (tracing, caches) is the warm-up."""
    from xai_occlusion import default_chunk_size

    import xai_core

    def call(targets: Any, chunk: int | None = None, **extra: Any) -> Callable[[], Any]:
        sized = {} if chunk is None else {"chunk_size": chunk}  # None: the plugin's default
        return lambda: xai_core.explain(
            model,
            x,
            method="occlusion",
            targets=targets,
            window=window,
            stride=stride,
            **sized,
            **extra,
        )

    first = call(0)()
    plan = first.details.get("incremental") or {"mode": "off"}
    mode = "" if plan.get("mode", "off") == "off" else f", incremental {plan['mode']}"
    ours1 = Contender(f"xai-core k1{mode}", call(0), cfg.repeats)
    ours5 = Contender(f"xai-core k{K}{mode}", call([CLASSES]), cfg.repeats, warmup=call([CLASSES]))
    ours1.mode, ours1.tag = f", 1 target{mode}", "k1"
    ours5.mode, ours5.tag = f", {K} targets{mode}", f"k{K}"
    plain = []
    off = {"incremental": False} if mode else {}
    plain_chunk = default_chunk_size(incremental=False, device=x.device)
    chunks: list[int | None] = [None] if mode else []  # plain occlusion at its default
    chunks += [best] if best != plain_chunk else []
    for chunk in chunks:
        extra = "" if chunk is None else f", chunk_size={chunk}"
        how = (", incremental=False" if off else "") + extra
        c = Contender(f"xai-core k1{how}", call(0, chunk, **off), cfg.repeats)
        c.mode = f", 1 target{how}"
        c.tag = "k1" + ("-plain" if off else "") + (f"-chunk{chunk}" if extra else "")
        plain.append(c)
    log(f"    xai-core occlusion: {plan}")
    return ours1, ours5, plain




def occlusion_bound(
    model: nn.Module, x: torch.Tensor, total: int, cfg: Config
) -> tuple[Contender, int, Callable[[int], None]]:
    """The bound of ``total`` windows (its warm-up is the caller's), the model's best batch size
    and the forward of a batch of ``b`` copies of ``x``."""

    def fwd(b: int) -> None:
        with torch.inference_mode():
            model(x.expand(b, *[-1] * (x.ndim - 1)))

    best, speeds = best_batch(fwd, cfg.batch_sizes)
    bound = Contender(
        bound_label(total + 1, "forwards", best, speeds, cfg.chunk),
        forwards(model, x, total, best),
        cfg.repeats,
    )
    return bound, best, fwd


def captum_contender(
    model: nn.Module,
    x: torch.Tensor,
    window: int,
    stride: int,
    targets: Sequence[int],
    ppe: int,
    cfg: Config,
) -> Contender:
    """Captum's ``Occlusion`` called once per target (its loop over the classes), every call
    timed (the laps), ``ppe`` perturbations per evaluation."""
    captum = peer("captum.attr")
    channels, rank = x.shape[1], x.ndim - 2

    def run_loop() -> list[float]:
        occ = captum.Occlusion(model)
        return timed_laps(
            [
                lambda c=c: occ.attribute(
                    x,
                    sliding_window_shapes=(channels, *[window] * rank),
                    strides=(channels, *[stride] * rank),
                    baselines=0.0,
                    target=c,
                    perturbations_per_eval=ppe,
                )
                for c in targets
            ]
        )

    label = "captum Occlusion (default ppe=1)" if ppe == 1 else f"captum Occlusion (ppe={ppe})"
    return Contender(label, captum and run_loop, cfg.slow_repeats, missing=missing(captum))


def monai_contender(
    model: nn.Module, x: torch.Tensor, window: int, stride: int, cfg: Config
) -> Contender:
    """MONAI's ``OcclusionSensitivity``: every class scored in one pass, ``cfg.chunk`` a batch."""
    monai = peer("monai.visualize")

    def monai_run() -> None:
        monai.OcclusionSensitivity(
            model,
            mask_size=window,
            n_batch=cfg.chunk,
            verbose=False,
            mode=0.0,
            overlap=1 - stride / window,
            activate=False,
        )(x)

    return Contender(
        f"MONAI OcclusionSensitivity (n_batch={cfg.chunk})",
        monai and monai_run,
        cfg.slow_repeats,
        missing=missing(monai),
    )


def occlusion_case(model_name: str, window: int, stride: int) -> Case:
    cid = f"occlusion/{model_name}/w{window}s{stride}"

    def run(cfg: Config) -> list[Row]:
        model = make_model(model_name, cfg)
        x = image(cfg)
        positions = (cfg.size - window) // stride + 1
        total = positions**2
        what = f"{model_name} {cfg.size}px, window {window} stride {stride} ({total} windows)"
        bound, best, fwd = occlusion_bound(model, x, total, cfg)
        ours1, ours5, plain = occlusion_contenders(model, x, window, stride, cfg, best)
        warm = [
            lambda: fwd(1),
            lambda: fwd(cfg.chunk),
            lambda: fwd(total % cfg.chunk or cfg.chunk),
            lambda: fwd(total % best or best),
        ]
        bound.warmup = lambda: [w() for w in warm]
        timed_targets = CLASSES[: cfg.peer_targets.get(cid, K)]
        scale = K / len(timed_targets)
        captum = [
            captum_contender(model, x, window, stride, timed_targets, ppe, cfg)
            for ppe in (1, cfg.chunk)
        ]
        mon = monai_contender(model, x, window, stride, cfg)
        measure([bound, ours1, ours5, *plain, *captum, mon])
        note = "~" if scale != 1 else ""
        loop = f"{what}, {K} targets (loop over {K} targets)"
        return [
            bound_row(f"{cid}/k1", what + ours1.mode, ours1, bound, "occlusion-k1-bound"),
            *[
                bound_row(f"{cid}/{p.tag}", what + p.mode, p, bound, "occlusion-k1-bound")
                for p in plain
            ],
            bound_row(f"{cid}/k{K}", what + ours5.mode, ours5, bound, None),
            *[peer_row(f"{cid}/k1", what + ", 1 target", ours1, c, lap=True) for c in captum],
            peer_row(f"{cid}/k1", what + ", 1 target", ours1, mon),
            *[
                peer_row(
                    f"{cid}/k{K}",
                    loop,
                    ours5,
                    c,
                    target="occlusion-k5-peer",
                    scale=scale,
                    note=note,
                )
                for c in captum
            ],
            peer_row(f"{cid}/k{K}", what + f", {K} targets (all classes at once)", ours5, mon),
        ]

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [
        occlusion_case(model_name, window, stride)
        for model_name in ("resnet18", "densenet121")
        for window, stride in cfg.windows
    ]
