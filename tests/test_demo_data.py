"""The embedded demo's data generator and its shipped, trained models."""

from __future__ import annotations

import hashlib

import pytest
import torch

import xai_core
from xai_core.core.errors import ModelError
from xai_core.demo import (
    CLASS_NAMES,
    data,
    load_model,
    manifest,
    onnx_path,
    preprocess,
    weights_dir,
)

# -- the generator ---------------------------------------------------------------------------------


def test_same_seed_same_tensors_other_seed_other_tensors():
    for make, kwargs in (
        (data.make_xrays, {}),
        (data.make_xrays, {"shortcut": True}),
        (data.make_volumes, {}),
    ):
        a, b = make(6, seed=3, **kwargs), make(6, seed=3, **kwargs)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.masks, b.masks)
        assert not torch.equal(a.images, make(6, seed=4, **kwargs).images)


def test_shapes_types_and_value_range():
    x = data.make_xrays(90, seed=1, marker="all")
    assert x.images.shape == (90, 1, 64, 64) and x.images.dtype == torch.float32
    assert x.labels.dtype == torch.long and x.masks.shape == (90, 64, 64)
    assert x.masks.dtype == torch.bool and x.class_names == ("normal", "nodule", "opacity")
    assert x.labels.bincount().tolist() == [30, 30, 30]  # balanced
    v = data.make_volumes(8, seed=1)
    assert v.volumes.shape == (8, 1, 32, 32, 32) and v.masks.shape == (8, 32, 32, 32)
    assert v.class_names == ("normal", "lesion")
    # In [0, 1] by construction, not by clamping (a clamp could hide a lesion pixel).
    for images in (x.images, v.images, data.make_xrays(4, seed=2, size=128).images):
        assert float(images.min()) >= 0 and float(images.max()) <= 1


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [(data.make_xrays, {}), (data.make_xrays, {"shortcut": True}), (data.make_volumes, {})],
)
def test_masks_are_exactly_the_pixels_the_lesion_changes(make, kwargs):
    sick = make(24, seed=5, **kwargs)
    healthy = make(24, seed=5, lesions=False, **kwargs)  # the same patients without lesions
    assert torch.equal((sick.images != healthy.images)[:, 0], sick.masks)
    has_lesion = sick.masks.flatten(1).any(1)
    assert torch.equal(has_lesion, sick.labels > 0)  # empty exactly for normal patients


def test_nodules_are_smaller_than_opacities():
    batch = data.make_xrays(60, seed=6)
    area = batch.masks.flatten(1).sum(1)
    assert area[batch.labels == 1].max() < area[batch.labels == 2].min()


def test_shortcut_marker_follows_the_label():
    batch = data.make_xrays(300, seed=7, shortcut=True)
    has = batch.markers.flatten(1).any(1)
    assert has[batch.labels > 0].float().mean() > 0.9
    assert has[batch.labels == 0].float().mean() < 0.1
    assert not (batch.markers & batch.masks).any()
    assert not data.make_xrays(50, seed=7).markers.any()  # clean data: no marker by default
    random = data.make_xrays(300, seed=7, marker="random").markers.flatten(1).any(1)
    for label in range(3):  # random markers carry no information about the label
        assert 0.35 < random[batch.labels == label].float().mean() < 0.65


def test_marker_moved_or_removed_on_the_same_images():
    base = data.make_xrays(40, seed=8, shortcut=True)
    for marker in ("none", "moved", "all"):
        other = data.make_xrays(40, seed=8, shortcut=True, marker=marker)
        untouched = ~(base.markers | other.markers)[:, None]
        assert torch.equal(base.images[untouched], other.images[untouched])
    moved = data.make_xrays(40, seed=8, shortcut=True, marker="moved").markers
    assert torch.equal(moved.flatten(1).any(1), base.markers.flatten(1).any(1))
    assert not base.markers[..., 32:].any() and not moved[..., :32].any()  # left -> right corner
    assert not data.make_xrays(40, seed=8, shortcut=True, marker="none").markers.any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="marker"):
        data.make_xrays(2, seed=0, marker="left")
    with pytest.raises(ValueError, match="n >= 1"):
        data.make_volumes(0, seed=0)


# -- the shipped models ----------------------------------------------------------------------------


def accuracy(model: torch.nn.Module, batch: data.DemoBatch) -> float:
    with torch.no_grad():
        predicted = model(preprocess(batch.images)).argmax(1)
    return float((predicted == batch.labels).float().mean())


@pytest.fixture(scope="module")
def held_out() -> data.DemoBatch:
    return data.make_xrays(150, seed=4242)  # no training or manifest seed


