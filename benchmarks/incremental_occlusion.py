"""Incremental occlusion (exact and approximate) against the plain-occlusion bound.

::

    python benchmarks/incremental_occlusion.py                 # ResNet-18, DenseNet-121, 3D ResNet
    python benchmarks/incremental_occlusion.py --quick         # small inputs, one repeat (smoke)
    python benchmarks/incremental_occlusion.py --threads 1 --only resnet18 --json out.json

The *bound* is plain occlusion's unavoidable work: ``windows + 1`` forward passes of the model at
its best batch size (the lowest median time per sample among ``--batch-sizes``), timed on the
bare model (no mask building). Each repeat times, interleaved, a slice of the bound (enough
batches for ~2 s, scaled to ``windows + 1`` samples), the exact engine (a whole
``xai_core.explain(..., incremental="exact")`` call, tracing and planning included) and the
approximate mode (defaults, and with coarse-grid refinement), then a second slice of the bound.
The engine runs at its own best chunk size among the same candidates (``--chunk`` to fix it).
A ratio is the median over repeats of ``bound / ours`` measured in the same repeat, so a load
spike on a shared machine hits both. Wall-clock and process CPU time are both recorded: with one
thread (``--threads 1``) the CPU-time ratio does not move when other processes take the cores.
``rho`` is the Spearman rank correlation of an approximate map with the exact map.

Models are torchvision's with ``weights=None`` (no downloads): their occlusion maps are close to
white noise at the window grid, the hardest case for an approximation (docs/methods/occlusion.md).
``--weights resnet18=PATH`` loads a state dict of your own for a model (its class count read from
the head); ``--input xray`` explains a demo chest X-ray at 224 px instead of the scene, for the
ResNet-18 that ``benchmarks/train_xray_resnet18.py`` trains.

The main benchmark calls :func:`run` (rows as dicts) or :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ADAPTIVE = {"coarse": 2, "refine": 0.25}  # the approximate mode with refinement


@dataclass(frozen=True)
class Case:
    model: str  # torchvision name (video models under torchvision.models.video)
    size: tuple[int, ...]  # spatial size of the input
    window: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def id(self) -> str:
        def axes(v: tuple[int, ...]) -> str:
            return "x".join(map(str, v)) if len(set(v)) > 1 else str(v[0])

        return f"{self.model}/{axes(self.size)}px/w{axes(self.window)}s{axes(self.stride)}"

    @property
    def windows(self) -> int:
        return math.prod(
            (s - w) // st + 1 for s, w, st in zip(self.size, self.window, self.stride, strict=True)
        )


CASES = (
    Case("resnet18", (224, 224), (16, 16), (8, 8)),
    Case("resnet18", (224, 224), (32, 32), (16, 16)),
    Case("densenet121", (224, 224), (16, 16), (8, 8)),
    Case("densenet121", (224, 224), (32, 32), (16, 16)),
    Case("r3d_18", (8, 64, 64), (4, 16, 16), (4, 8, 8)),
)
QUICK = (
    Case("resnet18", (96, 96), (16, 16), (8, 8)),
    Case("densenet121", (96, 96), (16, 16), (16, 16)),
    Case("r3d_18", (4, 32, 32), (4, 16, 16), (4, 8, 8)),
)


@dataclass
class Row:
    case: str
    windows: int
    threads: int
    chunk: int
    bound_batch: int
    bound_s: float  # median time of windows + 1 forwards at the best batch
    exact_s: float
    exact_ratio: float  # median of bound / exact, same repeat (wall clock)
    exact_cpu_ratio: float  # the same in process CPU time
    approximate_s: float
    approximate_ratio: float
    approximate_cpu_ratio: float
    approximate_rho: float  # Spearman rank correlation with the exact map
    adaptive_s: float
    adaptive_ratio: float
    adaptive_cpu_ratio: float
    adaptive_rho: float
    estimated_cost: dict[str, float] = field(default_factory=dict)  # engine's FLOP estimate


def scene(size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A smooth random background with a square and a disc (2D) or a sphere (3D), normalised
    as ImageNet inputs: a deterministic stand-in for a photograph or a scan."""
    g = torch.Generator().manual_seed(seed)
    rank = len(size)
    low = torch.rand(1, 3, *(4,) * rank, generator=g)
    mode = "bicubic" if rank == 2 else "trilinear"
    img = F.interpolate(low, size=tuple(size), mode=mode, align_corners=False).clamp(0, 1)
    img = img * 0.6 + 0.2 + 0.03 * torch.randn(img.shape, generator=g)
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in size], indexing="ij")
    centre = torch.rand(rank, generator=g) * 0.5 + 0.25
    distance = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
    disc = (distance < 0.1**2).float()
    img = img * (1 - disc) + torch.tensor([0.9, 0.15, 0.1]).view(1, 3, *(1,) * rank) * disc
    corner = torch.rand(rank, generator=g) * 0.6
    box = math.prod((a > c) & (a < c + 0.2) for a, c in zip(axes, corner, strict=True)).float()
    img = img * (1 - box) + torch.tensor([0.1, 0.2, 0.9]).view(1, 3, *(1,) * rank) * box
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, *(1,) * rank)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, *(1,) * rank)
    return (img - mean) / std


