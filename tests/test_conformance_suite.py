"""The conformance suite passes good explainers and catches each kind of broken one."""

from __future__ import annotations

import pytest
import torch

import xai_core
from xai_core import Attribution, Tags
from xai_core.core.errors import ConformanceError
from xai_core.testing import check_explainer, explainer_checks, parametrize_with_checks


class Good:
    """Channel occlusion: |x_c| weighted by the target score's drop when channel c is zeroed.

    Cheap, forward passes only (model-agnostic), target-dependent, batch-independent, and a
    correct attribution: positive where the requested class's evidence is.
    """

    name = "good"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        scores = model.forward(inputs)
        resolved = targets.resolve(scores)
        base = resolved.select(scores).detach()  # (N, K)
        drops = []
        for c in range(inputs.shape[1]):
            hidden = inputs.clone()
            hidden[:, c] = 0
            drops.append(base - resolved.select(model.forward(hidden)).detach())
        weights = torch.stack(drops, dim=-1)  # (N, K, C)
        maps = torch.einsum("nkc,nc...->nk...", weights, inputs.abs()) * scale
        return Attribution(maps=maps, scores=scores.detach())


class LeaksHook(Good):
    name = "leaks_hook"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        model.module.register_forward_hook(lambda *a: None)
        return super().explain(model, inputs, targets, scale=scale)


class ChangesWeights(Good):
    name = "changes_weights"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        with torch.no_grad():
            next(model.module.parameters()).mul_(1.0001)
        return super().explain(model, inputs, targets, scale=scale)


class BatchDependent(Good):
    name = "batch_dependent"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = result.maps / result.maps.sum()  # normalised over the whole batch
        return result


class SwallowsOptions(Good):
    name = "swallows_options"

    def explain(self, model, inputs, targets, **options):
        return super().explain(model, inputs, targets)


class ModifiesInputs(Good):
    name = "modifies_inputs"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        inputs.mul_(1.0)
        inputs.add_(1e-3)
        return super().explain(model, inputs, targets, scale=scale)


class Noisy(Good):
    name = "noisy"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = result.maps + torch.rand_like(result.maps)
        return result


class IgnoresTargetCount(Good):
    name = "ignores_target_count"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = result.maps[:, :1]
        return result


class NoTags:
    name = "no_tags"

    def explain(self, model, inputs, targets):
        pass


def test_a_good_explainer_passes_every_check():
    check_explainer(Good)


@pytest.mark.parametrize(
    ("cls", "check"),
    [
        (LeaksHook, "state_restored"),
        (ChangesWeights, "state_restored"),
        (BatchDependent, "batch_invariance"),
        (SwallowsOptions, "protocol"),
        (ModifiesInputs, "inputs_untouched"),
        (Noisy, "stateless"),
        (IgnoresTargetCount, "multi_target"),
        (NoTags, "protocol"),
    ],
)
def test_each_broken_explainer_is_caught_by_its_check(cls, check):
    checks = {c.name: c for c in explainer_checks(cls)}
    with pytest.raises(ConformanceError):
        checks[check]()
    with pytest.raises(ConformanceError, match=check):
        check_explainer(cls)


def test_conformance_on_a_3d_model():
    check_explainer(Good, model=xai_core.testing.tiny_cnn(dims=3, channels=1))


# -- the kit on every built-in explainer, one test per (method, check) --------------------------


def tiny_vit():
    """A 2-block ViT on non-square 32x48 images (a 4x6 patch grid: a transposed map shows)."""
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=(32, 48),
            patch_size=8,
            depth=2,
            embed_dim=16,
            num_heads=2,
            num_classes=3,
        ).eval()


def builtins():
    from xai_attention import AttentionRollout, GradAttentionRollout, RawAttention
    from xai_cam import CAM
    from xai_global import Aggregate, GlobalOcclusion
    from xai_gradcam import GradCAM
    from xai_occlusion import Occlusion

    vit = {"model": tiny_vit(), "inputs": torch.randn(2, 3, 32, 48)}
    return [
        GradCAM,
        (GradCAM, {"options": {"variant": "gradcam++"}}),
        (GradCAM, {"options": {"variant": "guided"}}),
        (GradCAM, {"options": {"relu": False}}),  # signed maps: the sign check matters most
        CAM,
        (Occlusion, {"options": {"window": 3, "stride": 2}}),
        # Aggregate is tagged model-agnostic but needs what its local method needs (Grad-CAM's
        # gradients and layers), which the ONNX adapter offers too (its graph's tail in torch).
        (Aggregate, {"options": {"local": "gradcam"}}),
        (Aggregate, {"options": {"local": "occlusion", "local_options": {"window": 4}}}),
        (GlobalOcclusion, {"options": {"window": 4, "stride": 4}}),
        (RawAttention, vit),
        (AttentionRollout, vit),
        (GradAttentionRollout, vit),
    ]


@parametrize_with_checks(builtins())
def test_every_built_in_explainer_conforms(check):
    check()