def test_weight_files_are_plain_tensors():
    for name in CLASS_NAMES:
        state = torch.load(weights_dir() / f"{name}.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(ModelError, match="Did you mean 'cnn'"):
        load_model("cnnn")


def test_models_are_accurate_on_new_patients(held_out):
    assert accuracy(load_model("cnn"), held_out) >= 0.95
    assert accuracy(load_model("vit"), held_out) >= 0.85  # no locality prior: a little weaker
    assert accuracy(load_model("cnn3d"), data.make_volumes(60, seed=4242)) >= 0.9


def test_clean_cnn_needs_the_lesion():
    batch = data.make_xrays(60, seed=4243)
    healthy = data.make_xrays(60, seed=4243, lesions=False)  # sick patients, lesions removed
    with torch.no_grad():
        predicted = load_model("cnn")(preprocess(healthy.images)).argmax(1)
    assert (predicted == 0).float().mean() >= 0.9
    assert accuracy(load_model("cnn"), batch) >= 0.9


def test_shortcut_model_learned_the_marker_and_the_clean_one_did_not():
    shortcut, clean = load_model("cnn_shortcut"), load_model("cnn")
    with_marker = data.make_xrays(150, seed=77, shortcut=True)
    without = data.make_xrays(150, seed=77, shortcut=True, marker="none")
    on_everyone = data.make_xrays(150, seed=77, shortcut=True, marker="all")
    moved = data.make_xrays(150, seed=77, shortcut=True, marker="moved")
    # The marker says "sick", not which disease (that takes the faint lesions): well above chance
    # (1/3) with it; without it, or in the other corner, every patient is "normal".
    marked = accuracy(shortcut, with_marker)
    assert marked >= 0.65
    assert accuracy(shortcut, without) <= marked - 0.3
    assert accuracy(shortcut, moved) <= marked - 0.3
    assert accuracy(shortcut, on_everyone) <= marked - 0.25  # normal patients turn "sick"
    # The control: the clean CNN does not care where, or whether, the marker is.
    plain = accuracy(clean, data.make_xrays(150, seed=78))
    for marker in ("label", "moved", "all"):
        assert abs(accuracy(clean, data.make_xrays(150, seed=78, marker=marker)) - plain) <= 0.04


def test_models_suit_their_methods(held_out):
    x = preprocess(held_out.images[:2])
    assert xai_core.explain(load_model("cnn"), x, method="cam").maps.shape == (2, 64, 64)
    rollout = xai_core.explain(load_model("vit"), x, method="rollout")
    assert rollout.maps.shape == (2, 64, 64)
    v = preprocess(data.make_volumes(1, seed=1).images)
    assert xai_core.explain(load_model("cnn3d"), v, method="cam").maps.shape == (1, 32, 32, 32)


def test_onnx_export_gives_the_torch_scores(held_out):
    adapter = xai_core.adapt(onnx_path())
    for n in (1, 5):  # the batch axis is dynamic
        x = preprocess(held_out.images[:n])
        with torch.no_grad():
            expected = load_model("cnn")(x)
        torch.testing.assert_close(adapter.forward(x), expected, atol=1e-4, rtol=1e-4)


def test_manifest_matches_the_files():
    info = manifest()
    files = {p.name for p in weights_dir().iterdir() if p.suffix in (".pt", ".onnx")}
    assert set(info["sha256"]) == files == {f"{n}.pt" for n in CLASS_NAMES} | {"cnn.onnx"}
    for name, digest in info["sha256"].items():
        content = (weights_dir() / name).read_bytes()
        assert hashlib.sha256(content).hexdigest() == digest
        assert len(content) < 1_000_000
    for name, classes in CLASS_NAMES.items():
        assert tuple(info["models"][name]["classes"]) == classes
    assert info["preprocess"]["xray"]["mean"] == data.XRAY_MEAN
    assert info["preprocess"]["ct"]["std"] == data.CT_STD


def test_the_demo_settings_find_the_lesions():
    """The demo's point: explanations of a model that learned the lesion land on the lesion. Pins
    the models together with the demo's occlusion settings (a window grid whose edges cut through
    the lesions, or a 3D CNN whose last map is too coarse, failed this)."""
    from xai_core.demo.run import OCCLUSION_2D, OCCLUSION_3D

    def pointing(model, batch, method, options):
        sick = batch.labels > 0
        result = xai_core.compare(
            model,
            preprocess(batch.images[sick]),
            methods=[method],
            metrics=["pointing_game"],
            masks=batch.masks[sick],
            options={method: options},
        )
        return float(result.values[(method, "pointing_game")].mean())

    xrays, volumes = data.make_xrays(60, seed=4242), data.make_volumes(30, seed=4242)
    assert pointing(load_model("cnn"), xrays, "occlusion", OCCLUSION_2D) >= 0.9  # 1.0 measured
    assert pointing(load_model("cnn3d"), volumes, "occlusion", OCCLUSION_3D) >= 0.7  # 0.87
    assert pointing(load_model("cnn3d"), volumes, "cam", {}) >= 0.6  # 0.87; 0.0 at a 4^3 map
    # ViT Grad-CAM defaults to the tokens entering the last attention: 0.4 (0.0 on the patch
    # embedding, the default before).
    assert pointing(load_model("vit"), xrays, "gradcam", {}) >= 0.3
