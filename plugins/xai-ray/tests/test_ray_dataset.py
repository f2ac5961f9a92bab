"""A Ray Data ``Dataset`` as the data of ``audit()`` / ``explain_dataset()``: with
``engine="ray"`` Ray Data runs the steps (``map_batches`` on its own actors), with the local
engine the dataset is iterated here; both give the local result on the same tensors (within
1e-6: Ray Data merges the parts in the order they finish; counts exactly). A row whose image
has another shape is a failure record. On conftest.py's Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import numpy as np
import pytest
import torch
from xai_ray import RayExecutor

import xai_core
from xai_core.core.errors import (
    ExecutorError,
    InputError,
    MissingDependencyError,
    OptionError,
)
from xai_core.demo import data, load_model, preprocess
from xai_core.report import comparison_json
from xai_core.workflows.audit import audit
from xai_core.workflows.datasets import (
    DataStream,
    RowBatches,
    explain_dataset,
    image_layout,
    record_failures,
)

AUDIT_MAPS = ("mean", "std", "share", "unexplained", "mean_image")
KWARGS = dict(method="gradcam", batch_size=4, min_images=1, reference="masks")


@pytest.fixture(scope="module")
def xrays():
    batch = data.make_xrays(24, seed=5, size=48)
    return preprocess(batch.images), batch.labels, batch.masks


@pytest.fixture(scope="module")
def model():
    return load_model("cnn")


def rows(x, y, masks, bad: int | None = None) -> list[dict]:
    """One row per image (numpy), ``bad``: the index of a row whose image is too small."""
    items = [
        {"id": f"cxr_{i:02d}", "image": x[i].numpy(), "label": int(y[i]), "mask": masks[i].numpy()}
        for i in range(x.shape[0])
    ]
    if bad is not None:
        items.insert(bad, {**items[0], "id": "bad", "image": np.zeros((1, 8, 8), np.float32)})
    return items


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(
        a.double(), b.double(), rtol=1e-6, atol=1e-6, equal_nan=True
    )  # NaN where NaN


def test_audit_of_a_ray_dataset_is_the_local_audit_and_a_bad_row_fails_alone(
    ray_session, model, xrays
):
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = xrays
    local = audit(model, (x, y, masks), **KWARGS)
    ds = ray_data.from_items(rows(x, y, masks, bad=7))
    distributed = audit(model, ds, engine=RayExecutor(workers=2), **KWARGS)
    here = audit(model, ds, **KWARGS)  # the local engine iterates the same dataset
    for result in (distributed, here):
        for name in AUDIT_MAPS:
            assert close(getattr(local, name), getattr(result, name)), name
        assert local.counts == result.counts and result.images == 24
        assert [(f.class_name, f.box) for f in result.flags] == [
            (f.class_name, f.box) for f in local.flags
        ]
        assert list(result.failed) == ["bad"] and "shape (1, 8, 8)" in result.failed["bad"]


def test_explain_dataset_of_a_ray_dataset_is_the_local_one(ray_session, model, xrays):
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = xrays
    options = dict(method="aggregate", local="gradcam", batch_size=5)
    local = explain_dataset(model, (x, y), **options)
    items = rows(x, y, masks)
    # A read stage before the step: its tasks need CPUs too (a fixed pool of actors on every
    # CPU of the cluster left none for them, and the run waited forever).
    ds = ray_data.range(len(items), override_num_blocks=4).map(lambda row: items[row["id"]])
    distributed = explain_dataset(model, ds, engine=RayExecutor(workers=2), **options)
    assert torch.equal(local.counts, distributed.counts)  # counts: exactly
    assert close(local.sums, distributed.sums) and close(local.squares, distributed.squares)


class KillingWorkers(RayExecutor):
    """Ray Data's actors kill their own process (SIGKILL) on a batch: every time (``always``), or
    only the first time any of them gets one (a ``marker`` file records that one did)."""

    def __init__(self, marker, always: bool, **options):
        super().__init__(**options)
        self.marker, self.always = str(marker), always

    def _map_dataset(self, step, dataset, rows, failed):
        marker, always = self.marker, self.always

        def killing(batch):  # a closure: pickled by value into Ray Data's actors
            if always or not os.path.exists(marker):
                open(marker, "a").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return step(batch)

        return super()._map_dataset(killing, dataset, rows, failed)


def test_a_killed_ray_data_worker_is_restarted_and_the_audit_is_the_same(
    ray_session, model, xrays, tmp_path
):
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = xrays
    local = audit(model, (x[:8], y[:8], masks[:8]), **KWARGS)
    ds = ray_data.from_items(rows(x[:8], y[:8], masks[:8]))
    engine = KillingWorkers(tmp_path / "killed", always=False, workers=2, max_retries=2)
    result = audit(model, ds, engine=engine, **KWARGS)
    assert (tmp_path / "killed").exists()  # a worker did die
    assert result.images == 8 and result.counts == local.counts and not result.failed
    for name in AUDIT_MAPS:
        assert close(getattr(local, name), getattr(result, name)), name


def test_a_batch_that_always_kills_its_worker_is_a_typed_error_not_endless_retries(
    ray_session, model, xrays, tmp_path
):
    """Ray Data alone would restart the actor and retry the batch forever."""
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = xrays
    ds = ray_data.from_items(rows(x[:4], y[:4], masks[:4]))
    engine = KillingWorkers(tmp_path / "killed", always=True, workers=1, max_retries=1)
    with pytest.raises(ExecutorError, match=r"max_retries=1"):
        audit(model, ds, engine=engine, **KWARGS)


def test_a_step_error_on_ray_data_is_raised_as_itself(ray_session, model, xrays):
    ray_data = pytest.importorskip("ray.data")
    x, y, _ = xrays
    ds = ray_data.from_items([{"image": x[i].numpy(), "label": int(y[i])} for i in range(4)])
    with pytest.raises(OptionError, match="needs masks"):  # no mask column
        audit(model, ds, engine=RayExecutor(workers=1), **KWARGS)
    with pytest.raises(OptionError, match="'label' and 'mask' columns"):
        audit(model, ds, labels=y[:4], method="gradcam")


def test_a_ray_dataset_without_pyarrow_says_what_to_install(ray_session, monkeypatch, xrays):
    ray_data = pytest.importorskip("ray.data")
    ds = ray_data.from_items([{"image": xrays[0][0].numpy()}])
    real = importlib.util.find_spec  # the stream asks whether pyarrow is there, imports nothing
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match="pip install 'xai-core\\[ray\\]'"):
        DataStream(ds)


def test_an_audit_of_a_ray_dataset_resumes(ray_session, model, xrays, tmp_path):
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = xrays
    ds = ray_data.from_items(rows(x[:8], y[:8], masks[:8]))
    first = audit(model, ds, resume=tmp_path, **KWARGS)  # the dataset iterated by the driver
    again = audit(model, ds, resume=tmp_path, **KWARGS)
    assert first.resumed == 0 and again.resumed == 8 and again.images == 8
    for name in AUDIT_MAPS:
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_rows_of_another_shape_fail_alone_and_each_is_listed():
    """RowBatches on a numpy batch as Ray Data gives a ragged one (an object column)."""
    good, small = np.ones((1, 6, 6), np.float32), np.ones((1, 3, 3), np.float32)
    images = np.empty(4, dtype=object)
    images[:] = [good, small, good * 2, small]
    rows_ = RowBatches((1, 6, 6), 4, torch.device("cpu"))
    batch, failed = rows_({"image": images, "label": np.array([0, 1, 1, 0])})
    assert torch.equal(batch.inputs, torch.from_numpy(np.stack([good, good * 2])))
    assert batch.labels.tolist() == [0, 1]
    assert list(failed) == ["a row without an 'id'", "a row without an 'id' (2)"]
    assert "shape (1, 3, 3)" in failed["a row without an 'id'"]
    everything = {"a row without an 'id'": "earlier"}
    record_failures(everything, failed)  # a later batch's failures do not replace earlier ones
    assert len(everything) == 3


COMPARE = dict(
    methods=["gradcam", "saliency"],
    metrics=["deletion", "pointing_game", "sparseness", "randomization"],
    metric_options={"deletion": {"steps": 8}, "randomization": {"stages": 2}},
    batch_size=4,
)


def test_compare_of_a_ray_dataset_is_the_local_comparison_in_the_dataset_order(
    ray_session, model, xrays
):
    """The same batches as the tensors' (the bad row last, one block): the local engine gives
    the tensors' values bitwise, Ray within 1e-6 (its workers run torch on one thread)."""
    ray_data = pytest.importorskip("ray.data")
    x, y, masks = (t[:9] for t in xrays)
    local = xai_core.compare(model, x, masks=masks, **COMPARE)
    ds = ray_data.from_items(rows(x, y, masks, bad=9), override_num_blocks=1)
    seen = []

    def bitwise(a, b):
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)

    def within(a, b):  # 1e-6
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)

    for engine, same in (("local", bitwise), (RayExecutor(workers=2), within)):
        result = xai_core.compare(
            model, ds, engine=engine, progress=lambda *a: seen.append(a), **COMPARE
        )
        assert result.sample_ids == [f"cxr_{i:02d}" for i in range(9)]  # the dataset's order
        assert list(result.failed) == ["bad"] and "shape (1, 8, 8)" in result.failed["bad"]
        assert torch.equal(result.targets, local.targets)
        assert result.methods == local.methods and not result.errors
        for method, exp in local.explanations.items():
            assert same(exp.maps, result.explanations[method].maps), (engine, method)
        for key, value in local.values.items():
            assert same(value, result.values[key]), (engine, key)
        document = json.loads(comparison_json(result))
        assert document["sample_ids"] == result.sample_ids and list(document["failed"]) == ["bad"]
    assert seen and seen[-1][1] is None  # the dataset's length is not known ahead


