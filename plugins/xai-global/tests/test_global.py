"""Global explainers: per-class aggregation against a hand loop, global occlusion against the mean
of per-image occlusion, streaming against one batch, and how they fit the Explainer protocol."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from xai_global import Aggregate, GlobalOcclusion

import xai_core
from xai_core.core.errors import CapabilityError, OptionError, TargetError, UnknownOptionError
from xai_core.testing import check_explainer, tiny_cnn
from xai_core.workflows.datasets import ClassMaps, explain_dataset

CLASSES = 4


@pytest.fixture
def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 1, 2, 0, 1, 3, 3, 1, 0])
    return x, y


def by_hand(model, x, y, method, normalized, **options):
    """Each image explained alone, grouped by label, mean and population std per class."""
    maps = {c: [] for c in range(CLASSES)}
    for i in range(x.shape[0]):
        exp = xai_core.explain(model, x[i : i + 1], method=method, targets=int(y[i]), **options)
        maps[int(y[i])].append((exp.normalized() if normalized else exp.maps)[0].double())
    mean = torch.stack([torch.stack(m).mean(0) for m in maps.values()])
    std = torch.stack([torch.stack(m).std(0, unbiased=False) for m in maps.values()])
    return mean, std, torch.tensor([len(m) for m in maps.values()])


def test_both_are_registered_as_global() -> None:
    names = {i.name for i in xai_core.list_explainers(scope="global")}
    assert {"aggregate", "global-occlusion"} <= names
    assert "aggregate" not in {i.name for i in xai_core.list_explainers(scope="local")}


def test_aggregate_equals_a_hand_loop(dataset) -> None:
    x, y = dataset
    model = tiny_cnn()
    stats = explain_dataset(model, (x, y), method="aggregate", local="gradcam", batch_size=3)
    mean, std, counts = by_hand(model, x, y, "gradcam", normalized=True)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.std, std, atol=1e-6, rtol=1e-5)


def test_global_occlusion_equals_the_mean_of_per_image_occlusion(dataset) -> None:
    x, y = dataset
    model = tiny_cnn()
    options = {"window": 8, "stride": 4}
    stats = explain_dataset(model, (x, y), method="global-occlusion", batch_size=4, **options)
    mean, std, counts = by_hand(model, x, y, "occlusion", normalized=False, **options)
    assert torch.equal(stats.counts, counts)
    torch.testing.assert_close(stats.mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.std, std, atol=1e-6, rtol=1e-5)


def test_grouping_by_every_class_averages_each_class_over_the_whole_dataset(dataset) -> None:
    x, _ = dataset
    model = tiny_cnn()
    stats = explain_dataset(model, x, method="global-occlusion", group_by="all", window=8, stride=8)
    per_image = xai_core.explain(model, x, method="occlusion", targets="all", window=8, stride=8)
    assert stats.counts.tolist() == [x.shape[0]] * CLASSES
    torch.testing.assert_close(stats.mean, per_image.maps.double().mean(0))


def test_grouping_by_prediction_uses_the_top_class(dataset) -> None:
    x, _ = dataset
    model = tiny_cnn()
    predicted = model.eval()(x).argmax(1)
    stats = explain_dataset(model, x, method="aggregate", local="gradcam")  # no labels: "auto"
    assert torch.equal(stats.counts, torch.bincount(predicted, minlength=CLASSES))


def test_streaming_a_dataloader_equals_one_big_batch(dataset) -> None:
    x, y = dataset
    model = tiny_cnn()
    whole = explain_dataset(model, (x, y), method="aggregate", local="gradcam", batch_size=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    seen = []
    streamed = explain_dataset(
        model,
        loader,
        method="aggregate",
        local="gradcam",
        progress=lambda done, total, what: seen.append((done, total)),
    )
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert torch.equal(streamed.counts, whole.counts)
    torch.testing.assert_close(streamed.sums, whole.sums)
    torch.testing.assert_close(streamed.std, whole.std)


def test_class_maps_add_up_exactly_and_keep_empty_classes_at_zero() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 5, 5, generator=g)
    classes = torch.tensor([0, 0, 2, 2, 2, 0])
    whole = ClassMaps.of(maps, classes, 3)
    parts = ClassMaps.of(maps[:2], classes[:2], 3) + ClassMaps.of(maps[2:], classes[2:], 3)
    torch.testing.assert_close(parts.mean, whole.mean)
    torch.testing.assert_close(whole.mean[2], maps[2:5].double().mean(0))
    torch.testing.assert_close(whole.std[0], maps[[0, 1, 5]].double().std(0, unbiased=False))
    assert whole.counts.tolist() == [3, 0, 3]
    assert not whole.mean[1].any() and not whole.std[1].any()


def test_explain_gives_the_per_sample_maps_and_the_batch_summary(dataset) -> None:
    x, y = dataset
    exp = xai_core.explain(tiny_cnn(), x, method="aggregate", targets=y, local="gradcam")
    assert exp.maps.shape == (10, 16, 16)
    assert exp.plugin == "xai-global" and exp.layers  # the local method's layer is reported
    summary = exp.details["global"]
    assert isinstance(summary, ClassMaps)
    assert summary.counts.tolist() == torch.bincount(y, minlength=CLASSES).tolist()
    torch.testing.assert_close(summary.mean[1], exp.maps[y == 1].double().mean(0))


# Aggregate is tagged model-agnostic, but it needs what its local method needs: Grad-CAM's
# gradients and layers, which the ONNX adapter offers (its graph's tail re-run in torch).
NEEDS_LOCAL: dict[str, str] = {}


@pytest.mark.parametrize(
    ("cls", "options", "expected"),
    [
        (Aggregate, {"local": "gradcam"}, NEEDS_LOCAL),
        (Aggregate, {"local": "occlusion", "local_options": {"window": 4}}, {}),
        (GlobalOcclusion, {"window": 4, "stride": 4}, {}),
    ],
    ids=["aggregate", "aggregate-occlusion", "global-occlusion"],
)
def test_per_sample_maps_pass_the_conformance_suite(cls, options, expected) -> None:
    check_explainer(cls, options=options, expected_failures=expected)


def test_mistakes_are_typed_errors(dataset) -> None:
    x, _ = dataset
    model = tiny_cnn()
    with pytest.raises(OptionError, match="global method"):
        xai_core.explain(model, x, method="aggregate", local="global-occlusion")
    with pytest.raises(TargetError, match="class indices"):
        xai_core.explain(model, x, method="aggregate", targets=lambda s: s[:, 0])
    with pytest.raises(OptionError, match="one layer at a time"):
        xai_core.explain(model, x, method="aggregate", local_options={"layers": ["0", "3"]})
    with pytest.raises(UnknownOptionError):
        explain_dataset(model, x, method="aggregate", locall="gradcam")
    with pytest.raises(OptionError, match="local method"):
        explain_dataset(model, x, method="gradcam")
    with pytest.raises(OptionError, match="needs labels"):
        explain_dataset(model, x, method="aggregate", group_by="label")
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, CLASSES))
    with pytest.raises(CapabilityError, match="cam"):
        xai_core.explain(linear, x, method="aggregate", local="cam")
