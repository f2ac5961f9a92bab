"""The model-zoo matrix: every installed local method on architectures nobody here wrote.

Each architecture (timm, Hugging Face transformers, torchvision, and a few built the ways users
build models: functional pooling, a dict output, channels-last, TorchScript, a ``Conv2d``
subclass) is built with random weights and tiny sizes, and crossed with every local method.
A pair is ``ok`` (finite maps of shape ``(N, *spatial)`` on the input grid), ``n/a`` (the method
says, with a typed :class:`~xai_core.core.errors.CapabilityError` or through ``list_explainers``,
why it does not apply) or a failure (any other exception, or a bad map).

``python scripts/model_matrix.py`` rewrites ``docs/models.md``; ``tests/test_model_zoo.py``
runs the same matrix and checks that the page is what this script writes now.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core.core.errors import CapabilityError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
CLASSES = 5
BATCH = 2


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo: how to build it, and the input size it is tried at."""

    name: str
    source: str  # timm, transformers, torchvision, custom
    family: str  # CNN, ViT, hierarchical transformer, hybrid
    build: Callable[[], nn.Module] = field(repr=False, compare=False)
    size: int = 64
    depth: int | None = None  # volumes and clips: (N, C, depth, size, size)

    def shape(self, n: int) -> tuple[int, ...]:
        return (n, 3, *([self.depth] if self.depth else []), self.size, self.size)


# -- builders --------------------------------------------------------------------------------


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)

    return build


def _hf(kind: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, f"{kind}Config")(num_labels=CLASSES, **config)
        return getattr(transformers, f"{kind}ForImageClassification")(cfg)

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kwargs)

    return build


_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
_VIT_HF = {**_VIT, "intermediate_size": 64, "image_size": 32, "patch_size": 8}
_VIT_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'same' padding as EfficientNet-Lite ports write it: a ``Conv2d`` subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        axes = zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True)
        for size, k, s in axes:
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class LiteNet(nn.Module):
    """The EfficientNet-Lite0 failure in small: convolutions that subclass ``nn.Conv2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2)
        self.block = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU6(), Conv2dSame(16, 32, 3, 2))
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class FunctionalGAP(nn.Module):
    """Global pooling written in forward (``F.adaptive_avg_pool2d``), no pooling module."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()
        )
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DictOutput(FunctionalGAP):
    """Returns ``{"logits": ..., "features": ...}`` as many research repositories do."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        features = self.features(x)
        return {"logits": self.classifier(features.mean((2, 3))), "features": features}


class Normalized(nn.Module):
    """A trained model behind its preprocessing, as deployed: the classifier sits one level
    deeper and the first module is no convolution."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _normalized() -> nn.Module:
    return Normalized(_timm("regnetx_002")())


def _fx_traced() -> nn.Module:
    return torch.fx.symbolic_trace(FunctionalGAP())


def _video() -> nn.Module:
    from torchvision.models.video import r3d_18

    return r3d_18(weights=None, num_classes=CLASSES)


def _volume() -> nn.Module:
    from xai_core.testing import tiny_cnn

    return tiny_cnn(dims=3, classes=CLASSES)


def _channels_last() -> nn.Module:
    return _tv("resnet18")().to(memory_format=torch.channels_last)


def _scripted() -> nn.Module:
    return torch.jit.script(FunctionalGAP().eval())


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=CLASSES)


