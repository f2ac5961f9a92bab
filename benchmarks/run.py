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

The harness (timing, medians, ratios, the tables) is ``benchmarks/harness.py``; the cases, one
module per family, are in ``benchmarks/cases/`` and found there (``cases.discover``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from cases import discover
from harness import Case, Config, Row, log, peer, render, version


def selected(case_id: str, patterns: Sequence[str], opt_in: bool = False) -> bool:
    if opt_in:  # only when --only names it
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
        from cases.memory import memory_probe

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
    every: list[Case] = discover(cfg)
    chosen = [c for c in every if selected(c.id, patterns, c.opt_in)]
    if args.list:
        print("\n".join(c.id + (" (opt-in)" if c.opt_in else "") for c in every))
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
