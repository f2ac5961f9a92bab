"""Images per second of ``audit()`` over a generated folder: the local engine against Ray.

::

    python benchmarks/ray_scaling.py                          # 2,000 demo X-rays, Grad-CAM
    python benchmarks/ray_scaling.py --images 256 --workers 1,2 --json out.json

A folder of demo chest X-rays (PNG, ``--size`` pixels) is written to a temp dir, then audited
with ``--method`` on the demo CNN: once with the local engine (PyTorch's default threads in this
process, or ``--threads``), then with ``engine=RayExecutor(workers=w)`` for each ``w`` of
``--workers`` (one thread per worker). The local
Ray is started before the timings (it is started once per process); each Ray run includes
starting its actors (each imports PyTorch and the plugins and receives the model once), since
every run pays that. Every Ray result is checked to be bitwise the local one. Printed: seconds,
images per second, the ratio against the local engine and the scaling from the first worker
count to each other. Files are read and preprocessed in this process with either engine.
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

from xai_core.demo import data, load_model
from xai_core.workflows.audit import audit


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


def timed(model, folder: Path, engine, args) -> tuple[float, object]:
    start = time.perf_counter()
    result = audit(
        model, str(folder), method=args.method, batch_size=args.batch_size, min_images=1,
        engine=engine,
    )  # fmt: skip
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--method", default="gradcam")
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

    from xai_ray import RayExecutor  # the plugin; Ray itself is imported by the executor

    model = load_model(args.model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, args.images, args.size)
        audit(model, str(folder / "xray_00000.png"), method=args.method, min_images=1)  # warm-up
        seconds, local = timed(model, folder, "local", args)
        rows.append({"engine": "local", "workers": None, "seconds": seconds})
        RayExecutor(workers=max(workers)).connect()  # the local Ray, outside the timings
        for w in workers:
            seconds, result = timed(model, folder, RayExecutor(workers=w), args)
            same = all(
                torch.equal(getattr(local, k), getattr(result, k)) for k in ("mean", "share")
            )
            if not same:
                sys.exit(f"Ray with {w} workers did not give the local result")
            rows.append({"engine": "ray", "workers": w, "seconds": seconds})
    base = rows[0]["seconds"]
    first_ray = rows[1]["seconds"] if len(rows) > 1 else None
    print(
        f"{args.images} images of {args.size} px, {args.method}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} (local)"
    )
    print(f"{'engine':<8}{'workers':>8}{'seconds':>10}{'images/s':>10}{'vs local':>10}"
          f"{'vs 1st':>8}")  # fmt: skip
    for row in rows:
        row["images_per_second"] = args.images / row["seconds"]
        row["vs_local"] = base / row["seconds"]
        row["vs_first_ray"] = first_ray / row["seconds"] if row["engine"] == "ray" else None
        scaling = f"{row['vs_first_ray']:.2f}x" if row["vs_first_ray"] else "-"
        print(
            f"{row['engine']:<8}{row['workers'] or '-':>8}{row['seconds']:>10.1f}"
            f"{row['images_per_second']:>10.1f}{row['vs_local']:>9.2f}x{scaling:>8}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
