"""Images per second of ``audit()`` over a generated folder: the local engine against Ray.

::

    python benchmarks/ray_scaling.py          # 2,000 demo X-rays, Grad-CAM and occlusion
    python benchmarks/ray_scaling.py --images 256 --workers 1,2 --json out.json

A folder of demo chest X-rays (PNG, ``--size`` pixels) is written to a temp dir, then audited
with each of ``--methods`` on the demo CNN: once with the local engine (PyTorch's default
threads in this process, or ``--threads``), then with ``engine=RayExecutor(workers=w)`` for each
``w`` of ``--workers`` (one thread per worker). The local Ray is started before the timings (it
is started once per process); each Ray run includes starting its actors (each imports PyTorch
and the plugins and receives the model once), since every run pays that. Every Ray result is
checked to be bitwise the local one. With Ray the actors read and decode the files; locally
this process does.

Printed, from the same run: the two bounds of the cluster plan in docs/scale.md (reading and
preprocessing the files alone, in this process: images/s and bytes per image on disk and
decoded; and each method on tensors already in memory, no files), then per method the seconds,
images per second, the ratio against the local engine and the scaling from the first worker
count to each other, the seconds until the first batch came back (the start-up: a Ray pool's
actors import PyTorch and the plugins) and the images per second after it (the steady rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import xai_core
from xai_core.demo import data, load_model
from xai_core.workflows.audit import audit
from xai_core.workflows.datasets import DataStream


def write_folder(folder: Path, images: int, size: int) -> None:
    """``images`` demo X-rays as 8-bit PNGs, generated 64 at a time."""
    done = 0
    while done < images:
        n = min(64, images - done)
        batch = data.make_xrays(n, seed=done, size=size).images
        for i, image in enumerate(batch[:, 0]):
            pixels = (image * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"xray_{done + i:05d}.png")
        done += n


OPTIONS = {"occlusion": {"window": 16, "stride": 8}}  # 49 occluded copies of a 64-px image


def timed(model, folder: Path, engine, method: str, args) -> tuple[float, float, object]:
    """Seconds in all, seconds until the first part came back (start-up), and the result."""
    start = time.perf_counter()
    first: list[float] = []

    def progress(done, total, what):
        if not first:
            first.append(time.perf_counter() - start)

    result = audit(
        model, str(folder), method=method, batch_size=args.batch_size, min_images=1,
        engine=engine, options=OPTIONS.get(method), progress=progress,
    )  # fmt: skip
    return time.perf_counter() - start, first[0], result


def bounds(model, folder: Path, methods: list[str], args) -> dict:
    """Reading alone (files to preprocessed tensors, this process) and each method alone (on
    those tensors, in memory): what the engines' throughput is measured against."""
    stream = DataStream(str(folder), batch_size=args.batch_size)
    start = time.perf_counter()
    batches = [batch.inputs for batch in stream]
    read = time.perf_counter() - start
    images = sum(len(x) for x in batches)
    disk = sum(p.stat().st_size for p in folder.iterdir())
    out = {
        "read_images_per_second": images / read,
        "bytes_on_disk_per_image": disk / images,
        "bytes_decoded_per_image": batches[0][0].numel() * batches[0].element_size(),
    }
    for method in methods:
        start = time.perf_counter()
        for x in batches:
            xai_core.explain(model, x, method=method, **OPTIONS.get(method, {}))
        out[f"{method}_images_per_second"] = images / (time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="gradcam,occlusion", help="comma-separated")
    parser.add_argument("--model", default="cnn", help="a demo model: cnn, cnn_shortcut, vit")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads of this process (the local engine); Ray's workers use one each",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    methods = args.methods.split(",")

    from xai_ray import RayExecutor  # the plugin; Ray itself is imported by the executor

    model = load_model(args.model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, args.images, args.size)
        for method in methods:  # warm-up
            audit(model, str(folder / "xray_00000.png"), method=method, min_images=1)
        bound = bounds(model, folder, methods, args)
        RayExecutor(workers=max(workers)).connect()  # the local Ray, outside the timings
        for method in methods:
            seconds, first, local = timed(model, folder, "local", method, args)
            rows.append(
                {"method": method, "engine": "local", "workers": None, "seconds": seconds,
                 "first_part": first}
            )  # fmt: skip
            for w in workers:
                seconds, first, result = timed(model, folder, RayExecutor(workers=w), method, args)
                same = all(
                    torch.equal(getattr(local, k), getattr(result, k)) for k in ("mean", "share")
                )
                if not same:
                    sys.exit(f"{method}: Ray with {w} workers did not give the local result")
                rows.append(
                    {"method": method, "engine": "ray", "workers": w, "seconds": seconds,
                     "first_part": first}
                )  # fmt: skip
    print(
        f"{args.images} images of {args.size} px, batch {args.batch_size}, {os.cpu_count()} "
        f"CPUs, torch threads {torch.get_num_threads()} (local), load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"bounds (this process): reading {bound['read_images_per_second']:.0f} images/s, "
        f"{bound['bytes_on_disk_per_image'] / 1e3:.1f} kB on disk and "
        f"{bound['bytes_decoded_per_image'] / 1e3:.1f} kB decoded per image; "
        + ", ".join(f"{m} alone {bound[f'{m}_images_per_second']:.0f} images/s" for m in methods)
    )
    print(f"{'method':<11}{'engine':<8}{'workers':>8}{'seconds':>10}{'images/s':>10}"
          f"{'vs local':>10}{'vs 1st':>8}{'start-up':>10}{'steady/s':>10}")  # fmt: skip
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        base = mine[0]["seconds"]
        first_ray = mine[1]["seconds"] if len(mine) > 1 else None
        for row in mine:
            row["images_per_second"] = args.images / row["seconds"]
            row["vs_local"] = base / row["seconds"]
            row["vs_first_ray"] = first_ray / row["seconds"] if row["engine"] == "ray" else None
            # after the first part: the rate without the start-up (a Ray pool's actors)
            steady = args.images - args.batch_size
            row["steady_images_per_second"] = steady / (row["seconds"] - row["first_part"])
            scaling = f"{row['vs_first_ray']:.2f}x" if row["vs_first_ray"] else "-"
            print(
                f"{method:<11}{row['engine']:<8}{row['workers'] or '-':>8}"
                f"{row['seconds']:>10.1f}{row['images_per_second']:>10.1f}"
                f"{row['vs_local']:>9.2f}x{scaling:>8}{row['first_part']:>9.1f}s"
                f"{row['steady_images_per_second']:>10.1f}"
            )
    if args.json is not None:
        settings = vars(args) | {"json": None}
        args.json.write_text(json.dumps({"settings": settings, "bounds": bound, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
