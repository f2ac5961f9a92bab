"""The models and inputs of the cases: torchvision models without weights (small ones of the
same classes with ``--quick``), a small 3D CNN, seeded images and volumes."""

from __future__ import annotations

import torch
from harness import Config
from torch import nn


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