def test_compare_of_a_ray_dataset_checks_its_arguments(ray_session, model, xrays):
    ray_data = pytest.importorskip("ray.data")
    x, _, masks = xrays
    ds = ray_data.from_items([{"image": x[i].numpy()} for i in range(3)])
    result = xai_core.compare(
        model, ds, methods=["gradcam"], metrics=["pointing_game", "sparseness"]
    )
    assert "pointing_game" in result.skipped_metrics  # no mask column
    assert result.sample_ids is None and result.values[("gradcam", "sparseness")].shape == (3,)
    with pytest.raises(OptionError, match="'mask' column"):
        xai_core.compare(model, ds, masks=masks[:3], methods=["gradcam"])
    with pytest.raises(OptionError, match=r"targets is None .* or one class index"):
        xai_core.compare(model, ds, targets=[0, 1, 0], methods=["gradcam"])
    empty = ds.filter(lambda row: False)
    with pytest.raises(InputError, match="has no rows"):
        xai_core.compare(model, empty, methods=["gradcam"])
    unreadable = ray_data.from_items([{"id": "text", "image": "not pixels"}])
    with pytest.raises(InputError, match=r"cannot be read: .*text.*not numeric"):
        xai_core.compare(model, unreadable, methods=["gradcam"])
    fixed = xai_core.compare(model, ds, targets=1, methods=["gradcam"], metrics=["sparseness"])
    assert fixed.targets.tolist() == [1, 1, 1]


