"""Explanation: shapes by request, normalisation, upsampling, host copies."""

from __future__ import annotations

import numpy as np
import torch

import xai_core
from xai_core.core.explanation import Explanation, normalize, upsample


def make(raw, multi_target=False, multi_layer=False, shape=(2, 3, 8, 8)):
    return Explanation(
        method="m",
        raw=raw,
        layers=[f"l{i}" for i in range(len(raw))],
        targets=None,
        scores=torch.zeros(shape[0], 4),
        input_shape=shape,
        multi_target=multi_target,
        multi_layer=multi_layer,
    )


def test_constant_map_normalises_to_zeros_not_nan():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).reshape(4, 4)])
    out = normalize(maps, 2)
    assert torch.equal(out[0], torch.zeros(4, 4))
    assert out[1].min() == 0 and out[1].max() == 1


def test_normalisation_is_per_map():
    exp = make([torch.stack([torch.ones(1, 8, 8), 5 * torch.rand(1, 8, 8)])])
    norm = exp.normalized()
    assert norm.shape == (2, 8, 8)
    assert norm[0].abs().sum() == 0 and norm[1].max() == 1


def test_upsample_is_bilinear_without_overshoot_2d_and_trilinear_3d():
    coarse = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    fine = upsample(coarse[None, None], (8, 8))[0, 0]
    ref = torch.nn.functional.interpolate(
        coarse[None, None], (8, 8), mode="bilinear", align_corners=False
    )
    assert torch.equal(fine, ref[0, 0])
    assert fine.min() >= 0 and fine.max() <= 1
    vol = upsample(torch.rand(1, 1, 2, 2, 2), (4, 6, 6))
    assert vol.shape == (1, 1, 4, 6, 6)


def test_maps_keep_target_and_layer_axes_only_when_asked():
    raw = [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)]
    assert make(raw, multi_target=True, multi_layer=True).maps.shape == (2, 3, 2, 8, 8)
    one = [torch.rand(2, 1, 4, 4)]
    assert make(one).maps.shape == (2, 8, 8)
    assert make(one, multi_target=True).maps.shape == (2, 1, 8, 8)
    assert make(raw, multi_target=True, multi_layer=True).layer("l1").shape == (2, 3, 8, 8)


def test_numpy_and_cpu_copies(images, cnn):
    exp = xai_core.explain(cnn, images, method="gradcam")
    arr = exp.numpy(normalized=True)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 16, 16) and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 1
    assert exp.cpu().maps.device.type == "cpu"
    summary = exp.summary()
    assert summary["method"] == "gradcam" and summary["plugin"] == "xai-gradcam"
    assert summary["model"]["kind"] == "torch" and exp.seconds > 0
