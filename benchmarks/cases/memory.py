"""Peak memory of occlusion against the bare model doing the same forward passes, each measured
in a fresh process (``run.py --memory-probe``) as the growth of the resident set."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from harness import CLASSES, ROOT, SCRIPT, TARGETS, Case, Config, K, Row, log
from models import image, make_model

from cases.occlusion import forwards
from xai_core.workflows.compare import measure_peak

ORDER = 30


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
                [sys.executable, str(SCRIPT), "--memory-probe", json.dumps(spec)],
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
    Elsewhere: xai-core's own sampler (``measure_peak``, as ``compare()`` uses) samples the RSS
    every 2 ms (may miss short peaks); where it cannot, the probe fails.
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
    with measure_peak(torch.device("cpu")) as sampled:
        yield result
    if sampled["peak_bytes"] is None:
        raise OSError("no way to read the resident set on this system")
    result.update(peak_bytes=sampled["peak_bytes"], method="RSS sampling (measure_peak)")


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

        def call() -> xai_core.Explanation:
            return xai_core.explain(
                model,
                x,
                method="occlusion",
                targets=[CLASSES],
                window=window,
                stride=stride,
                chunk_size=chunk,
                **extra,
            )

        call()  # warm-up, as for the model
        with peak_rss() as result:
            exp = call()
        mode = (exp.details.get("incremental") or {}).get("mode", "off")
    print(json.dumps({**result, "mode": mode}))


def cases(cfg: Config) -> list[Case]:
    return [memory_case("resnet18"), memory_case("densenet121")]