def _photos(folder):
    """scikit-image's sample photos (grey and colour) as PNG files, as a user's folder is."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    photos = {
        "camera": skimage_data.camera(),
        "coins": skimage_data.coins(),
        "astronaut": skimage_data.astronaut(),
        "coffee": skimage_data.coffee(),
    }
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return sorted(f"{name}.png" for name in photos)


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_ray_data_read_images_of_scikit_image_photos_is_the_tensor_comparison(
    ray_session, tmp_path, mode, channels
):
    """``ray.data.read_images`` gives (H, W) grey and (H, W, 3) colour images: moved to (C, H, W),
    the rows named by their paths; the values are compare() on the same pixels as a tensor."""
    ray_data = pytest.importorskip("ray.data")
    timm = pytest.importorskip("timm")
    names = _photos(tmp_path)

    def scaled(batch):  # what a user does in Ray Data before the model: 0-255 to 0-1
        batch["image"] = batch["image"].astype(np.float32) / 255
        return batch  # (a function of the test: pickled by value, Ray's workers cannot import it)

    ds = ray_data.read_images(
        str(tmp_path), size=(48, 48), mode=mode, include_paths=True
    ).map_batches(scaled)
    rows_ = sorted(ds.take_all(), key=lambda row: row["path"])
    pixels = np.stack([row["image"] for row in rows_])
    x = torch.from_numpy(pixels[:, None] if mode == "L" else pixels.transpose(0, 3, 1, 2))
    assert x.shape == (4, channels, 48, 48)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=channels)
    model.eval()
    options = dict(methods=["gradcam", "saliency"], metrics=["sparseness"], batch_size=2)
    expected = xai_core.compare(model, x, **options)
    for engine in ("local", RayExecutor(workers=2)):
        result = xai_core.compare(model, ds, engine=engine, **options)
        order = [names.index(path.rsplit("/", 1)[-1]) for path in result.sample_ids]
        assert sorted(order) == [0, 1, 2, 3]
        for method in options["methods"]:
            assert close(
                result.explanations[method].maps, expected.explanations[method].maps[order]
            )
        for key, value in expected.values.items():
            assert close(result.values[key], value[order]), (engine, key)


def test_image_layouts_are_told_from_the_first_row_and_moved_to_channels_first():
    assert [image_layout(s) for s in [(64, 64), (64, 64, 3), (48, 40, 1), (3, 64, 64)]] == [
        "hw", "hwc", "hwc", "chw"
    ]  # fmt: skip
    assert image_layout((1, 32, 32, 32)) == image_layout((32, 32, 32)) == "chw"  # volumes
    images = np.random.default_rng(0).random((2, 8, 6, 3)).astype(np.float32)
    masks = np.zeros((2, 8, 6), bool)
    to_batch = RowBatches((8, 6, 3), 2, torch.device("cpu"), layout="hwc")
    batch, failed = to_batch({"image": images, "mask": masks, "path": np.array(["a", "b"])})
    assert not failed and batch.inputs.shape == (2, 3, 8, 6) and batch.masks.shape == (2, 8, 6)
    assert torch.equal(batch.inputs[1, 2], torch.from_numpy(images[1, :, :, 2]))
    assert batch.keys == ["a", "b"]  # the paths name the rows without an 'id' column
    wrong = np.empty(2, dtype=object)
    wrong[:] = [images[0], images[1, :, :, :2]]  # the second has two channels
    batch, failed = to_batch({"image": wrong, "id": np.array(["ok", "two"])})
    assert batch.inputs.shape == (1, 3, 8, 6) and list(failed) == ["two"]
