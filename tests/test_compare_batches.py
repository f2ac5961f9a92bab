"""compare(batch_size=...): each batch explained and scored on its own, the batch results merged
in sample order into the comparison of one batch (the path every engine takes, docs/scale.md).

Timing (the ``cost`` metric, ``costs``, the verdict's seconds per image) differs from run to run
and is left out of the equality checks.
"""

from __future__ import annotations

import math

import pytest
import torch

import xai_core
from tests.test_targets_segmentation import batch, unet
from xai_core import Region
from xai_core.core.errors import OptionError
from xai_core.demo import data, load_model, preprocess
from xai_core.workflows.compare import merge_details

TIMED = "cost"
KWARGS = dict(
    methods=["gradcam", "saliency"],
    metrics=["deletion", "pointing_game", "randomization", "sparseness", TIMED],
    metric_options={"deletion": {"steps": 4}, "randomization": {"stages": 2}},
)


def same_values(a, b, *, rtol=0.0, skip=(TIMED,)):
    """Per-sample values equal (bitwise by default; NaN where NaN), but the timed metric's."""
    assert a.values.keys() == b.values.keys()
    for key, value in a.values.items():
        if key[1] not in skip:
            torch.testing.assert_close(
                value, b.values[key], rtol=rtol, atol=rtol * 1e-2, equal_nan=True
            )


def same_table(a, b, *, tolerance=1e-6):
    """Every row of the table but the timed metric's: summary statistics within 1e-6."""
    rows = [r for r in a.rows() if r["metric"] != TIMED]
    other = [r for r in b.rows() if r["metric"] != TIMED]
    assert len(rows) == len(other) > 0
    for row, twin in zip(rows, other, strict=True):
        for field, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(twin[field]), (row, field)
            elif isinstance(value, float):
                assert value == pytest.approx(twin[field], abs=tolerance), (row, field)
            else:
                assert value == twin[field], (row, field)


@pytest.fixture(scope="module")
def xrays():
    demo = data.make_xrays(5, seed=3, size=64)
    return load_model("cnn"), preprocess(demo.images), demo.masks


def test_batches_merge_into_the_one_batch_comparison(xrays):
    # 2 + 2 + 1 images give the per-sample values of one batch of 5, in the same order. Not
    # bitwise: the model's convolutions add in another order on a batch of another size (a
    # batch of 1 here), so equal to float32 precision; engines given the same batch_size are
    # bitwise the same (plugins/xai-ray/tests/test_ray_compare.py).
    model, x, masks = xrays
    whole = xai_core.compare(model, x, masks=masks, **KWARGS)
    seen = []
    split = xai_core.compare(
        model, x, masks=masks, batch_size=2, progress=lambda *a: seen.append(a), **KWARGS
    )
    same_values(split, whole, rtol=1e-4)
    same_table(split, whole, tolerance=1e-4)
    for metric in whole.metrics:
        for test, twin in zip(split.pair_tests(metric), whole.pair_tests(metric), strict=True):
            assert (test.first, test.second, test.n, test.better) == (
                twin.first, twin.second, twin.n, twin.better
            )  # fmt: skip
    assert split.verdict().best == whole.verdict().best
    assert split.verdict().untrusted == whole.verdict().untrusted
    deepest = "abs_spearman_deepest"  # what the verdict's sanity check reads
    for method in whole.methods:
        key = (method, "randomization")
        torch.testing.assert_close(
            split.details[key][deepest], whole.details[key][deepest], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            split.explanations[method].maps, whole.explanations[method].maps, rtol=1e-4, atol=1e-6
        )
        assert split.explanations[method].maps.shape[0] == 5
        assert split.costs[method].seconds_per_image == split.costs[method].seconds / 5
    curves = split.details[("gradcam", "deletion")]["curves"]
    torch.testing.assert_close(
        curves, whole.details[("gradcam", "deletion")]["curves"], rtol=1e-4, atol=1e-6
    )
    # Progress: each batch's own steps, as a share of its batch, then one call per batch.
    assert {total for _, total, _ in seen} == {3}
    assert [what for _, _, what in seen if what.startswith("compared ")] == [
        f"compared {k} of 3 batches" for k in (1, 2, 3)
    ]
    assert split.estimate["forward_images"] > 0  # scaled from the first batch


def test_region_targets_are_split_with_the_batches():
    model, x = unet(), batch(5, 3, 16, 16)
    mask = torch.zeros(5, 16, 16, dtype=torch.bool)
    mask[:, :4] = True
    boxes = torch.tensor([[[0, 8], [0, 8]], [[4, 12], [4, 12]]] * 2 + [[[8, 16], [0, 8]]])
    for target in (Region(1, mask=mask), Region([0, 1, 2, 3, 1], box=boxes)):
        kwargs = dict(targets=target, methods=["gradcam"], metrics=["sparseness"])
        whole = xai_core.compare(model, x, **kwargs)
        split = xai_core.compare(model, x, batch_size=2, **kwargs)
        torch.testing.assert_close(
            split.explanations["gradcam"].maps, whole.explanations["gradcam"].maps
        )
        assert torch.equal(split.targets, whole.targets)


def test_merge_details_rules():
    first = {"curves": torch.ones(3, 5), "per_stage": torch.zeros(2, 3), "kind": "logit",
             "fractions": torch.linspace(0, 1, 5), "hits": 2, "nested": {"n": 1.5}}  # fmt: skip
    second = {"curves": torch.zeros(2, 5), "per_stage": torch.ones(2, 2), "kind": "logit",
              "fractions": torch.linspace(0, 1, 5), "hits": 2, "nested": {"n": 0.5}}  # fmt: skip
    merged = merge_details([first, second], [3, 2])
    assert merged["curves"].shape == (5, 5) and merged["curves"][3:].sum() == 0
    assert merged["per_stage"].shape == (2, 5)  # samples on the last axis
    assert merged["kind"] == "logit" and torch.equal(merged["fractions"], first["fractions"])
    assert merged["hits"] == [2, 2]  # one batch's count each: not a count of all samples
    assert merged["nested"] == {"n": [1.5, 0.5]}


def test_batch_size_is_checked(xrays):
    model, x, _ = xrays
    for bad in (0, -1, True, 2.5):
        with pytest.raises(OptionError, match="batch_size"):
            xai_core.compare(model, x, methods=["gradcam"], metrics=[], batch_size=bad)


def test_a_batch_carries_only_its_own_samples():
    # What an executor sends to a worker: a batch pickles to its own size, not the inputs'.
    import pickle

    from xai_core.workflows.compare import _split

    x = torch.zeros(64, 3, 32, 32)
    masks = torch.zeros(64, 32, 32, dtype=torch.bool)
    batches = _split(x, masks, torch.zeros(64, dtype=torch.long), 8)
    assert [len(b) for b in batches] == [8] * 8 and batches[3].start == 24
    assert len(pickle.dumps(batches[0])) < len(pickle.dumps(x)) / 4
