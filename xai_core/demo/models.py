"""The small models of the embedded demo: a 2D and a 3D CNN with a GAP + linear head, and a ViT.

They are deliberately ordinary: CAM applies to the CNNs (global average pooling, then one linear
layer), the ViT uses ``nn.MultiheadAttention`` like torchvision's, so every built-in method has a
model to run on. Weights are trained by ``scripts/train_demo.py``.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(conv: type[nn.Module], norm: type[nn.Module], cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)
    )


class DemoCNN(nn.Module):
    """Conv-BN-ReLU blocks, three 2x down-samplings, global average pooling, one linear layer."""

    def __init__(
        self,
        classes: int = 3,
        channels: int = 1,
        width: int = 16,
        dims: int = 2,
        stem: int = 2,
        pools: int = 3,
    ) -> None:
        super().__init__()
        conv, norm, pool = {
            2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
            3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
        }[dims]
        w = width
        layers = [_block(conv, norm, channels if i == 0 else w, w) for i in range(stem)]
        # Three blocks after the stem, the first `pools` of them after a 2x down-sampling: the
        # last map's resolution is what CAM and Grad-CAM can localise with.
        for i, (cin, cout) in enumerate([(w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]):
            layers += [pool(2)] if i < pools else []
            layers.append(_block(conv, norm, cin, cout))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class DemoCNN3D(DemoCNN):
    """The same network on volumes (N, 1, D, H, W), one full-resolution block (3D is costly) and
    two down-samplings: on 32^3 volumes the last map is 8^3, fine enough for CAM to find lesions
    of 4 to 7 voxels across (at 4^3 its peak missed every one)."""

    def __init__(self, classes: int = 2, channels: int = 1, width: int = 8) -> None:
        super().__init__(classes, channels, width, dims=3, stem=1, pools=2)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DemoViT(nn.Module):
    """A small vision transformer: 8-pixel patches, a class token, learned positions."""

    def __init__(
        self,
        classes: int = 3,
        channels: int = 1,
        image_size: int = 64,
        patch: int = 8,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embedding = nn.Conv2d(channels, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.positions
        return self.head(self.norm(self.blocks(tokens))[:, 0])
