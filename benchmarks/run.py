"""Benchmark xai-core's built-in methods against their lower bounds and against peer libraries.

One command, one machine, one run::

    python benchmarks/run.py                  # the full benchmark (docs/performance.md)
    python benchmarks/run.py --quick          # tiny models and inputs, one repeat (smoke test)
    python benchmarks/run.py --list           # the cases; run some with --only PATTERN[,PATTERN]

Every case times its contenders interleaved (repeat 1 of each, then repeat 2 of each, ...) after
a warm-up, with the thread count fixed, and reports medians. A ratio is the median of the ratios
of times measured in the same repeat, so a load spike on a shared machine hits both sides.

The *bound* of a method is the bare model doing the work the method cannot avoid: the same
number of forward passes at the model's best batch size (occlusion), one forward pass plus one
backward pass per target (Grad-CAM), one forward pass (CAM, attention rollout). Peers (Captum,
MONAI, pytorch-grad-cam) are optional: ``pip install -e ".[bench]"``; rows of a missing peer say
``not installed``. Peak memory is measured in a fresh process per probe as the growth of the
resident set (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere a
psutil sampler). Method and results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
K = 5  # targets per sample in the multi-target cases
CLASSES = list(range(K))

# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What one run measures. ``full()`` is the published benchmark; ``quick()`` a smoke run."""

    quick: bool
    size: int  # image side, px
    windows: tuple[tuple[int, int], ...]  # (window, stride) per occlusion case
    chunk: int  # occlusion's default chunk_size with the incremental engine: peers' batch, memory
    batch_sizes: tuple[int, ...]  # candidates for the bound's best batch size
    repeats: int  # timed repeats of xai-core and its bound
    slow_repeats: int  # timed repeats of the peers' loops
    gradcam_batch: int
    cam_batch: int
    vit_batch: int
    volume: int  # side of the 3D volume
    volume_window: tuple[int, int]
    volume_batch: int  # 3D Grad-CAM batch
    peer_targets: dict[str, int] = field(default_factory=dict)  # case id -> targets timed
    case_repeats: dict[str, int] = field(default_factory=dict)  # case id -> repeats (slow cases)

    def repeats_of(self, case_id: str) -> int:
        return self.case_repeats.get(case_id, self.repeats)

    @staticmethod
    def full() -> Config:
        return Config(
            quick=False,
            size=224,
            windows=((16, 8), (32, 16)),
            chunk=32,
            batch_sizes=(8, 16, 32, 64),
            repeats=3,
            slow_repeats=1,
            gradcam_batch=8,
            cam_batch=8,
            vit_batch=4,
            volume=64,
            volume_window=(16, 16),
            volume_batch=2,
            # The two slowest loops (DenseNet-121, 729 windows, one model call per window and
            # target): time one of the K identical calls and report K times it, marked "~".
            # --full-loops times all of them (adds ~15 min on a 2-core CPU).
            peer_targets={"occlusion/densenet121/w16s8": 1},
            case_repeats={"occlusion/densenet121/w16s8": 2},
        )

    @staticmethod
    def tiny() -> Config:
        return Config(
            quick=True,
            size=64,
            windows=((16, 8), (32, 16)),
            chunk=32,
            batch_sizes=(8, 32),
            repeats=1,
            slow_repeats=1,
            gradcam_batch=2,
            cam_batch=2,
            vit_batch=2,
            volume=16,
            volume_window=(8, 4),
            volume_batch=1,
        )


TARGETS = {
    "occlusion-k1-bound": ("<=", 1.10),
    "occlusion-k5-peer": (">=", 4.0),
    "onnx-bound": ("<=", 1.15),
    "gradcam-bound": ("<=", 1.20),
    "gradcam-peer": (">=", 1.5),
    "cam-bound": ("<=", 1.05),
    "memory": ("<=", 1.20),
}

# -- models ----------------------------------------------------------------------------------------


