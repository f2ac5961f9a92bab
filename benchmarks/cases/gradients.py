"""Integrated Gradients on ResNet-18 against Captum's ``IntegratedGradients`` at the same steps,
rule, baseline and batch of path points: one target, and K targets (Captum: one call per
class; ours: the path's forward passes shared, one backward per target)."""

from __future__ import annotations

from harness import (
    CLASSES,
    Case,
    Config,
    Contender,
    K,
    Row,
    measure,
    missing,
    peer,
    peer_row,
    timed_laps,
)
from models import image, make_model

ORDER = 45
CHUNK = 32  # path points per forward pass, both libraries (Captum: internal_batch_size)


def ig_case() -> Case:
    cid = "integrated-gradients/resnet18"

    def run(cfg: Config) -> list[Row]:
        import xai_core

        model = make_model("resnet18", cfg).eval()
        x = image(cfg, cfg.gradcam_batch)
        n, steps = x.shape[0], 8 if cfg.quick else 32
        captum = peer("captum.attr")

        def ours(targets: list[int]) -> Contender:
            fn = lambda: xai_core.explain(  # noqa: E731
                model,
                x,
                method="integrated-gradients",
                targets=[targets] * n,
                steps=steps,
                rule="gauss-legendre",
                chunk=CHUNK,
            )
            return Contender(f"xai-core ({len(targets)} targets)", fn, cfg.repeats, warmup=fn)

        def theirs(classes: list[int]) -> Contender:
            ig = captum and captum.IntegratedGradients(model)

            def loop() -> list[float]:
                return timed_laps(
                    [
                        lambda c=c: ig.attribute(
                            x,
                            target=c,
                            n_steps=steps,
                            method="gausslegendre",
                            internal_batch_size=CHUNK,
                        )
                        for c in classes
                    ]
                )

            return Contender(
                f"captum IntegratedGradients (loop: {len(classes)} classes)",
                captum and loop,
                cfg.slow_repeats,
                warmup=captum and loop,
                missing=missing(captum),
            )

        one, many = ours(CLASSES[:1]), ours(CLASSES)
        peer_one, peer_many = theirs(CLASSES[:1]), theirs(CLASSES)
        measure([one, many, peer_one, peer_many])
        what = f"resnet18 {cfg.size}px batch {n}, {steps} Gauss-Legendre steps"
        return [
            peer_row(f"{cid}/b{n}/k1", what + ", 1 target", one, peer_one),
            peer_row(f"{cid}/b{n}/k{K}", what + f", {K} targets", many, peer_many),
        ]

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [ig_case()]
