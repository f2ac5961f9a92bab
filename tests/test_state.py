"""Hooks are always removed and the user's model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xai_core
from xai_core.core.errors import TargetError
from xai_core.testing import tiny_cnn
from xai_core.torch.capture import capture, hook_count, preserved_state


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hook_count(model),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


@pytest.fixture
def messy_model() -> nn.Module:
    """A model in the middle of training: train mode, a frozen layer, accumulated grads."""
    model = tiny_cnn()
    model.train()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    model[7].eval()  # mixed flags must come back mixed
    return model


def test_state_restored_after_success(messy_model, images):
    before = snapshot(messy_model)
    xai_core.explain(messy_model, images, method="gradcam", targets="all", layers=["0", "2"])
    assert_same(before, snapshot(messy_model))


def test_state_restored_when_a_target_is_invalid_mid_call(messy_model, images):
    before = snapshot(messy_model)
    with pytest.raises(TargetError):
        # The target is checked against the scores, i.e. after the forward pass with hooks on.
        xai_core.explain(messy_model, images, method="gradcam", targets=[0, 99])
    assert_same(before, snapshot(messy_model))


def test_state_restored_when_the_model_raises(messy_model, images):
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("model failure")

    messy_model.insert(5, Boom())
    before = snapshot(messy_model)
    with pytest.raises(RuntimeError, match="model failure"):
        xai_core.explain(messy_model, images, method="gradcam", layer="3")
    assert_same(before, snapshot(messy_model))


def test_preserved_state_restores_batchnorm_statistics_changed_inside():
    model = tiny_cnn()
    before = snapshot(model)
    with preserved_state(model):
        model.train()  # a misbehaving explainer that runs in train mode
        model(torch.randn(4, 3, 8, 8))
    assert_same(before, snapshot(model))


def test_capture_removes_hooks_when_the_body_raises():
    model = tiny_cnn()
    with pytest.raises(ValueError), capture({"0": model[0]}):
        assert hook_count(model) == 1
        raise ValueError
    assert hook_count(model) == 0


def test_capture_keeps_true_output_despite_inplace_relu():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True))
    x = torch.randn(1, 1, 6, 6)
    expected = model[0](x)
    with torch.no_grad(), capture({"0": model[0]}, detach=True) as seen:
        model(x)
    assert (seen.last("0") < 0).any()  # negatives survive: ReLU changed a clone, not the record
    assert torch.allclose(seen.last("0"), expected)


def test_capture_records_every_call_of_a_module_used_twice():
    block = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), block, block)
    with torch.no_grad(), capture({"1": block}, detach=True) as seen:
        model(torch.randn(1, 1, 3, 3))
    assert len(seen.outputs["1"]) == 2


def test_default_layer_of_a_transformer_is_the_tokens_entering_the_last_attention(caplog):
    from xai_core.demo.models import DemoViT

    model = DemoViT(depth=2).eval()
    adapter = xai_core.adapt(model)
    with caplog.at_level("INFO", logger="xai_core"):
        assert adapter.default_layer(torch.randn(1, 1, 64, 64)) == "blocks.1.norm1"
    assert "the tokens entering the last self-attention, 'blocks.1.attention'" in caplog.text
    assert hook_count(model) == 0


class LearnedQueries(nn.Module):
    """Conv features read by an attention whose queries are learned (as DETR's): the tokens
    entering the last attention are no patch grid, so the default stays the conv map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.queries = nn.Embedding(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        tokens = f.flatten(2).transpose(1, 2)
        q = self.queries(torch.arange(3).expand(len(x), -1))  # (N, 3, 8)
        return self.fc(self.attention(q, tokens, tokens)[0].mean(dim=1))


class OneInputAttention(nn.Module):
    """Self-attention that projects its one input itself (timm's ``Attention(x)``)."""

    xai_attention = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(1, 2)).softmax(dim=-1) @ v


class OneBlockViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 2, 2)
        self.norm = nn.LayerNorm(8)
        self.attention = OneInputAttention(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # no class token: mean pooling
        return self.head((t + self.attention(self.norm(t))).mean(dim=1))


def test_default_layer_with_a_one_input_self_attention():
    model, x = OneBlockViT().eval(), torch.randn(2, 1, 8, 6)
    assert xai_core.adapt(model).default_layer(x) == "norm"
    exp = xai_core.explain(model, x, method="gradcam", relu=False)  # 12 tokens on a 4 x 3 grid
    assert exp.layers == ["norm"] and exp.raw[0].shape == (2, 1, 4, 3)
    assert exp.details["token_layers"] == {"norm": (False, (4, 3))}


def test_default_layer_ignores_attention_queries_that_are_no_patch_grid():
    adapter = xai_core.adapt(LearnedQueries().eval())
    assert adapter.default_layer(torch.randn(1, 1, 6, 7)) == "conv"


def test_default_layer_is_last_spatial_and_reported(caplog):
    model = tiny_cnn()
    adapter = xai_core.adapt(model)
    with caplog.at_level("INFO", logger="xai_core"):
        assert adapter.default_layer(torch.randn(1, 3, 8, 8)) == "4"
    assert "chose layer '4'" in caplog.text
    assert hook_count(model) == 0
