"""Seconds of ``compare()`` on one batch, in batches here, and in batches on Ray; and the cost
of resuming ``audit()``.

::

    python benchmarks/compare_engines.py                      # 64 demo X-rays, 2 methods
    python benchmarks/compare_engines.py --images 128 --workers 1,2 --json out.json

In one run, on the demo CNN and generated 64-pixel demo X-rays: ``compare()`` with every input
in one batch (the default), in batches of ``--batch-size`` on the local engine, then on Ray
with each worker count of ``--workers`` (each Ray run includes starting its actors; the local
Ray itself is started before the timings). Every batched result is checked: the per-sample
values of the Ray runs are bitwise those of the local batched run. Printed: seconds and the
ratio against the one-batch run. Then ``audit(resume=DIR)``: a first run, against one without
``resume`` (the cost of hashing the batches and saving the sum), and a rerun that finds every
batch done (the cost of reading the data again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

import xai_core
from xai_core.demo import data, load_model, preprocess

METRICS = ["deletion", "sparseness", "randomization", "cost"]


def timed(run):
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--methods", default="gradcam,saliency")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each Ray worker runs
    demo = data.make_xrays(args.images, seed=0, size=64)
    model, x = load_model("cnn"), preprocess(demo.images)
    kwargs = dict(
        methods=args.methods.split(","),
        metrics=METRICS,
        metric_options={"deletion": {"steps": 10}, "randomization": {"stages": 2}},
    )
    xai_core.compare(model, x[:2], **kwargs)  # warm up: plugins, first calls
    rows = []
    one_s, _ = timed(lambda: xai_core.compare(model, x, **kwargs))
    rows.append({"run": "local, one batch", "seconds": one_s})
    split_s, split = timed(lambda: xai_core.compare(model, x, batch_size=args.batch_size, **kwargs))
    rows.append({"run": f"local, batches of {args.batch_size}", "seconds": split_s})
    from xai_ray import RayExecutor

    RayExecutor(workers=max(int(w) for w in args.workers.split(","))).connect()
    for workers in (int(w) for w in args.workers.split(",")):
        engine = RayExecutor(workers=workers)
        ray_s, ray = timed(
            lambda engine=engine: xai_core.compare(
                model, x, batch_size=args.batch_size, engine=engine, **kwargs
            )
        )
        for key, value in split.values.items():
            if key[1] != "cost":
                assert torch.equal(value.nan_to_num(-1), ray.values[key].nan_to_num(-1)), key
        rows.append({"run": f"Ray, {workers} worker(s), batches of {args.batch_size}",
                     "seconds": ray_s})  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        audit = dict(method="gradcam", batch_size=args.batch_size, min_images=1)
        plain_s, _ = timed(lambda: xai_core.audit(model, (x, demo.labels), **audit))
        first_s, _ = timed(
            lambda: xai_core.audit(
                model, (x, demo.labels), resume=folder, checkpoint_every=0, **audit
            )
        )
        again_s, again = timed(
            lambda: xai_core.audit(model, (x, demo.labels), resume=folder, **audit)
        )
        assert again.resumed == args.images
    rows.append({"run": "audit, no resume", "seconds": plain_s})
    rows.append({"run": "audit, resume, saving after every batch", "seconds": first_s,
                 "vs": plain_s})  # fmt: skip
    rows.append({"run": "audit, rerun with every batch done", "seconds": again_s, "vs": plain_s})
    print(f"{args.images} images of 64 px, demo CNN, {args.methods}, metrics {METRICS}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for row in rows:
        base = row.get("vs", one_s)
        print(f"{row['run']:<48} {row['seconds']:7.2f} s  {row['seconds'] / base:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
