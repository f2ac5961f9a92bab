"""Segmentation (region) and multi-label targets, checked against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core import Region
from xai_core.core.errors import CapabilityError, TargetError, TargetTypeError
from xai_core.testing import tiny_cnn


class UNet(nn.Module):
    """A two-level U-Net: encoder, bottleneck, upsampling, skip connection, 1x1 class head."""

    def __init__(self, dims: int = 2, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims = dims
        self.enc = nn.Sequential(conv(channels, 6, 3, padding=1), nn.ReLU())
        self.bottleneck = nn.Sequential(conv(6, 8, 3, padding=1), nn.ReLU())
        self.dec = nn.Sequential(conv(14, 6, 3, padding=1), nn.ReLU())
        self.head = conv(6, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        deep = self.bottleneck(pool(skip, 2))
        up = F.interpolate(deep, size=skip.shape[2:], mode="nearest")
        return self.head(self.dec(torch.cat([up, skip], dim=1)))


def unet(dims: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(dims, channels=3 if dims == 2 else 1).eval()


def batch(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_seg_gradcam(model, x, layer, classes, regions):
    """Seg-Grad-CAM by hand: a hook keeps the layer's output, autograd differentiates
    sum_{u in region} logit_c(u) per sample, alpha = spatial mean of the gradient."""
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    acts = kept[0]
    maps = []
    for i in range(x.shape[0]):
        y = (out[i, classes[i]] * regions[i]).sum()
        (grad,) = torch.autograd.grad(y, acts, retain_graph=True)
        alpha = grad[i].mean(dim=tuple(range(1, grad.ndim - 1)))
        maps.append(torch.einsum("c,c...->...", alpha, acts[i].detach()).clamp(min=0))
    return torch.stack(maps)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_with_a_mask_target_matches_a_hand_written_seg_gradcam(dims):
    model = unet(dims)
    x = batch(2, 3, 16, 16) if dims == 2 else batch(2, 1, 8, 12, 12)
    spatial = x.shape[2:]
    mask = torch.zeros(2, *spatial, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, ..., 3:9] = True
    exp = xai_core.explain(
        model, x, method="gradcam", layer="bottleneck", targets=Region([1, 3], mask=mask)
    )
    ref = reference_seg_gradcam(model, x, model.bottleneck, [1, 3], mask)
    assert exp.raw[0].shape == (2, 1, *ref.shape[1:])
    torch.testing.assert_close(exp.raw[0][:, 0], ref)
    assert exp.targets.tolist() == [[1], [3]]
    assert exp.maps.shape == (2, *spatial)


def test_default_target_is_the_largest_predicted_class_over_its_predicted_region():
    model, x = unet(), batch(2, 3, 16, 16)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    area = torch.stack([torch.bincount(p.flatten(), minlength=4) for p in predicted])
    largest = area.argmax(1)
    exp = xai_core.explain(model, x, method="gradcam", layer="bottleneck")
    assert exp.targets[:, 0].tolist() == largest.tolist()
    assert torch.equal(exp.regions[:, 0], predicted == largest.view(2, 1, 1))
    ref = reference_seg_gradcam(
        model, x, model.bottleneck, largest.tolist(), predicted == largest.view(2, 1, 1)
    )
    torch.testing.assert_close(exp.raw[0][:, 0], ref)
    # Plain class ints on a segmentation output mean Region(classes): the predicted region.
    chosen = int(predicted[0, 0, 0])
    plain = xai_core.explain(model, x[:1], method="gradcam", layer="bottleneck", targets=chosen)
    ref = reference_seg_gradcam(model, x[:1], model.bottleneck, [chosen], predicted[:1] == chosen)
    torch.testing.assert_close(plain.raw[0][:, 0], ref)


def test_ignore_skips_the_background_in_the_default():
    model, x = unet(), batch(2, 3, 16, 16)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    area = torch.stack([torch.bincount(p.flatten(), minlength=4) for p in predicted]).float()
    top = int(area[0].argmax())
    area[:, top] = -1
    exp = xai_core.explain(model, x, method="gradcam", targets=Region(ignore=[top]))
    assert exp.targets[:, 0].tolist() == area.argmax(1).tolist()


def brute_force_occlusion(model, x, window, stride, score):
    """Occlusion by a plain Python loop over windows: zero a box, record the score drop."""
    size = x.shape[2:]
    with torch.no_grad():
        base = score(model(x))
        total = torch.zeros(x.shape[0], *size)
        count = torch.zeros(*size)
        for r in range(0, size[0] - window + 1, stride):
            for c in range(0, size[1] - window + 1, stride):
                occluded = x.clone()
                occluded[:, :, r : r + window, c : c + window] = 0
                drop = base - score(model(occluded))
                total[:, r : r + window, c : c + window] += drop.view(-1, 1, 1)
                count[r : r + window, c : c + window] += 1
    return torch.where(count > 0, total / count.clamp(min=1), 0)


@pytest.mark.parametrize("incremental", [False, "exact"])
def test_occlusion_with_a_box_target_matches_a_brute_force_loop(incremental):
    model, x = unet(), batch(2, 3, 32, 32)  # 32 x 32: the incremental engine qualifies
    box = torch.tensor([[[4, 20], [6, 30]], [[0, 10], [10, 32]]])  # (N, rank, (start, stop))
    classes = torch.tensor([2, 0])

    def score(out):
        region = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.bool)
        for i, ((r0, r1), (c0, c1)) in enumerate(box.tolist()):
            region[i, r0:r1, c0:c1] = True
        return torch.stack([(out[i, classes[i]] * region[i]).sum() for i in range(len(out))])

    exp = xai_core.explain(
        model,
        x,
        method="occlusion",
        targets=Region(classes, box=box),
        window=8,
        stride=8,
        incremental=incremental,
    )
    assert exp.details["incremental"]["mode"] == ("exact" if incremental else "off")
    torch.testing.assert_close(exp.maps, brute_force_occlusion(model, x, 8, 8, score))


def test_occlusion_keeps_the_predicted_region_fixed_under_perturbation():
    model, x = unet(), batch(1, 3, 16, 16)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    c = int(predicted.flatten().bincount(minlength=4).argmax())
    region = predicted == c  # fixed on the unoccluded input, as documented

    def score(out):
        return (out[:, c] * region).flatten(1).sum(1)

    exp = xai_core.explain(model, x, method="occlusion", window=4, stride=4)
    torch.testing.assert_close(exp.maps, brute_force_occlusion(model, x, 4, 4, score))


def test_3d_segmentation_runs_every_target_method_with_a_box():
    model, x = unet(dims=3), batch(1, 1, 8, 12, 12)
    target = Region(1, box=[[0, 4], [2, 10], [2, 10]])
    runs = [("gradcam", {"layer": "bottleneck", "variant": v}) for v in ("gradcam", "gradcam++")]
    for method, options in [*runs, ("occlusion", {"window": 4})]:
        exp = xai_core.explain(model, x, method=method, targets=target, **options)
        assert exp.maps.shape == (1, 8, 12, 12)
        assert torch.isfinite(exp.maps).all() and exp.maps.abs().sum() > 0


def test_several_region_targets_equal_one_call_per_class():
    model, x = unet(), batch(2, 3, 16, 16)
    mask = batch(2, 16, 16, seed=5) > 0
    both = xai_core.explain(
        model, x, method="gradcam", layer="bottleneck", targets=Region([[1, 2], [0, 3]], mask=mask)
    )
    assert both.maps.shape == (2, 2, 16, 16)
    for k, classes in enumerate(([1, 0], [2, 3])):
        one = xai_core.explain(
            model, x, method="gradcam", layer="bottleneck", targets=Region(classes, mask=mask)
        )
        torch.testing.assert_close(both.maps[:, k], one.maps)


class TokenSegmenter(nn.Module):
    """A one-block vision transformer with a per-patch segmentation head, (N, C, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x)
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens)[0]
        return self.head(tokens).transpose(1, 2).unflatten(2, patches.shape[2:])


