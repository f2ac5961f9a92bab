"""Attention maps checked against hand computations on a tiny two-layer vision transformer.

The tiny model exists in two variants that compute the same function: its attention is either a
custom module following the contract (``xai_attention = True`` + ``record_attention``) or an
``nn.MultiheadAttention`` called with ``need_weights=False`` like torchvision's ViT (which takes
the fused fast path under ``no_grad``). The references recompute every softmax by hand from the
projection weights and multiply the matrices explicitly. Float64 keeps the comparisons tight.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from xai_attention import AttentionRollout, GradAttentionRollout, RawAttention, token_layout

import xai_core
from xai_core.core.errors import CapabilityError, OptionError, TargetError
from xai_core.torch.capture import capture_attention, hook_count, record_attention

KINDS = ("custom", "mha")
METHODS = ("attention", "rollout", "grad_rollout")


class Attention(nn.Module):
    """Multi-head self-attention that follows the custom-module contract."""

    xai_attention = True

    def __init__(self, dim: int, heads: int, record: bool = True) -> None:
        super().__init__()
        self.heads, self.record = heads, record
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        if not self.record:  # a fused kernel: the weights never exist
            fused = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(fused.transpose(1, 2).flatten(2))
        a = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        record_attention(self, a)
        return self.proj((a @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str, record: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (
            Attention(dim, heads, record)
            if kind == "custom"
            else nn.MultiheadAttention(dim, heads, batch_first=True)
        )
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            attended = self.attn(h, h, h, need_weights=False)[0]
        else:
            attended = self.attn(h)
        x = x + attended
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patches of 2x2 px, 8 features, 2 heads, 2 blocks, 3 classes; class token or mean pooling."""

    def __init__(
        self,
        kind: str = "custom",
        class_token: bool = True,
        size: tuple[int, int] = (8, 8),
        record: bool = True,
    ) -> None:
        super().__init__()
        dim, patches = 8, (size[0] // 2) * (size[1] // 2)
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if class_token else None
        self.pos = nn.Parameter(0.5 * torch.randn(1, patches + class_token, dim))
        self.blocks = nn.ModuleList(Block(dim, 2, kind, record) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return t + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)
        return self.head(t[:, 0] if self.cls is not None else t.mean(dim=1))


def tiny(kind: str = "custom", **kwargs) -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(kind, **kwargs).double()


def batch(n: int, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(n), dtype=torch.float64)


def hand_forward(model: TinyViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tiny model's forward written out with each softmax computed by hand: the logits and
    every layer's weights ``A_l = softmax(q k^T / sqrt(d))`` ``(N, heads, T, T)``, in the graph."""
    t, weights = model.tokens(x), []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            w, b, out, heads = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, attn.num_heads
        else:
            w, b, out, heads = attn.qkv.weight, attn.qkv.bias, attn.proj, attn.heads
        q, k, v = (
            p.unflatten(-1, (heads, -1)).transpose(1, 2)
            for p in (block.norm1(t) @ w.T + b).chunk(3, dim=-1)
        )
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        weights.append(a)
        t = t + out((a @ v).transpose(1, 2).flatten(2))
        t = t + block.mlp(block.norm2(t))
    t = model.norm(t)
    return model.head(t[:, 0] if model.cls is not None else t.mean(dim=1)), weights


def state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        hook_count(model),
    )


# -- hand computations -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_equals_hand_computation(kind: str, n: int, discard_ratio: float) -> None:
    model, x = tiny(kind), batch(n)
    with torch.no_grad():
        _, (a1, a2) = hand_forward(model, x)
    eye = torch.eye(17, dtype=x.dtype)

    def tilde(a: torch.Tensor) -> torch.Tensor:
        fused = a.mean(dim=1).flatten(1)
        lowest = fused.argsort(dim=1)[:, : int(discard_ratio * 17 * 17)]
        fused = fused.scatter(1, lowest, 0.0).view(n, 17, 17)
        t = 0.5 * fused + 0.5 * eye
        return t / t.sum(dim=-1, keepdim=True)

    rollout = tilde(a2) @ tilde(a1)
    expected = rollout[:, 0, 1:].reshape(n, 4, 4)
    exp = xai_core.explain(
        model, x, method="rollout", targets=[[0, 1, 2]] * n, discard_ratio=discard_ratio
    )
    assert exp.raw[0].shape == (n, 3, 4, 4)
    for k in range(3):  # target-independent: the same map for each target
        torch.testing.assert_close(exp.raw[0][:, k], expected)
    assert exp.maps.shape == (n, 3, 8, 8)
    assert exp.details["attention_layers"] == ["blocks.0.attn", "blocks.1.attn"]


@pytest.mark.parametrize("kind", KINDS)
def test_raw_attention_equals_softmax_by_hand(kind: str) -> None:
    model, x = tiny(kind), batch(2)
    with torch.no_grad():
        _, (a1, a2) = hand_forward(model, x)
    exp = xai_core.explain(model, x, method="attention", layer=0, head=1)
    torch.testing.assert_close(exp.raw[0][:, 0], a1[:, 1, 0, 1:].reshape(2, 4, 4))
    assert exp.layers == ["blocks.0.attn"]
    exp = xai_core.explain(model, x, method="attention", head="max")  # default: the last layer
    torch.testing.assert_close(exp.raw[0][:, 0], a2.amax(dim=1)[:, 0, 1:].reshape(2, 4, 4))
    exp = xai_core.explain(model, x, method="attention", layer="blocks.1.attn")
    torch.testing.assert_close(exp.raw[0][:, 0], a2.mean(dim=1)[:, 0, 1:].reshape(2, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", [[2, 0, 1], [[2, 0], [0, 1], [1, 1]]])
def test_grad_rollout_equals_hand_computation(kind: str, targets: list) -> None:
    model, x = tiny(kind), batch(3)
    chosen = torch.tensor(targets).reshape(3, -1)
    logits, weights = hand_forward(model, x)
    eye = torch.eye(17, dtype=x.dtype)
    expected = []
    for k in range(chosen.shape[1]):
        grads = torch.autograd.grad(
            logits.gather(1, chosen[:, k : k + 1]).sum(), weights, retain_graph=True
        )
        a1, a2 = ((g * a).clamp(min=0).mean(dim=1) for g, a in zip(grads, weights, strict=True))
        rollout = (eye + a2) @ (eye + a1)  # R = (I + Abar_2)(I + Abar_1)
        expected.append(rollout[:, 0, 1:].reshape(3, 4, 4))
    exp = xai_core.explain(model, x.detach(), method="grad_rollout", targets=targets)
    torch.testing.assert_close(exp.raw[0], torch.stack(expected, dim=1))
    assert not exp.details["target_independent"]


def test_mean_pooled_model_without_class_token() -> None:
    """No class token: the map is the mean over all token rows; a 2:3 input gives a 4x6 grid."""
    model, x = tiny(class_token=False, size=(8, 12)), batch(2, (8, 12))
    with torch.no_grad():
        _, (a1, a2) = hand_forward(model, x)
    eye = torch.eye(24, dtype=x.dtype)
    t1, t2 = (0.5 * a.mean(dim=1) + 0.5 * eye for a in (a1, a2))  # rows already sum to 1
    exp = xai_core.explain(model, x, method="rollout")
    torch.testing.assert_close(exp.raw[0][:, 0], (t2 @ t1).mean(dim=1).reshape(2, 4, 6))
    assert exp.details["class_token"] is False and exp.details["grid"] == (4, 6)
    for method in METHODS:
        maps = xai_core.explain(model, x, method=method).maps
        assert maps.shape == (2, 8, 12) and bool(torch.isfinite(maps).all())


def test_token_layout_rule() -> None:
    assert token_layout(197, (224, 224), None) == (True, (14, 14))
    assert token_layout(196, (224, 224), None) == (False, (14, 14))
    assert token_layout(393, (224, 448), None) == (True, (14, 28))
    assert token_layout(50, (224, 224), True) == (True, (7, 7))  # ViT-B/32
    # Extra leading tokens: DeiT's class + distillation, class + 4 registers (DINOv2-reg).
    assert token_layout(198, (224, 224), None) == (2, (14, 14))
    assert token_layout(201, (224, 224), True) == (5, (14, 14))
    assert token_layout(201, (224, 224), 5) == (5, (14, 14))
    for tokens, class_token in [(197, False), (196 + 20, None), (198, 1)]:
        with pytest.raises(CapabilityError, match="patch grid"):
            token_layout(tokens, (224, 224), class_token)


# -- capture: torchvision's way of calling nn.MultiheadAttention -----------------------------------


def test_capture_attention_keeps_what_the_caller_asked_for() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), capture_attention({"mha": mha}) as seen:
        assert mha(x, x, x, need_weights=False)[1] is None
        averaged = mha(x, x, x)[1]  # defaults: need_weights=True, average_attn_weights=True
        per_head = mha(x, x, x, None, True, None, False)[1]  # flags given positionally
    assert [w.shape for w in seen.outputs["mha"]] == [(2, 2, 5, 5)] * 3
    torch.testing.assert_close(averaged, seen.outputs["mha"][1].mean(dim=1))
    torch.testing.assert_close(per_head, seen.outputs["mha"][2])
    assert hook_count(mha) == 0


# -- torchvision -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    # torchvision zero-initialises the classifier: every logit and every gradient would be 0.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchvision_vit_b_16(vit: nn.Module, method: str) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = state(vit)
    exp = xai_core.explain(vit, x, method=method)
    assert exp.raw[0].shape == (2, 1, 14, 14)
    assert exp.maps.shape == (2, 224, 224)
    assert bool(torch.isfinite(exp.maps).all())
    assert bool((exp.maps.flatten(1).std(dim=1) > 0).all())  # not constant, per sample
    assert exp.details["class_token"] is True
    assert len(exp.details["attention_layers"]) == 12
    assert state(vit) == before


# -- errors and restored state ---------------------------------------------------------------------


def test_declared_but_unrecorded_attention_is_an_error() -> None:
    model, x = tiny(record=False), batch(2)
    for method in METHODS:
        with pytest.raises(CapabilityError, match="record_attention"):
            xai_core.explain(model, x, method=method)
        assert hook_count(model) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_hooks_removed_and_state_restored(kind: str, method: str) -> None:
    model, x = tiny(kind), batch(2)
    model.train()
    model.blocks[0].requires_grad_(False)
    model.head.eval()
    before = state(model)
    xai_core.explain(model, x, method=method)
    assert state(model) == before
    with pytest.raises(TargetError):
        xai_core.explain(model, x, method=method, targets=99)
    assert state(model) == before


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("attention", {"head": "avg"}),
        ("attention", {"head": 2}),
        ("attention", {"layer": 2}),
        ("rollout", {"head_fusion": 0}),
        ("rollout", {"discard_ratio": 1.0}),
    ],
)
def test_bad_options(method: str, options: dict) -> None:
    model = tiny()
    with pytest.raises(OptionError):
        xai_core.explain(model, batch(1), method=method, **options)
    assert hook_count(model) == 0


@pytest.mark.parametrize("cls", [RawAttention, AttentionRollout, GradAttentionRollout])
def test_conformance(cls: type) -> None:
    testing = pytest.importorskip("xai_core.testing", reason="xai_core.testing not written yet")
    testing.check_explainer(cls, model=tiny(), inputs=batch(2))
