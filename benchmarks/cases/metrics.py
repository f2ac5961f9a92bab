"""The metrics of xai-metrics against Quantus 0.6.0's loops on the same model, inputs, maps and
work: one row per metric, the speed-up per sample (the same batch for both, so the batch's
ratio is the per-sample ratio).

The model is a ResNet-18 on one channel (Quantus's ROAD ranks the attribution broadcast over the
channels and indexes past the pixels with more than one), the maps are gradient x input, and
metrics that explain again (max-sensitivity, local Lipschitz, eMPRT) run the same xai-core
explainer on both sides, so the row measures the metric's own machinery: perturbing, batching,
imputing, comparing. Our ROAD computes MoRF and LeRF, Quantus's MoRF only (twice the work on
our side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from harness import Case, Config, Contender, Row, measure, missing, peer, peer_row
from models import make_model
from torch import nn

ORDER = 80
METHOD = "gradient-x-input"
# Perturbed copies per forward pass or re-explanation: on a CPU a ResNet-18 costs up to 40 %
# more per sample at batch 64 than at 8 (the bound rows above), which is the model's cost, not
# the metric's; Quantus runs its batch of 4 (8 in the quick run: 2).
CHUNK = 8


# Metrics that read the maps alone run on a larger batch: their cost per sample is the loop's.
MAP_ONLY = ("sparseness", "complexity", "relevance_mass", "relevance_rank", "pointing_game")


def _shape(cfg: Config, maps_only: bool = False) -> tuple[int, int]:
    """(batch, side): 128 px in the full run (Quantus's ROAD solves one sparse system per image
    and percentage: minutes at 224 px); 32 px in the quick run. Batch 4 (quick 2), 32 maps for
    the metrics that read only the maps."""
    if cfg.quick:
        return (4 if maps_only else 2), 32
    return (32 if maps_only else 4), 128


def _setup(cfg: Config, maps_only: bool = False) -> dict[str, Any]:
    import xai_core

    model = make_model("resnet18", cfg)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grayscale, as an X-ray model
    model.eval()
    n, size = _shape(cfg, maps_only)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=g)
    with torch.no_grad():
        targets = model(x).argmax(1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    side = size // 4
    for i in range(n):  # a square per sample, at a different place
        top = (i * 7) % (size - side)
        masks[i, top : top + side, side : 2 * side] = True
    exp = xai_core.explain(model, x, method=METHOD, targets=targets)
    return {"model": model, "x": x, "targets": targets, "masks": masks, "exp": exp}


def _context(s: dict[str, Any]):
    import xai_core
    from xai_core.core.metrics import MetricContext

    adapter = xai_core.adapt(s["model"])

    def rerun(inputs=s["x"], model=adapter, targets=s["targets"]):
        return xai_core.explain(model, inputs, method=METHOD, targets=targets)

    return MetricContext(
        model=adapter, inputs=s["x"], explanation=s["exp"], method=METHOD, rerun=rerun,
        masks=s["masks"], chunk_size=CHUNK,
    )  # fmt: skip


def _explain_func(model, inputs, targets, **_) -> np.ndarray:
    """Quantus's explain_func: the same xai-core explainer, (N, 1, H, W) as NumPy."""
    import xai_core

    x = torch.as_tensor(inputs, dtype=torch.float32)
    t = torch.as_tensor(targets)
    return xai_core.explain(model, x, method=METHOD, targets=t).maps.unsqueeze(1).numpy()


def _entropy(a: np.ndarray, x: Any = None, **_) -> float:
    from quantus.functions.complexity_func import entropy

    return entropy(a=a, x=a)  # Quantus passes x=None for the randomised maps


def _specs(cfg: Config, q: Any) -> list[tuple[str, dict, Any, dict]]:
    """(metric, our options, Quantus's metric or None, what Quantus's call needs)."""
    samples = 3 if cfg.quick else 10
    shares = [10, 50, 90] if cfg.quick else list(range(5, 100, 10))
    plain = {"abs": False, "normalise": False, "disable_warnings": True}
    absolute = {**plain, "abs": True}
    steps = 4 if cfg.quick else 16
    pixels = _shape(cfg)[1] ** 2
    if q is None:
        return [(m, o, None, {}) for m, o in (
            ("sparseness", {}), ("complexity", {}), ("relevance_mass", {}),
            ("relevance_rank", {}), ("pointing_game", {}), ("deletion", {"steps": steps}),
            ("road", {"percentages": shares}), ("max_sensitivity", {"samples": samples}),
            ("local_lipschitz", {"samples": samples}), ("emprt", {}),
        )]  # fmt: skip
    explained = {"explain_func": _explain_func}
    return [
        ("sparseness", {}, q.Sparseness(**absolute), {}),
        ("complexity", {}, q.Complexity(**absolute), {}),
        ("relevance_mass", {}, q.RelevanceMassAccuracy(**plain), {"masks": True}),
        ("relevance_rank", {}, q.RelevanceRankAccuracy(**plain), {"masks": True}),
        ("pointing_game", {}, q.PointingGame(**plain), {"masks": True}),
        (
            "deletion",
            {"steps": steps},
            q.PixelFlipping(features_in_step=pixels // steps, perturb_baseline="black", **plain),
            {},
        ),
        ("road", {"percentages": shares, "noise": 0.01}, q.ROAD(percentages=shares, **plain), {}),
        (
            "max_sensitivity",
            {"samples": samples, "radius": 0.2},
            q.MaxSensitivity(nr_samples=samples, lower_bound=0.2, **plain),
            explained,
        ),
        (
            "local_lipschitz",
            {"samples": samples, "radius": 0.2},
            q.LocalLipschitzEstimate(nr_samples=samples, **plain),
            explained,
        ),
        (
            "emprt",
            {"seed": 43},
            q.EfficientMPRT(seed=42, complexity_func=_entropy, **absolute),
            {**explained, "a_batch": None},
        ),
    ]


def metrics_case() -> Case:
    cid = "metrics/resnet18-1ch"

    def run(cfg: Config) -> list[Row]:
        import warnings

        import xai_core

        quantus = peer("quantus")
        setups = {False: _setup(cfg), True: _setup(cfg, maps_only=True)}
        registry = xai_core.get_registry()
        rows = []
        for name, options, theirs, needs in _specs(cfg, quantus):
            s = setups[name in MAP_ONLY]
            n = s["x"].shape[0]
            cls = registry.get_metric(name)
            ours = lambda cls=cls, options=options, s=s: cls().compute(_context(s), **options)  # noqa: E731

            def loop(theirs=theirs, needs=needs, s=s):
                batch = {
                    "model": s["model"],
                    "x_batch": s["x"].numpy(),
                    "y_batch": s["targets"].numpy(),
                    "a_batch": s["exp"].maps.unsqueeze(1).numpy().copy(),
                    "device": "cpu",
                }
                if needs.get("masks"):
                    batch["s_batch"] = s["masks"].unsqueeze(1).numpy().astype(np.float32)
                extra = {k: v for k, v in needs.items() if k != "masks"}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return theirs(**{**batch, **extra}) and None

            a = Contender(f"xai-core {name}", ours, cfg.repeats, warmup=ours)
            b = Contender(
                f"quantus {type(theirs).__name__ if theirs else name} (0.6.0)",
                theirs and loop,
                cfg.slow_repeats,
                missing=missing(quantus),
            )
            measure([a, b])
            what = f"{name}: resnet18 1x{_shape(cfg)[1]}px, batch {n}, {METHOD} maps"
            rows.append(peer_row(f"{cid}/{name}/b{n}", what, a, b))
        return rows

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [metrics_case()]