def test_attention_methods_take_region_targets():
    model, x = TokenSegmenter().eval(), batch(2, 3, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    exp = xai_core.explain(model, x, method="grad_rollout", targets=Region([0, 2], mask=mask))
    # The same scalar through an independent path: a callable target summing the region.
    index = torch.tensor([0, 2])

    def summed(out):
        return (out[torch.arange(2), index] * mask).flatten(1).sum(1)

    ref = xai_core.explain(model, x, method="grad_rollout", targets=summed)
    torch.testing.assert_close(exp.maps, ref.maps)
    raw = xai_core.explain(model, x, method="rollout", targets=Region(mask=mask))
    assert raw.maps.shape == (2, 16, 16)


def test_cam_refuses_segmentation_heads_with_a_typed_error():
    model, x = TokenSegmenter().eval(), batch(1, 3, 16, 16)
    with pytest.raises(CapabilityError, match="segmentation"):
        xai_core.explain(model, x, method="cam")
    with pytest.raises(CapabilityError, match="segmentation"):
        xai_core.explain(model, x, method="cam", targets=Region(0))


def test_torchvision_segmentation_models_return_dicts_and_are_explained():
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    ).eval()
    x = batch(1, 3, 64, 64)
    with torch.no_grad():
        assert isinstance(model(x), dict) and model(x)["out"].shape == (1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 16:48, 16:48] = True
    exp = xai_core.explain(
        model, x, method="gradcam", layer="backbone.16", targets=Region(1, mask=mask)
    )
    assert exp.maps.shape == (1, 64, 64) and torch.isfinite(exp.maps).all()
    assert exp.scores.shape == (1, 3, 64, 64)
    occ = xai_core.explain(model, x, method="occlusion", targets=Region(1, mask=mask), window=32)
    assert occ.details["evaluations"] == 9 and torch.isfinite(occ.maps).all()


