"""A tensor dataset's batches are what an executor pickles to its workers: each must carry its
own images only, not the storage of the whole tensor it was cut from."""

from __future__ import annotations

import pickle

import torch

from xai_core.workflows.datasets import DataStream


def test_a_batch_pickles_to_its_own_size_not_the_whole_tensor() -> None:
    x = torch.rand(64, 3, 32, 32)
    masks = torch.rand(64, 32, 32) > 0.5
    stream = DataStream(x, batch_size=4, labels=torch.arange(64) % 3, masks=masks)
    batches = list(stream)
    assert len(batches) == 16
    one_batch = x[:4].clone().numel() * x.element_size()
    for batch in batches:
        size = len(pickle.dumps(batch))
        assert size < 2 * one_batch + 20_000, size  # a view would pickle all 64 images (16x)
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), x, rtol=0, atol=0)
    assert torch.equal(torch.cat([b.masks for b in batches]), masks)