class SmallConv3d(nn.Module):
    """A small 3D CNN: three conv stages, global average pooling, one linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            )

        self.stage1, self.pool1 = stage(1, width), nn.MaxPool3d(2)
        self.stage2, self.pool2 = stage(width, 2 * width), nn.MaxPool3d(2)
        self.stage3 = stage(2 * width, 4 * width)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        return self.head(self.stage3(x).mean(dim=(2, 3, 4)))


def make_model(name: str, cfg: Config) -> nn.Module:
    """torchvision models with ``weights=None``; in quick mode small models of the same classes
    (so layer names such as ``features.denseblock1`` are the same)."""
    import torchvision
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    if name == "conv3d":
        model = SmallConv3d(width=4 if cfg.quick else 16)
    elif not cfg.quick:
        model = getattr(torchvision.models, name)(weights=None)
    elif name == "resnet18":
        model = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    elif name == "densenet121":
        model = torchvision.models.DenseNet(
            growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10
        )
    elif name == "vit_b_16":
        model = torchvision.models.VisionTransformer(
            image_size=cfg.size,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )
    else:
        raise ValueError(name)
    return model.eval()


def image(cfg: Config, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.size, cfg.size, generator=g)


def volume(cfg: Config, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, cfg.volume, cfg.volume, cfg.volume, generator=g)


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One thing to time. ``fn`` may return a list of per-call seconds (a loop's laps)."""

    label: str
    fn: Callable[[], Any] | None
    repeats: int
    warmup: Callable[[], Any] | None = None
    missing: str | None = None  # why it cannot run ("not installed")
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU time (all threads) per repeat
    laps: list[list[float]] = field(default_factory=list)
    error: str | None = None
    mode: str = ""  # how xai-core ran (e.g. ", 1 target, incremental exact"), for the row
    tag: str = ""  # the row id's last part (e.g. "k1-plain")

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def status(self) -> str | None:
        return self.missing or self.error


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(contenders: Sequence[Contender]) -> None:
    """Warm up each contender, then time them interleaved: repeat r of every contender runs
    before repeat r + 1 of any, so slow drift of a shared machine's load hits all of them."""
    runnable = [c for c in contenders if c.fn is not None and c.missing is None]
    for c in runnable:
        if c.warmup is not None:
            try:
                c.warmup()
            except Exception as exc:  # a peer that cannot run this case: say so in its row
                c.error = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    for r in range(max((c.repeats for c in runnable), default=0)):
        for c in runnable:
            if r >= c.repeats or c.error:
                continue
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                laps = c.fn()
            except Exception as exc:
                c.error = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                continue
            c.times.append(time.perf_counter() - start)
            c.cpu.append(time.process_time() - cpu_start)
            if isinstance(laps, list):
                c.laps.append(laps)
            log(f"    {c.label}: {c.times[-1]:.3f} s")


def paired_ratio(a: Contender, b: Contender, lap: bool = False, cpu: bool = False) -> float | None:
    """Median over repeats of ``a / b`` (times of the same repeat); ``lap``: use the median of
    ``a``'s per-call laps (wall time) instead of its total; ``cpu``: process CPU times."""
    ta_all, tb_all = (a.cpu, b.cpu) if cpu else (a.times, b.times)
    pairs = []
    for i in range(min(len(ta_all), len(tb_all))):
        ta = ta_all[i]
        if lap and a.laps:  # one call of a loop: its share of the repeat's time
            ta *= statistics.median(a.laps[i]) / a.times[i]
        pairs.append(ta / tb_all[i])
    return statistics.median(pairs) if pairs else None


def timed_laps(calls: Sequence[Callable[[], Any]]) -> list[float]:
    laps = []
    for call in calls:
        start = time.perf_counter()
        call()
        laps.append(time.perf_counter() - start)
    return laps


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    table: str  # "bound", "peers" or "memory"
    id: str
    what: str
    ours: float | None
    other_label: str
    other: float | None
    ratio: float | None
    target: tuple[str, float] | None = None
    cpu_ratio: float | None = None  # the same ratio in process CPU time
    note: str = ""
    status: str | None = None  # "not installed", "failed: ..."

    def verdict(self) -> str:
        if self.target is None:
            return "-"
        op, value = self.target
        if self.ratio is None:
            return f"{op} {value:g}x (no data)"
        met = self.ratio <= value if op == "<=" else self.ratio >= value
        return f"{op} {value:g}x: {'met' if met else 'NOT met'}"