ZOO: list[Arch] = [
    # timm CNNs: same-padding, weight-standardised and re-parameterisable convolutions
    Arch("resnet18d", "timm", "CNN", _timm("resnet18d")),
    Arch("tf_efficientnet_b0", "timm", "CNN", _timm("tf_efficientnet_b0")),
    Arch("tf_efficientnet_lite0", "timm", "CNN", _timm("tf_efficientnet_lite0")),
    Arch("efficientnet_b0", "timm", "CNN", _timm("efficientnet_b0")),
    Arch("mobilenetv3_small_050", "timm", "CNN", _timm("mobilenetv3_small_050")),
    Arch("regnetx_002", "timm", "CNN", _timm("regnetx_002")),
    Arch("convnext_atto", "timm", "CNN", _timm("convnext_atto")),
    Arch("repvgg_a0", "timm", "CNN", _timm("repvgg_a0")),
    Arch("ghostnet_050", "timm", "CNN", _timm("ghostnet_050")),
    Arch("dla46_c", "timm", "CNN", _timm("dla46_c")),
    Arch(
        "densenet121 (growth 8, 2 layers per block)",
        "timm",
        "CNN",
        _timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)),
    ),
    Arch("resnetv2_50x1_bit", "timm", "CNN", _timm("resnetv2_50x1_bit")),
    Arch("cs3darknet_focus_s", "timm", "CNN", _timm("cs3darknet_focus_s")),
    Arch("fastvit_t8", "timm", "CNN", _timm("fastvit_t8")),
    # timm transformers and hybrids, shrunk to two blocks
    Arch("vit_tiny_patch16_224", "timm", "ViT", _timm("vit_tiny_patch16_224", **_VIT_TIMM), 32),
    Arch(
        "deit_tiny_distilled_patch16_224",
        "timm",
        "ViT",
        _timm("deit_tiny_distilled_patch16_224", **_VIT_TIMM),
        32,
    ),
    Arch(
        "eva02_tiny_patch14_224",
        "timm",
        "ViT",
        _timm("eva02_tiny_patch14_224", **{**_VIT_TIMM, "img_size": 28, "patch_size": 7}),
        28,
    ),
    Arch("beit_base_patch16_224", "timm", "ViT", _timm("beit_base_patch16_224", **_VIT_TIMM), 32),
    Arch(
        "vit_small_patch14_reg4_dinov2",
        "timm",
        "ViT",
        _timm("vit_small_patch14_reg4_dinov2", **{**_VIT_TIMM, "img_size": 28, "patch_size": 7}),
        28,
    ),
    Arch(
        "swin_tiny_patch4_window7_224",
        "timm",
        "hierarchical transformer",
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=64,
            window_size=4,
            embed_dim=32,
            depths=(1, 1, 1, 1),
            num_heads=(1, 1, 2, 2),
        ),
    ),
    Arch("mobilevit_xxs", "timm", "hybrid", _timm("mobilevit_xxs")),
    Arch("levit_128s", "timm", "hybrid", _timm("levit_128s", img_size=64)),
    Arch("coat_lite_tiny", "timm", "hybrid", _timm("coat_lite_tiny", img_size=64)),
    Arch("coatnet_nano_rw_224", "timm", "hybrid", _timm("coatnet_nano_rw_224", img_size=64)),
    Arch("maxvit_pico_rw_256", "timm", "hybrid", _timm("maxvit_pico_rw_256", img_size=64)),
    Arch("edgenext_xx_small", "timm", "hybrid", _timm("edgenext_xx_small")),
    # Hugging Face transformers, tiny configurations
    Arch("hf-vit", "transformers", "ViT", _hf("ViT", **_VIT_HF), 32),
    Arch("hf-deit", "transformers", "ViT", _hf("DeiT", **_VIT_HF), 32),
    Arch("hf-beit", "transformers", "ViT", _hf("Beit", **_VIT_HF), 32),
    Arch(
        "hf-dinov2",
        "transformers",
        "ViT",
        _hf("Dinov2", **{**_VIT_HF, "image_size": 32, "patch_size": 8}),
        32,
    ),
    Arch(
        "hf-swin",
        "transformers",
        "hierarchical transformer",
        _hf("Swin", image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    ),
    Arch(
        "hf-convnext",
        "transformers",
        "CNN",
        _hf("ConvNext", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    ),
    Arch(
        "hf-resnet",
        "transformers",
        "CNN",
        _hf("ResNet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
    ),
    Arch(
        "hf-regnet",
        "transformers",
        "CNN",
        _hf("RegNet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
    ),
    Arch(
        "hf-efficientnet",
        "transformers",
        "CNN",
        _hf("EfficientNet", image_size=64, width_coefficient=0.25, hidden_dim=320),
    ),
    Arch(
        "hf-poolformer",
        "transformers",
        "CNN",
        _hf("PoolFormer", hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1]),
    ),
    Arch("hf-data2vec-vision", "transformers", "ViT", _hf("Data2VecVision", **_VIT_HF), 32),
    Arch(
        "hf-mobilevit",
        "transformers",
        "hybrid",
        _hf("MobileViT", image_size=64, hidden_sizes=[32, 32, 32], neck_hidden_sizes=[8] * 7),
    ),
    # torchvision
    Arch("resnet18", "torchvision", "CNN", _tv("resnet18")),
    Arch("mobilenet_v3_small", "torchvision", "CNN", _tv("mobilenet_v3_small")),
    Arch("efficientnet_b0", "torchvision", "CNN", _tv("efficientnet_b0")),
    Arch("vit (2 blocks)", "torchvision", "ViT", _torchvision_vit, 32),
    Arch("r3d_18 (video)", "torchvision", "3D CNN", _video, 32, depth=8),
    # built the ways users build models
    Arch("Conv2d subclass (EfficientNet-Lite port)", "custom", "CNN", LiteNet),
    Arch("functional GAP", "custom", "CNN", FunctionalGAP),
    Arch("dict output", "custom", "CNN", DictOutput),
    Arch("resnet18 channels-last", "custom", "CNN", _channels_last),
    Arch("TorchScript CNN", "custom", "CNN", _scripted),
    Arch("tiny 3D CNN (volumes)", "custom", "3D CNN", _volume, 16, depth=8),
    Arch("torch.fx GraphModule", "custom", "CNN", _fx_traced),
    Arch("regnetx_002 behind normalisation", "custom", "CNN", _normalized),
]


def arch_id(arch: Arch) -> str:
    return f"{arch.source}:{arch.name}"


# -- running ---------------------------------------------------------------------------------


def methods() -> list[tuple[str, str, dict[str, Any]]]:
    """``(column, method, options)`` for every installed local method; Grad-CAM's weightings
    get a column each. Occlusion uses 2 boxes per axis so that the matrix stays fast."""
    columns = []
    for info in xai_core.list_explainers(scope="local"):
        columns.append((info.name, info.name, {}))
        if info.name == "gradcam":
            variants = ("guided", "gradcam++")
            columns += [(f"gradcam ({v})", "gradcam", {"variant": v}) for v in variants]
    return columns


# Sampling methods run with few samples here: the matrix asks whether a method runs on each
# architecture and gives a finite map of the right shape, not how good the estimate is.
CHEAP: dict[str, dict[str, Any]] = {
    "rise": {"masks": 8},
    "integrated-gradients": {"steps": 4},
    "smoothgrad": {"samples": 2},
    "vargrad": {"samples": 2},
    # every channel's ablated copy in one pass per sample: the layers before it then run twice
    "ablationcam": {"batch_size": 2048},
}


def occlusion_options(spatial: tuple[int, ...]) -> dict[str, Any]:
    halves = tuple(s // 2 for s in spatial)
    return {"window": halves, "stride": halves}


def calibrate(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """BatchNorm statistics from two random batches (random-weight nets otherwise blow up to
    logits of 1e14 with the default running statistics), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms and not isinstance(model, torch.jit.ScriptModule):
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average of the batches below
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(shape, generator=g))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return model.eval()


def build(arch: Arch, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model (random weights, calibrated, eval mode) and a ``(2, 3, [depth,] size, size)``
    batch."""
    torch.manual_seed(seed)
    model = calibrate(arch.build(), arch.shape(4), seed)
    x = torch.randn(arch.shape(BATCH), generator=torch.Generator().manual_seed(1))
    if arch.name.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


@dataclass
class Outcome:
    status: str  # "ok", "n/a" or "failed"
    reason: str = ""
    explanation: Any = None


# What a missing capability means for a PyTorch model, in the words of the page.
MISSING = {
    "attention": "no attention module that xai-core can capture",
    "classifier-weights": "no nn.Linear layer (a convolutional or compiled classifier)",
    "layers": "no module hooks (TorchScript)",
    "layer-edits": "no module hooks (TorchScript)",
    "gradients": "no gradients",
}


def first_sentence(message: str) -> str:
    """A reason short enough for a table and shared by models: the message up to its first
    full stop or colon, without layer names and shapes; a missing capability in plain words."""
    needs = re.match(r"\S+ needs ([\w, -]+); this \S+ model offers", message)
    if needs:
        return "; ".join(dict.fromkeys(MISSING.get(c, c) for c in needs.group(1).split(", ")))
    head = message.split(". ")[0].split(": ")[0]
    while True:  # parentheses with names or numbers in them, innermost first
        shorter = re.sub(r" ?\([^()]*['\d][^()]*\)", "", head)
        if shorter == head:
            break
        head = shorter
    head = re.sub(r" '[^']*'", "", head).strip().rstrip(".")
    return head if len(head) <= 200 else head[:197].rsplit(" ", 1)[0] + " ..."


def run_pair(
    model: nn.Module, x: torch.Tensor, method: str, options: dict[str, Any], usable: set[str]
) -> Outcome:
    """One cell of the matrix."""
    if method not in usable:
        registry = xai_core.get_registry()
        reason = registry.unsupported_reason(registry.get_explainer(method), xai_core.adapt(model))
        return Outcome("n/a", first_sentence(reason or "not listed for this model"))
    if method == "occlusion":
        options = {**options, **occlusion_options(tuple(x.shape[2:]))}
    options = {**CHEAP.get(method, {}), **options}
    try:
        e = xai_core.explain(model, x, method=method, **options)
    except CapabilityError as error:
        return Outcome("n/a", first_sentence(str(error)))
    except Exception as error:  # the matrix reports every crash instead of stopping
        return Outcome("failed", f"{type(error).__name__}: {error}")
    maps = e.maps
    want = (x.shape[0], *x.shape[2:])
    if tuple(maps.shape) != want:
        return Outcome("failed", f"maps of shape {tuple(maps.shape)}, expected {want}", e)
    if not bool(torch.isfinite(maps).all()):
        return Outcome("failed", "non-finite maps", e)
    return Outcome("ok", "", e)


def run_row(model: nn.Module, x: torch.Tensor) -> dict[str, Outcome]:
    """Every column of one architecture's row."""
    usable = {i.name for i in xai_core.list_explainers(model=model)}
    return {col: run_pair(model, x, m, opts, usable) for col, m, opts in methods()}


def run_arch(arch: Arch) -> tuple[nn.Module, torch.Tensor, dict[str, Outcome]]:
    model, x = build(arch)
    return model, x, run_row(model, x)


# -- the page --------------------------------------------------------------------------------

HEADER = """# Which method runs on which model

This page is written by `scripts/model_matrix.py` from a run of every installed local method on
every architecture below (random weights, tiny configurations, {batch} images of 16-64 px, clips
of 8 frames); `tests/test_model_zoo.py` runs the same matrix in CI and fails when this page
differs from what the script writes now. Regenerate it with `python scripts/model_matrix.py`.

`ok`: finite maps of shape `(N, H, W)` (`(N, D, H, W)` for 3D models) on the input grid. A
number: the method does not apply, with the reason below; `xai_core.list_explainers(model=...)`
leaves such methods out, or the method raises a `CapabilityError` saying the same. Nothing else
is allowed: any other error or a non-finite map fails the test, and so does a model not left
exactly as it was. Grad-CAM is also checked against a hand-written reference on every CNN, CAM
on every model it runs on, and occlusion on ONNX exports against occlusion on the PyTorch models.
"""


def render(rows: dict[str, dict[str, Outcome]], archs: list[Arch]) -> str:
    """``docs/models.md`` from the matrix' outcomes (``rows[arch_id][column]``)."""
    columns = [c for c, _, _ in methods()]
    reasons: dict[str, int] = {}
    lines = [HEADER.format(batch=BATCH)]
    lines.append("| model | source | family | " + " | ".join(columns) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for arch in archs:
        cells = []
        for column in columns:
            outcome = rows[arch_id(arch)][column]
            if outcome.status == "ok":
                cells.append("ok")
            elif outcome.status == "n/a":
                cells.append(str(reasons.setdefault(outcome.reason, len(reasons) + 1)))
            else:
                cells.append("**FAILED**")
        lines.append(f"| {arch.name} | {arch.source} | {arch.family} | " + " | ".join(cells) + " |")
    lines.append("\n## By family\n")
    lines.append("How many models of each family each method runs on.\n")
    lines.append("| family | models | " + " | ".join(columns) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for family in dict.fromkeys(a.family for a in archs):
        ids = [arch_id(a) for a in archs if a.family == family]
        ok = [sum(rows[i][c].status == "ok" for i in ids) for c in columns]
        lines.append(f"| {family} | {len(ids)} | " + " | ".join(map(str, ok)) + " |")
    lines.append("\n## Why not\n")
    lines += [f"{number}. {reason.rstrip('.')}." for reason, number in reasons.items()]
    counts = [o.status for row in rows.values() for o in row.values()]
    lines.append(
        f"\n{len(archs)} architectures, {len(counts)} pairs: {counts.count('ok')} ok, "
        f"{counts.count('n/a')} not applicable, {counts.count('failed')} failed.\n"
    )
    return "\n".join(lines)


def main() -> int:
    rows = {}
    for arch in ZOO:
        rows[arch_id(arch)] = run_arch(arch)[2]
        bad = {c: o.reason for c, o in rows[arch_id(arch)].items() if o.status == "failed"}
        print(f"{arch_id(arch)}: {bad or 'ok'}", file=sys.stderr)
    DOCS.write_text(render(rows, ZOO))
    print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
