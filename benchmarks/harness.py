"""The benchmark's harness: what a run measures (:class:`Config`), timing contenders interleaved
(:func:`measure`), medians and paired ratios, the rows of the tables and their Markdown, the
optional peers, and what a case is (:class:`Case`). The cases are in ``benchmarks/cases/``, the
command in ``benchmarks/run.py``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"  # the command; memory probes run it in a fresh process
K = 5  # targets per sample in the multi-target cases
CLASSES = list(range(K))

# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What one run measures. The defaults, ``full()``, are the published benchmark; ``tiny()``
    (``--quick``) a smoke run."""

    quick: bool = False
    size: int = 224  # image side, px
    windows: tuple[tuple[int, int], ...] = ((16, 8), (32, 16))  # (window, stride) per case
    chunk: int = 32  # occlusion's default chunk_size with the incremental engine: peers' batch
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)  # candidates for the bound's best batch size
    repeats: int = 3  # timed repeats of xai-core and its bound
    slow_repeats: int = 1  # timed repeats of the peers' loops
    gradcam_batch: int = 8
    cam_batch: int = 8
    vit_batch: int = 4
    volume: int = 64  # side of the 3D volume
    volume_window: tuple[int, int] = (16, 16)
    volume_batch: int = 2  # 3D Grad-CAM batch
    # The two slowest loops (DenseNet-121, 729 windows, one model call per window and target):
    # time one of the K identical calls and report K times it, marked "~". --full-loops times
    # all of them (adds ~15 min on a 2-core CPU).
    peer_targets: dict[str, int] = field(  # case id -> targets timed
        default_factory=lambda: {"occlusion/densenet121/w16s8": 1}
    )
    case_repeats: dict[str, int] = field(  # case id -> repeats (slow cases)
        default_factory=lambda: {"occlusion/densenet121/w16s8": 2}
    )

    def repeats_of(self, case_id: str) -> int:
        return self.case_repeats.get(case_id, self.repeats)

    @staticmethod
    def full() -> Config:
        return Config()

    @staticmethod
    def tiny() -> Config:
        """Tiny models and inputs, one repeat, every peer call timed."""
        return Config(
            quick=True,
            size=64,
            batch_sizes=(8, 32),
            repeats=1,
            gradcam_batch=2,
            cam_batch=2,
            vit_batch=2,
            volume=16,
            volume_window=(8, 4),
            volume_batch=1,
            peer_targets={},
            case_repeats={},
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

    def scaled(value: float | None) -> float | None:
        return None if value is None else value * scale

    other = inverse = cpu = None
    if peer.status:  # the peer did not run: its row says why
        note = ""
    else:
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
        scaled(other),
        scaled(inverse),
        TARGETS.get(target) if target else None,
        cpu_ratio=scaled(cpu),
        note=note,
        status=peer.status or ours.status,
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
    """One case: its id (``--list``, ``--only``) and how it runs into rows. ``opt_in``: run only
    when ``--only`` names it."""

    id: str
    run: Callable[[Config], list[Row]]
    opt_in: bool = False


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