def xray(size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A sick patient's demo chest X-ray (an opacity) at ``size``, as
    ``benchmarks/train_xray_resnet18.py`` trains on: upsampled, three channels."""
    from xai_core.demo import data

    batch = data.make_xrays(6, seed=seed)
    image = batch.images[batch.labels == data.XRAY_CLASSES.index("opacity")][:1]
    x = F.interpolate(data.preprocess(image), size=tuple(size), mode="bilinear")
    return x.expand(-1, 3, -1, -1).contiguous()


INPUTS = {"scene": scene, "xray": xray}


def make_model(name: str, weights: dict[str, str]) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    family = torchvision.models.video if name.startswith(("r3d", "r2plus1d", "mc3")) else None
    if name not in weights:
        return getattr(family or torchvision.models, name)(weights=None).eval()
    state = torch.load(weights[name], map_location="cpu", weights_only=True)
    head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2][-1]
    model = getattr(family or torchvision.models, name)(weights=None, num_classes=head.shape[0])
    model.load_state_dict(state)
    return model.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def per_sample(
    model: torch.nn.Module, x: torch.Tensor, batch: int, seconds: float
) -> tuple[float, float]:
    """Wall and CPU seconds per sample of ``model`` on batches of ``batch`` copies of ``x``,
    over about ``seconds``."""
    xb = x.expand(batch, *x.shape[1:]).contiguous()
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    with torch.inference_mode():
        while True:
            model(xb)
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and done >= 2 * batch:
                return elapsed / done, (time.process_time() - cpu) / done


def engine_speed(model: torch.nn.Module, x: torch.Tensor, case: Case, chunk: int) -> float:
    """Seconds per perturbation of the exact engine on chunks of ``chunk`` random windows."""
    from xai_occlusion import baseline_fill, incremental, window_boxes

    from xai_core.torch.adapter import TorchAdapter

    dims = zip(case.size, case.window, case.stride, strict=True)
    boxes = [window_boxes(*d, x.device) for d in dims]
    with torch.inference_mode():
        engine, _ = incremental.prepare(
            TorchAdapter(model),
            x,
            baseline_fill(x, "zero", 5.0),
            boxes,
            case.window,
            "exact",
            incremental.APPROXIMATION,
            model(x),
        )
        g = torch.Generator().manual_seed(0)
        windows = torch.randint(0, case.windows, (chunk,), generator=g)
        rows = torch.zeros(chunk, dtype=torch.long)
        engine.forward(rows, windows)
        start = time.perf_counter()
        for _ in range(2):
            engine.forward(rows, windows)
        return (time.perf_counter() - start) / (2 * chunk)


def run_case(
    case: Case,
    *,
    repeats: int,
    chunk: int,
    batch_sizes: Sequence[int],
    weights: dict[str, str],
    log: Callable[[str], Any],
    inputs: str = "scene",
) -> Row:
    import xai_core

    model, x = make_model(case.model, weights), INPUTS[inputs](case.size)
    total = case.windows + 1  # the unperturbed forward too
    log(f"{case.id}: {case.windows} windows")
    speeds = {}
    for b in batch_sizes:
        per_sample(model, x, b, 0)  # warm-up
        speeds[b] = statistics.median(per_sample(model, x, b, 0.5)[0] for _ in range(2))
    best = min(speeds, key=speeds.__getitem__)
    log("  bound: " + ", ".join(f"batch {b} {t * 1e3:.1f} ms/sample" for b, t in speeds.items()))

    if not chunk:  # the engine's best chunk size, found as the bound's best batch
        chunks = {c: engine_speed(model, x, case, c) for c in batch_sizes}
        chunk = min(chunks, key=chunks.__getitem__)
        log(
            "  engine: "
            + ", ".join(f"chunk {c} {t * 1e3:.1f} ms/window" for c, t in chunks.items())
        )
    # The predicted class, as users run it (the class of the lesion for the trained X-ray model).
    options = {"window": case.window, "stride": case.stride, "chunk_size": chunk, "targets": None}

    def explain(mode: str, approximation: dict | None = None) -> tuple[float, float, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        out = xai_core.explain(
            model, x, method="occlusion", incremental=mode, approximation=approximation, **options
        )
        return time.perf_counter() - start, time.process_time() - cpu, out

    explain("exact")  # warm-up: traces the model once
    times: dict[str, list[float]] = {k: [] for k in ("bound", "exact", "approx", "adaptive")}
    ratios: dict[str, list[float]] = {k: [] for k in ("exact", "approx", "adaptive")}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in ("exact", "approx", "adaptive")}
    rho: dict[str, list[float]] = {"approx": [], "adaptive": []}
    cost: dict[str, float] = {}
    for r in range(repeats):
        before = per_sample(model, x, best, 2.0)
        runs = {
            "exact": explain("exact"),
            "approx": explain("approximate"),
            "adaptive": explain("approximate", ADAPTIVE),
        }
        after = per_sample(model, x, best, 2.0)
        bound, bound_cpu = ((a + b) / 2 * total for a, b in zip(before, after, strict=True))
        times["bound"].append(bound)
        for key, (t, cpu, _) in runs.items():
            times[key].append(t)
            ratios[key].append(bound / t)
            cpu_ratios[key].append(bound_cpu / cpu)
        exact = runs["exact"][2]
        for key in ("approx", "adaptive"):
            rho[key].append(spearman(runs[key][2].maps, exact.maps))
        cost = {
            "exact": exact.details["incremental"].get("estimated_cost", 1.0),
            "approximate": runs["approx"][2].details["incremental"].get("estimated_cost", 1.0),
        }
        log(
            f"  repeat {r + 1}: bound {bound:.1f}s; "
            + "; ".join(
                f"{key} {runs[key][0]:.1f}s ({ratios[key][-1]:.2f}x, cpu {cpu_ratios[key][-1]:.2f}x"
                + (f", rho {rho[key][-1]:.3f})" if key in rho else ")")
                for key in runs
            )
        )
    med = statistics.median
    return Row(
        case=case.id,
        windows=case.windows,
        threads=torch.get_num_threads(),
        chunk=chunk,
        bound_batch=best,
        bound_s=med(times["bound"]),
        exact_s=med(times["exact"]),
        exact_ratio=med(ratios["exact"]),
        exact_cpu_ratio=med(cpu_ratios["exact"]),
        approximate_s=med(times["approx"]),
        approximate_ratio=med(ratios["approx"]),
        approximate_cpu_ratio=med(cpu_ratios["approx"]),
        approximate_rho=med(rho["approx"]),
        adaptive_s=med(times["adaptive"]),
        adaptive_ratio=med(ratios["adaptive"]),
        adaptive_cpu_ratio=med(cpu_ratios["adaptive"]),
        adaptive_rho=med(rho["adaptive"]),
        estimated_cost=cost,
    )


def run(
    quick: bool = False,
    *,
    repeats: int | None = None,
    threads: int | None = None,
    chunk: int = 0,
    batch_sizes: Sequence[int] = (8, 16, 32, 64),
    only: Sequence[str] = (),
    weights: dict[str, str] | None = None,
    log: Callable[[str], Any] = print,
    inputs: str = "scene",
) -> list[dict[str, Any]]:
    """Benchmark every case (or those whose id contains one of ``only``); rows as dicts."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cases = [c for c in (QUICK if quick else CASES) if not only or any(o in c.id for o in only)]
        return [
            asdict(
                run_case(
                    case,
                    repeats=repeats or (1 if quick else 3),
                    chunk=chunk,
                    batch_sizes=(8, 32) if quick else batch_sizes,
                    weights=weights or {},
                    log=log,
                    inputs=inputs,
                )
            )
            for case in cases
        ]
    finally:
        torch.set_num_threads(previous)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: medians of wall-clock ratios to the bound, CPU-time ratios in brackets."""
    head = (
        "| case | windows | threads | bound s (batch) | exact s | exact vs bound (cpu) "
        "| approximate vs bound (cpu) | rho | + refinement vs bound (cpu) | rho |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['windows']} | {r['threads']} "
            f"| {r['bound_s']:.1f} ({r['bound_batch']}) | {r['exact_s']:.1f} "
            f"| {r['exact_ratio']:.2f}x ({r['exact_cpu_ratio']:.2f}x) "
            f"| {r['approximate_ratio']:.2f}x ({r['approximate_cpu_ratio']:.2f}x) "
            f"| {r['approximate_rho']:.3f} "
            f"| {r['adaptive_ratio']:.2f}x ({r['adaptive_cpu_ratio']:.2f}x) "
            f"| {r['adaptive_rho']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument(
        "--chunk", type=int, default=0, help="the engine's chunk_size (default: its best)"
    )
    parser.add_argument("--only", default="", help="comma-separated substrings of case ids")
    parser.add_argument("--weights", action="append", default=[], help="MODEL=PATH state dict")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument(
        "--input", choices=list(INPUTS), default="scene", help="xray: for --weights from "
        "benchmarks/train_xray_resnet18.py (2D cases only)"
    )
    args = parser.parse_args(argv)
    weights = dict(item.split("=", 1) for item in args.weights)
    rows = run(
        args.quick,
        repeats=args.repeats,
        threads=args.threads,
        chunk=args.chunk,
        only=[o for o in args.only.split(",") if o],
        weights=weights,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        inputs=args.input,
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
