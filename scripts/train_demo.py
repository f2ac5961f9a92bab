"""Train the demo models and write their weights, the ONNX export and a manifest.

    python scripts/train_demo.py                 # all four models, a few minutes on 2 CPU cores
    python scripts/train_demo.py --only vit      # one model; the manifest keeps the others
    python scripts/train_demo.py --export-only   # cnn.onnx again from cnn.pt (a new exporter)

Deterministic: fixed seeds for data, initialisation and batch order, deterministic algorithms and
a fixed thread count (results can differ across thread counts, CPUs and torch versions; the
manifest records the latter two). Writes into xai_core/demo/weights/: cnn.pt, cnn_shortcut.pt,
vit.pt, cnn3d.pt (plain state_dicts: torch.load(weights_only=True) reads them), cnn.onnx (the
clean CNN, dynamic batch axis) and manifest.json (class names, input size, preprocessing,
held-out accuracies, seeds, training seconds, sha256 of every file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xai_core.demo import data
from xai_core.demo.models import DemoCNN, DemoCNN3D, DemoViT

OUT = Path(__file__).resolve().parents[1] / "xai_core" / "demo" / "weights"
THREADS = 2
HELD_OUT_SEED = 999  # never a training seed: the held-out patients are new ones


@dataclass(frozen=True)
class Recipe:
    model: Callable[[], nn.Module]
    make: Callable[..., data.DemoBatch]  # (n, seed=..., **options) -> batch
    options: dict[str, Any]  # what the training images are made with
    size: int  # new images per epoch: the generator never runs out, so nothing is seen twice
    epochs: int
    batch: int
    lr: float
    data_seed: int  # epoch e's images come from seed 1000 * data_seed + e
    init_seed: int  # also orders the batches
    held_out: int = 300


RECIPES = {
    # The clean CNN sees the marker on a random half of its images, in either top corner and
    # unrelated to the label, as markers are on every hospital's X-rays: it learns to ignore it
    # and is the shortcut study's control.
    "cnn": Recipe(DemoCNN, data.make_xrays, {"marker": "random"}, 1500, 5, 64, 3e-3, 11, 11),
    # Few epochs: trained longer it learns the faint lesions too and leans less on the marker.
    "cnn_shortcut": Recipe(DemoCNN, data.make_xrays, {"shortcut": True}, 1500, 4, 64, 3e-3, 12, 12),
    # A ViT has no locality prior: it needs several times the CNN's images to learn small lesions.
    "vit": Recipe(DemoViT, data.make_xrays, {}, 3000, 15, 64, 2e-3, 13, 13),
    "cnn3d": Recipe(DemoCNN3D, data.make_volumes, {}, 240, 6, 16, 3e-3, 14, 14, held_out=100),
}

# Held-out variants per model: the same patients with the marker as trained, removed, moved to
# the other corner, or on everyone. A model that learned the lesions does not care; one that
# learned the marker does.
MARKER_TESTS = {
    "cnn": {"marker_none": {"marker": "none"}, "marker_all": {"marker": "all"},
            "marker_moved": {"marker": "moved"}},
    "cnn_shortcut": {
        "marker_none": {"shortcut": True, "marker": "none"},
        "marker_moved": {"shortcut": True, "marker": "moved"},
        "marker_all": {"shortcut": True, "marker": "all"},
    },
}  # fmt: skip


def accuracy(model: nn.Module, batch: data.DemoBatch) -> float:
    with torch.no_grad():
        scores = [model(data.preprocess(x)) for x in batch.images.split(128)]
    return round(float((torch.cat(scores).argmax(1) == batch.labels).float().mean()), 4)


def train(name: str) -> tuple[nn.Module, dict[str, Any]]:
    r = RECIPES[name]
    torch.manual_seed(r.init_seed)
    model = r.model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=1e-4)
    steps = r.epochs * -(-r.size // r.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r.lr, total_steps=steps)
    order = torch.Generator().manual_seed(r.init_seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(r.epochs):
        images = r.make(r.size, seed=1000 * r.data_seed + epoch, **r.options)
        x, y = data.preprocess(images.images), images.labels
        for index in torch.randperm(r.size, generator=order).split(r.batch):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    held_out = r.make(r.held_out, seed=HELD_OUT_SEED, **r.options)
    stats: dict[str, Any] = {
        "architecture": type(model).__name__,
        "classes": list(held_out.class_names),
        "input_shape": list(held_out.images.shape[1:]),
        "train": {
            "options": r.options,
            "images_per_epoch": r.size,
            "epochs": r.epochs,
            "batch": r.batch,
            "lr": r.lr,
            "data_seeds": [1000 * r.data_seed + e for e in range(r.epochs)],
            "init_seed": r.init_seed,
            "seconds": round(seconds, 1),
        },
        "held_out": {
            "seed": HELD_OUT_SEED,
            "size": r.held_out,
            "accuracy": accuracy(model, held_out),
        },
    }
    for key, options in MARKER_TESTS.get(name, {}).items():
        batch = r.make(r.held_out, seed=HELD_OUT_SEED, **options)
        stats["held_out"][f"accuracy_{key}"] = accuracy(model, batch)
    print(f"{name}: {stats['held_out']} in {seconds:.0f} s", flush=True)
    return model, stats


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a reader (a running ``xai demo``) never
    sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; weights are package data
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def export_onnx(model: nn.Module, path: Path) -> None:
    """The torch.export-based exporter, one self-contained file (no external data), a dynamic
    batch axis; its bytes are deterministic. The example batch has 2 samples because a size-1
    axis would be specialised to 1."""
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 64, 64),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def write_manifest(out: Path, models: dict[str, Any]) -> None:
    manifest = {
        "models": {name: models[name] for name in RECIPES if name in models},
        "classes": {"xray": list(data.XRAY_CLASSES), "ct": list(data.CT_CLASSES)},
        "preprocess": {
            "formula": "(x - mean) / std on images in [0, 1]",
            "xray": {"size": [64, 64], "mean": data.XRAY_MEAN, "std": data.XRAY_STD},
            "ct": {"size": [32, 32, 32], "mean": data.CT_MEAN, "std": data.CT_STD},
        },
        "environment": {
            "torch": torch.__version__,
            "threads": THREADS,
            "machine": platform.machine(),
        },
        "sha256": {
            p.name: sha256(p) for p in sorted(out.iterdir()) if p.suffix in (".pt", ".onnx")
        },
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomically(out / "manifest.json", lambda p: p.write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="train only these")
    parser.add_argument(
        "--export-only", action="store_true", help="re-export cnn.onnx from cnn.pt, no training"
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args()
    out: Path = args.out
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    models = {k: v for k, v in old.get("models", {}).items() if k in RECIPES}
    if args.export_only:
        cnn = DemoCNN()
        cnn.load_state_dict(torch.load(out / "cnn.pt", weights_only=True))
        write_atomically(out / "cnn.onnx", lambda p: export_onnx(cnn.eval(), p))
        write_manifest(out, models)
        return
    start = time.perf_counter()
    for name in args.only or list(RECIPES):
        model, stats = train(name)
        files = {f"{name}.pt": lambda p, m=model: torch.save(m.state_dict(), p)}
        if name == "cnn":
            files["cnn.onnx"] = lambda p, m=model: export_onnx(m, p)
        for file, write in files.items():
            write_atomically(out / file, write)
        models[name] = {**stats, "files": list(files)}
    print(f"trained in {time.perf_counter() - start:.0f} s")
    write_manifest(out, models)


if __name__ == "__main__":
    main()
