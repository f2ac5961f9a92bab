"""Train a torchvision ResNet-18 on the demo's synthetic chest X-rays at 224 px (for benchmarks).

::

    python benchmarks/train_xray_resnet18.py --out resnet18_xray.pt      # ~10 min, 1 CPU thread
    python benchmarks/incremental_occlusion.py --only resnet18 --input xray \\
        --weights resnet18=resnet18_xray.pt

The approximate occlusion modes are judged by how well they rank a map's pixels against the exact
map, and that depends on the map: a network with random weights gives white noise at the window
grid, which no approximation ranks well. A trained network's map is what users see. Models cannot
be downloaded here, so this script trains one on the demo's generator (normal / nodule / opacity,
the 64 px images upsampled to 224 px and repeated to three channels, fresh images every epoch).
The weights are 45 MB: they are not shipped; the script reproduces them (fixed seeds, one thread).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xai_core.demo import data

SIZE = 224


def xray_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` demo X-rays as ImageNet-shaped inputs ``(n, 3, 224, 224)`` and their labels."""
    batch = data.make_xrays(n, seed=seed)
    x = F.interpolate(data.preprocess(batch.images), size=(SIZE, SIZE), mode="bilinear")
    return x.expand(-1, 3, -1, -1).contiguous(), batch.labels


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("resnet18_xray.pt"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1024, help="new images per epoch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(data.XRAY_CLASSES))
    batch_size = 32
    steps = args.epochs * -(-args.images // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    order = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        x, y = xray_batch(args.images, seed=50_000 + epoch)
        for index in torch.randperm(args.images, generator=order).split(batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s")
    model.eval()
    x, y = xray_batch(200, seed=999)
    with torch.no_grad():
        predicted = torch.cat([model(part).argmax(1) for part in x.split(50)])
    accuracy = float((predicted == y).float().mean())
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy {accuracy:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