def test_fcn_resnet50_with_random_weights():
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=2).eval()
    exp = xai_core.explain(model, batch(1, 3, 64, 64), method="gradcam", layer="backbone.layer4")
    assert exp.maps.shape == (1, 64, 64) and torch.isfinite(exp.maps).all()


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (Region(1, mask=torch.ones(2, 8, 8, dtype=torch.bool)), TargetError, "output grid"),
        (Region(1, mask=torch.ones(2, 16, 16)), TargetTypeError, "bool"),
        (Region(1, mask=torch.ones(3, 16, 16, dtype=torch.bool)), TargetError, "one row"),
        (Region(1, box=[[0, 20], [0, 4]]), TargetError, "start < stop"),
        (Region(1, box=[[4, 4], [0, 4]]), TargetError, "start < stop"),
        (Region(1, box=[[0, 4]]), TargetError, "2 output axes"),
        (Region(1, box=[[0.0, 4.0], [0, 4]]), TargetTypeError, "integer"),
        (Region(1, mask=torch.zeros(2, 16, 16, dtype=torch.bool)), TargetError, "empty"),
        (Region(1, box=[[0, 4], [0, 4]], mask=torch.ones(2, 16, 16).bool()), TargetError, "not"),
        (Region("all"), TargetTypeError, "class indices"),
        (Region(ignore=["background"]), TargetTypeError, "ignore"),
        (Region(ignore=list(range(4))), TargetError, "predicted anywhere"),
        ("all", TargetError, "segmentation"),
        (7, TargetError, "out of range"),
    ],
)
def test_bad_region_targets_raise_typed_errors(target, error, match):
    with pytest.raises(error, match=match):
        xai_core.explain(unet(), batch(2, 3, 16, 16), method="gradcam", targets=target)


def test_a_region_on_a_classifier_is_refused():
    with pytest.raises(TargetError, match="segmentation outputs"):
        xai_core.explain(tiny_cnn(), batch(1, 3, 16, 16), method="gradcam", targets=Region(1))


def test_unpredicted_class_is_an_error_not_a_flat_map():
    model, x = unet(), batch(1, 3, 16, 16)
    with torch.no_grad():
        present = set(model(x).argmax(1).flatten().tolist())
    absent = next(c for c in range(4) if c not in present)
    with pytest.raises(TargetError, match="predicts it nowhere"):
        xai_core.explain(model, x, method="gradcam", targets=absent)


# -- multi-label ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options"), [("gradcam", {}), ("occlusion", {"window": 4, "stride": 4})]
)
def test_multi_label_targets_equal_looping_single_targets(method, options):
    model, x = tiny_cnn(classes=5), batch(3, 3, 16, 16)
    labels = torch.tensor([[0, 3, 4], [1, 2, 3], [4, 0, 2]])  # several positives per sample
    exp = xai_core.explain(model, x, method=method, targets=labels, **options)
    assert exp.maps.shape == (3, 3, 16, 16) and exp.targets.tolist() == labels.tolist()
    for k in range(3):
        one = xai_core.explain(model, x, method=method, targets=labels[:, k], **options)
        torch.testing.assert_close(exp.maps[:, k], one.maps)


def test_sigmoid_probability_target_rescales_the_logit_map_by_its_derivative():
    """Multi-label heads: the logit is explained by default; a callable target explains the
    sigmoid probability instead. For Grad-CAM, d sigma(z) = sigma'(z) dz, so the map is the logit
    map times sigma(z) (1 - sigma(z)) per sample: saturated findings fade."""
    model, x = tiny_cnn(classes=5), batch(3, 3, 16, 16)
    logit = xai_core.explain(model, x, method="gradcam", targets=[[1, 4]] * 3, relu=False)
    prob = xai_core.explain(
        model, x, method="gradcam", targets=lambda out: out[:, [1, 4]].sigmoid(), relu=False
    )
    with torch.no_grad():
        s = model(x)[:, [1, 4]].sigmoid()
    torch.testing.assert_close(prob.maps, logit.maps * (s * (1 - s)).view(3, 2, 1, 1))


def test_compare_keeps_the_region_of_a_region_target():
    model, x = unet(), batch(2, 3, 16, 16)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :4] = True
    target = Region(1, mask=mask)  # class 1 need not be predicted anywhere: the mask counts
    result = xai_core.compare(model, x, targets=target, methods=["gradcam"], metrics=[])
    alone = xai_core.explain(model, x, method="gradcam", targets=target)
    torch.testing.assert_close(result.explanations["gradcam"].maps, alone.maps)


def test_global_aggregate_keeps_the_region_of_a_region_target():
    from xai_core.core.explanation import normalize

    model, x = unet(), batch(2, 3, 16, 16)
    with torch.no_grad():
        present = set(model(x).argmax(1).flatten().tolist())
    absent = next(c for c in range(4) if c not in present)  # only the mask makes it explainable
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:12, 4:12] = True
    target = Region(absent, mask=mask)
    summed = xai_core.explain(model, x, method="aggregate", targets=target)
    local = xai_core.explain(model, x, method="gradcam", targets=target)
    torch.testing.assert_close(summed.maps, normalize(local.maps, 2))