def bound_row(rid: str, what: str, ours: Contender, bound: Contender, target: str | None) -> Row:
    return Row(
        "bound",
        rid,
        what,
        ours.median,
        bound.label,
        bound.median,
        paired_ratio(ours, bound),
        TARGETS.get(target) if target else None,
        cpu_ratio=paired_ratio(ours, bound, cpu=True),
        status=ours.status or bound.status,
    )


def peer_row(
    rid: str,
    what: str,
    ours: Contender,
    peer: Contender,
    *,
    target: str | None = None,
    lap: bool = False,
    scale: float = 1.0,
    note: str = "",
) -> Row:
    """Speed-up of xai-core over a peer: peer time / our time (> 1: we are faster).

    ``lap``: the peer's time is the median of its per-call laps (one target of a loop);
    ``scale``: the peer's time is multiplied by it (a loop of which only some calls were timed).
    """
    if peer.status:
        return Row(
            "peers",
            rid,
            what,
            ours.median,
            peer.label,
            None,
            None,
            TARGETS.get(target) if target else None,
            status=peer.status,
        )
    if lap and peer.laps:
        other = statistics.median(statistics.median(laps) for laps in peer.laps)
    else:
        other = peer.median
    inverse = paired_ratio(peer, ours, lap=lap)
    cpu = paired_ratio(peer, ours, lap=lap, cpu=True)
    return Row(
        "peers",
        rid,
        what,
        ours.median,
        peer.label,
        None if other is None else other * scale,
        None if inverse is None else inverse * scale,
        TARGETS.get(target) if target else None,
        cpu_ratio=None if cpu is None else cpu * scale,
        note=note,
        status=ours.status,
    )


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def render(rows: Sequence[Row]) -> str:
    out = []
    sections = [
        (
            "bound",
            "xai-core vs its bound (ratio = our time / bound time; 1.00x = no overhead)",
            ["row", "case", "xai-core s", "bound", "bound s", "ratio", "CPU-time ratio", "target"],
        ),
        (
            "peers",
            "xai-core vs peers (speed-up = peer time / our time; > 1 = xai-core faster)",
            ["row", "case", "xai-core s", "peer", "peer s", "speed-up", "CPU-time", "target"],
        ),
        (
            "memory",
            "Peak memory (ratio = our peak / the model's own peak at our chunk size)",
            ["row", "case", "xai-core MiB", "reference", "reference MiB", "ratio", "", "target"],
        ),
    ]
    for table, title, header in sections:
        chosen = [r for r in rows if r.table == table]
        if not chosen:
            continue
        out += ["", f"### {title}", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        for r in chosen:
            if table == "memory":
                ours = "-" if r.ours is None else f"{r.ours:.0f}"
                other = "-" if r.other is None else f"{r.other:.0f}"
            else:
                ours, other = fmt_seconds(r.ours), fmt_seconds(r.other)
            if r.status:
                ratio = r.status
            elif r.ratio is None:
                ratio = "-"
            else:
                ratio = f"{r.note}{r.ratio:.2f}x"
            cpu = "" if r.cpu_ratio is None or r.status else f"{r.note}{r.cpu_ratio:.2f}x"
            cells = [r.id, r.what, ours, r.other_label, other, ratio, cpu, r.verdict()]
            out.append("| " + " | ".join(cells) + " |")
    if any(r.note for r in rows):
        out += [
            "",
            "~ : the peer's loop over the targets is estimated as targets x the median "
            "of the calls timed (--full-loops times every call).",
        ]
    return "\n".join(out)


# -- peers -----------------------------------------------------------------------------------------


def peer(module: str) -> Any:
    """The imported peer module, or ``None`` when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def missing(module: Any) -> str | None:
    return None if module is not None else "not installed"


# -- the cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    run: Callable[[Config], list[Row]]


def best_batch(forward: Callable[[int], Any], sizes: Sequence[int]) -> tuple[int, dict[int, float]]:
    """The batch size with the lowest time per sample, and the time per sample of every size
    tried: the fastest of 3 timed runs after a warm-up (a load spike can only slow a run down)."""
    per_sample = {}
    for b in sizes:
        forward(b)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            forward(b)
            times.append(time.perf_counter() - start)
        per_sample[b] = min(times) / b
    best = min(per_sample, key=per_sample.__getitem__)
    log(
        "    best batch: "
        + ", ".join(f"{b}: {t * 1e3:.1f} ms/sample" for b, t in per_sample.items())
        + f" -> {best}"
    )
    return best, per_sample


def bound_label(runs: int, what: str, best: int, per_sample: dict[int, float], chunk: int) -> str:
    """``"170 forwards @ batch 16 (batch 32: +12%/sample)"``: the bound, and what xai-core's
    chunk size costs per sample more than the best batch (part of the measured ratio)."""
    label = f"{runs} {what} @ batch {best}"
    if chunk != best and chunk in per_sample:
        label += f" (batch {chunk}: {per_sample[chunk] / per_sample[best] - 1:+.0%}/sample)"
    return label


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


def occlusion_case(model_name: str, window: int, stride: int) -> Case:
    cid = f"occlusion/{model_name}/w{window}s{stride}"

    def run(cfg: Config) -> list[Row]:

        model = make_model(model_name, cfg)
        x = image(cfg)
        positions = (cfg.size - window) // stride + 1
        total = positions**2
        what = f"{model_name} {cfg.size}px, window {window} stride {stride} ({total} windows)"

        def fwd(b: int) -> None:
            with torch.inference_mode():
                model(x.expand(b, -1, -1, -1))

        best, speeds = best_batch(fwd, cfg.batch_sizes)
        bound = Contender(
            bound_label(total + 1, "forwards", best, speeds, cfg.chunk),
            forwards(model, x, total, best),
            cfg.repeats,
        )

        ours1, ours5, plain = occlusion_contenders(model, x, window, stride, cfg, best)
        warm = [
            lambda: fwd(1),
            lambda: fwd(cfg.chunk),
            lambda: fwd(total % cfg.chunk or cfg.chunk),
            lambda: fwd(total % best or best),
        ]
        bound.warmup = lambda: [w() for w in warm]
        captum = peer("captum.attr")
        timed_targets = CLASSES[: cfg.peer_targets.get(cid, K)]
        scale = K / len(timed_targets)

        def captum_loop(ppe: int) -> Callable[[], list[float]]:
            def run_loop() -> list[float]:
                occ = captum.Occlusion(model)
                return timed_laps(
                    [
                        lambda c=c: occ.attribute(
                            x,
                            sliding_window_shapes=(3, window, window),
                            strides=(3, stride, stride),
                            baselines=0.0,
                            target=c,
                            perturbations_per_eval=ppe,
                        )
                        for c in timed_targets
                    ]
                )

            return run_loop

        cap1 = Contender(
            "captum Occlusion (default ppe=1)",
            captum and captum_loop(1),
            cfg.slow_repeats,
            missing=missing(captum),
        )
        capc = Contender(
            f"captum Occlusion (ppe={cfg.chunk})",
            captum and captum_loop(cfg.chunk),
            cfg.slow_repeats,
            missing=missing(captum),
        )
        monai = peer("monai.visualize")

        def monai_run() -> None:
            occ = monai.OcclusionSensitivity(
                model,
                mask_size=window,
                n_batch=cfg.chunk,
                verbose=False,
                mode=0.0,
                overlap=1 - stride / window,
                activate=False,
            )
            occ(x)

        mon = Contender(
            f"MONAI OcclusionSensitivity (n_batch={cfg.chunk})",
            monai and monai_run,
            cfg.slow_repeats,
            missing=missing(monai),
        )
        measure([bound, ours1, ours5, *plain, cap1, capc, mon])
        note = "~" if scale != 1 else ""
        loop = f"loop over {K} targets"
        return [
            bound_row(f"{cid}/k1", what + ours1.mode, ours1, bound, "occlusion-k1-bound"),
            *[
                bound_row(f"{cid}/{p.tag}", what + p.mode, p, bound, "occlusion-k1-bound")
                for p in plain
            ],
            bound_row(f"{cid}/k{K}", what + ours5.mode, ours5, bound, None),
            peer_row(f"{cid}/k1", what + ", 1 target", ours1, cap1, lap=True),
            peer_row(f"{cid}/k1", what + ", 1 target", ours1, capc, lap=True),
            peer_row(f"{cid}/k1", what + ", 1 target", ours1, mon),
            peer_row(
                f"{cid}/k{K}",
                what + f", {K} targets ({loop})",
                ours5,
                cap1,
                target="occlusion-k5-peer",
                scale=scale,
                note=note,
            ),
            peer_row(
                f"{cid}/k{K}",
                what + f", {K} targets ({loop})",
                ours5,
                capc,
                target="occlusion-k5-peer",
                scale=scale,
                note=note,
            ),
            peer_row(f"{cid}/k{K}", what + f", {K} targets (all classes at once)", ours5, mon),
        ]

    return Case(cid, run)


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

    def pgc_loop(few: bool = False) -> list[float]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        calls = []
        for name in layers[:1] if few else layers:
            cam = pgc.GradCAM(model=model, target_layers=[modules[name]])
            for c in CLASSES[:1] if few else CLASSES:
                calls.append(
                    lambda cam=cam, c=c: cam(
                        input_tensor=x, targets=[ClassifierOutputTarget(c)] * n
                    )
                )
        try:
            return timed_laps(calls)
        finally:
            model.zero_grad(set_to_none=True)  # its backward fills the parameters' .grad

    def captum_loop(few: bool = False) -> list[float]:
        calls = []
        for name in layers[:1] if few else layers:
            lgc = captum.LayerGradCam(model, modules[name])
            for c in CLASSES[:1] if few else CLASSES:
                calls.append(
                    lambda lgc=lgc, c=c: lgc.attribute(x, target=c, relu_attributions=True)
                )
        return timed_laps(calls)

    return [
        ours,
        bound,
        Contender(
            f"pytorch-grad-cam GradCAM (loop: {len(layers)} layers x {K} classes)",
            pgc and pgc_loop,
            cfg.slow_repeats,
            warmup=lambda: pgc_loop(few=True),
            missing=missing(pgc),
        ),
        Contender(
            f"captum LayerGradCam (loop: {len(layers)} layers x {K} classes)",
            captum and captum_loop,
            cfg.slow_repeats,
            warmup=lambda: captum_loop(few=True),
            missing=missing(captum),
        ),
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


def gradcam_case() -> Case:
    cid = "gradcam/densenet121"

    def run(cfg: Config) -> list[Row]:
        model = make_model("densenet121", cfg)
        x = image(cfg, cfg.gradcam_batch)
        layers = [f"features.denseblock{i}" for i in range(1, 5)]
        contenders = gradcam_contenders(model, x, layers, cfg)
        measure(contenders)
        what = f"densenet121 {cfg.size}px batch {x.shape[0]}, 4 dense blocks x {K} classes"
        return gradcam_rows(f"{cid}/b{x.shape[0]}", what, contenders, targets=True)

    return Case(cid, run)


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


def occlusion3d_case() -> Case:
    cid = "occlusion3d/conv3d"

    def run(cfg: Config) -> list[Row]:

        model = make_model("conv3d", cfg)
        x = volume(cfg)
        window, stride = cfg.volume_window
        total = ((cfg.volume - window) // stride + 1) ** 3
        what = f"3D CNN {cfg.volume}^3, window {window} stride {stride} ({total} windows)"

        def fwd(b: int) -> None:
            with torch.inference_mode():
                model(x.expand(b, -1, -1, -1, -1))

        best, speeds = best_batch(fwd, cfg.batch_sizes)
        bound = Contender(
            bound_label(total + 1, "forwards", best, speeds, cfg.chunk),
            forwards(model, x, total, best),
            cfg.repeats,
        )

        ours1, ours5, plain = occlusion_contenders(model, x, window, stride, cfg, best)
        bound.warmup = bound.fn
        captum = peer("captum.attr")

        def captum_loop() -> list[float]:
            occ = captum.Occlusion(model)
            return timed_laps(
                [
                    lambda c=c: occ.attribute(
                        x,
                        sliding_window_shapes=(1, window, window, window),
                        strides=(1, stride, stride, stride),
                        baselines=0.0,
                        target=c,
                        perturbations_per_eval=cfg.chunk,
                    )
                    for c in CLASSES
                ]
            )

        capc = Contender(
            f"captum Occlusion (ppe={cfg.chunk})",
            captum and captum_loop,
            cfg.slow_repeats,
            missing=missing(captum),
        )
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

        mon = Contender(
            f"MONAI OcclusionSensitivity (n_batch={cfg.chunk})",
            monai and monai_run,
            cfg.slow_repeats,
            missing=missing(monai),
        )
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
        contenders = gradcam_contenders(model, x, layers, cfg)
        measure(contenders)
        what = f"3D CNN {cfg.volume}^3 batch {x.shape[0]}, 3 stages x {K} classes"
        return gradcam_rows(f"{cid}/b{x.shape[0]}", what, contenders, targets=False)

    return Case(cid, run)


# -- peak memory -----------------------------------------------------------------------------------


def memory_case(model_name: str) -> Case:
    cid = f"memory/occlusion/{model_name}"

    def run(cfg: Config) -> list[Row]:
        window, stride = cfg.windows[-1]
        total = ((cfg.size - window) // stride + 1) ** 2
        # A fixed mmap threshold turns off glibc's adaptive one, under which freed tensors of up
        # to 32 MiB stay in the heap: the resident set then tracks live memory, not how the
        # allocator happened to cache it (repeat probes agree within ~1%). The probes run side by
        # side: each measures its own process, and no timing runs meanwhile.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        running = {}
        for what in ("model", "ours") if cfg.quick else ("model", "ours", "plain"):
            spec = {
                "model": model_name,
                "what": what,
                "window": window,
                "stride": stride,
                "quick": cfg.quick,
                "threads": torch.get_num_threads(),
                "chunk": cfg.chunk,
            }
            running[what] = subprocess.Popen(
                [sys.executable, __file__, "--memory-probe", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
            )
        probes: dict[str, dict[str, Any] | None] = {}
        for what, process in running.items():
            out, err = process.communicate()
            if process.returncode != 0:
                log(err[-2000:])
                probes[what] = None
                continue
            probes[what] = json.loads(out.strip().splitlines()[-1])
            log(f"    {what}: {probes[what]}")
        if probes["ours"] is not None and probes["ours"]["mode"] == "off":
            probes.pop("plain", None)  # the default already is plain occlusion
        reference = probes["model"]
        rows = []
        for what, label in (("ours", ""), ("plain", ", incremental=False")):
            if what not in probes:
                continue
            probe = probes[what]
            ours = None if probe is None else probe["peak_bytes"] / 2**20
            ref = None if reference is None else reference["peak_bytes"] / 2**20
            ratio = None if ours is None or ref is None else ours / ref
            mode = (
                "" if probe is None or probe["mode"] == "off" else f", incremental {probe['mode']}"
            )
            rows.append(
                Row(
                    "memory",
                    f"{cid}/w{window}s{stride}" + ("-plain" if what == "plain" else ""),
                    f"{model_name} {cfg.size}px occlusion k{K}, chunk {cfg.chunk}{mode or label}",
                    ours,
                    f"{total + 1} forwards @ batch {cfg.chunk}",
                    ref,
                    ratio,
                    TARGETS["memory"],
                    status=None if ratio is not None else "failed",
                )
            )
        return rows

    return Case(cid, run)


def _status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1)) * 1024


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, Any]]:
    """Peak growth of the resident set while the block runs, in bytes (``result["peak_bytes"]``).

    Linux: reset the high-water mark (``echo 5 > /proc/self/clear_refs``), read ``VmHWM`` after.
    Elsewhere: a psutil thread samples the RSS every millisecond (may miss short peaks).
    """
    result: dict[str, Any] = {}
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        if _status_kib("VmHWM") > base + 1024 * 1024:
            raise OSError("VmHWM was not reset")
        yield result
        result.update(peak_bytes=_status_kib("VmHWM") - base, method="VmHWM delta")
        return
    except OSError:
        pass
    import psutil

    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
    result.update(peak_bytes=peak[0] - base, method="psutil RSS sampling")


def memory_probe(spec: dict[str, Any]) -> None:
    """Run in a fresh process: the peak RSS growth of one occlusion call (``ours``: defaults;
    ``plain``: ``incremental=False``), or of the bare model doing the same forward passes at the
    chunk size (``model``; its input batch included), each after one identical warm-up call.
    Prints one JSON line."""
    import xai_core

    torch.set_num_threads(spec["threads"])
    cfg = Config.tiny() if spec["quick"] else Config.full()
    model = make_model(spec["model"], cfg)
    x = image(cfg)
    xai_core.list_explainers()  # load the plugins before the baseline
    window, stride, chunk = spec["window"], spec["stride"], spec["chunk"]
    extra = {"incremental": False} if spec["what"] == "plain" else {}
    mode = "off"
    if spec["what"] == "model":
        run = forwards(model, x, ((cfg.size - window) // stride + 1) ** 2, chunk)
        run()  # warm-up: one-time allocations (oneDNN caches, lazy imports) stay out of the peak
        with peak_rss() as result:
            run()
    else:
        xai_core.explain(
            model,
            x,
            method="occlusion",
            targets=[CLASSES],
            window=window,
            stride=stride,
            chunk_size=chunk,
            **extra,
        )  # warm-up, as for the model
        with peak_rss() as result:
            exp = xai_core.explain(
                model,
                x,
                method="occlusion",
                targets=[CLASSES],
                window=window,
                stride=stride,
                chunk_size=chunk,
                **extra,
            )
        mode = (exp.details.get("incremental") or {}).get("mode", "off")
    print(json.dumps({**result, "mode": mode}))


# -- incremental occlusion ------------------------------------------------------------------


def incremental_case() -> Case:
    """The exact and approximate incremental modes of xai-occlusion, measured by
    benchmarks/incremental_occlusion.py (its own method: the engine at its best chunk size, the
    approximations' rank correlation with exact), as rows of the bound table."""
    cid = "incremental"

    def run(cfg: Config) -> list[Row]:
        try:
            import incremental_occlusion
        except ImportError as exc:
            log(f"    benchmarks/incremental_occlusion.py is not usable here: {exc}")
            return []
        found = incremental_occlusion.run(cfg.quick, threads=torch.get_num_threads(), log=log)
        rows = []
        for r in found:
            for key, label in (
                ("exact", "exact"),
                ("approximate", "approximate"),
                ("adaptive", "approximate + refinement"),
            ):
                rho = "" if key == "exact" else f", rank correlation {r[f'{key}_rho']:.3f}"
                rows.append(
                    Row(
                        "bound",
                        f"incremental/{r['case']}/{key}",
                        f"{r['windows']} windows, incremental {label}{rho}",
                        r[f"{key}_s"],
                        f"{r['windows'] + 1} forwards @ batch {r['bound_batch']}",
                        r["bound_s"],
                        1 / r[f"{key}_ratio"],
                        cpu_ratio=1 / r[f"{key}_cpu_ratio"],
                    )
                )
        return rows

    return Case(cid, run)


# -- the command -----------------------------------------------------------------------------------


def cases(cfg: Config) -> list[Case]:
    found = []
    for model_name in ("resnet18", "densenet121"):
        for window, stride in cfg.windows:
            found.append(occlusion_case(model_name, window, stride))
    found.append(onnx_case(*cfg.windows[-1]))
    found += [memory_case("resnet18"), memory_case("densenet121"), gradcam_case()]
    found += [single_forward_case("cam", "resnet18"), single_forward_case("cam", "densenet121")]
    found += [single_forward_case("rollout", "vit_b_16"), occlusion3d_case(), gradcam3d_case()]
    found.append(incremental_case())
    return found


OPT_IN: tuple[str, ...] = ()  # cases run only when --only names them


def selected(case_id: str, patterns: Sequence[str]) -> bool:
    if case_id in OPT_IN:
        return any(p.rstrip("*") and case_id.startswith(p.rstrip("*")) for p in patterns)
    return not patterns or any(
        fnmatch.fnmatch(case_id, p) or case_id.startswith(p.rstrip("*")) for p in patterns
    )


def describe_machine(threads: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    importable = {"captum": "captum", "monai": "monai", "grad-cam": "pytorch_grad_cam"}
    peers = ", ".join(
        f"{name} {version(name) if peer(importable.get(name, name)) else 'not installed'}"
        for name in ("captum", "monai", "grad-cam", "onnxruntime", "torchvision", "psutil")
    )
    return [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- torch {torch.__version__}, threads {threads} (torch.set_num_threads; onnxruntime "
        f"intra-op threads the same), interop threads {torch.get_num_interop_threads()}",
        f"- {peers}",
        f"- load average (1/5/15 min) at the start: {load}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs, 1 repeat")
    parser.add_argument("--only", default="", help="comma-separated case ids or globs")
    parser.add_argument("--list", action="store_true", help="list the case ids and exit")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--repeats", type=int, help="timed repeats of xai-core and its bounds")
    parser.add_argument(
        "--full-loops",
        action="store_true",
        help="time every call of the peers' slowest loops (no estimate)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return 0

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore")  # peers' deprecation chatter would bury the progress log
    cfg = Config.tiny() if args.quick else Config.full()
    if args.repeats:
        cfg = dataclasses.replace(cfg, repeats=args.repeats, case_repeats={})
    if args.full_loops:
        cfg = dataclasses.replace(cfg, peer_targets={})
    patterns = [p.strip() for p in args.only.split(",") if p.strip()]
    chosen = [c for c in cases(cfg) if selected(c.id, patterns)]
    if args.list:
        print("\n".join(c.id + (" (opt-in)" if c.id in OPT_IN else "") for c in cases(cfg)))
        return 0
    if not chosen:
        print(f"No case matches --only {args.only!r}; see --list.", file=sys.stderr)
        return 2

    import xai_core

    xai_core.list_explainers()  # load the plugins once, outside every timing
    header = describe_machine(args.threads)
    rows: list[Row] = []
    started = time.perf_counter()
    for case in chosen:
        log(f"== {case.id}")
        case_start = time.perf_counter()
        rows += case.run(dataclasses.replace(cfg, repeats=cfg.repeats_of(case.id)))
        log(f"   {case.id} took {time.perf_counter() - case_start:.0f} s")
    elapsed = time.perf_counter() - started
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    mode = "quick (tiny models, 1 repeat)" if cfg.quick else "full"
    print(f"## xai-core benchmark ({mode})\n")
    print("\n".join(header))
    print(f"- load average at the end: {load}; the run took {elapsed / 60:.1f} min")
    fewer = "".join(f", {n} for {c}" for c, n in cfg.case_repeats.items() if selected(c, patterns))
    print(
        f"- medians of {cfg.repeats} repeats{fewer} (xai-core, bounds; +2 for CAM and rollout) and "
        f"{cfg.slow_repeats} (peer loops) after a warm-up; ratios are medians of the ratios of "
        f"times taken in the same repeat"
    )
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
