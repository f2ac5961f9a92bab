"""The single places of issue 15 item 3: one normalisation, one runnable() lookup, one
chunked evaluation, one guarded hook loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xai_core
from xai_core.core.api import runnable
from xai_core.core.errors import CapabilityError, OptionError
from xai_core.core.explanation import normalize


def test_normalize_over_valid_pixels_only():
    maps = torch.tensor([[[0.0, 2.0], [4.0, 100.0]], [[3.0, 3.0], [3.0, -7.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    out = normalize(maps, 2, valid)
    # Sample 0: range 0..4 over the valid pixels; sample 1 is constant there: zeros.
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(out, expected)


def test_normalize_of_a_numpy_array_matches_numpy_min_max():
    a = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    ours = normalize(torch.from_numpy(a), a.ndim).numpy()
    low, high = float(a.min()), float(a.max())
    np.testing.assert_array_equal(ours, (a - low) / (high - low))
    assert not normalize(torch.ones(2, 2), 2).any()


def test_evaluate_in_chunks_bounds_each_call_and_reports_progress():
    from xai_core.torch.ops import evaluate_in_chunks

    seen, reports = [], []

    def evaluate(index):
        seen.append(index.numel())
        return index.float()[:, None] * 2

    out = torch.zeros(10, 1)
    done = evaluate_in_chunks(evaluate, out, 4, progress=lambda *a: reports.append(a))
    assert done == 10 and seen == [4, 4, 2]
    torch.testing.assert_close(out[:, 0], torch.arange(10.0) * 2)
    assert reports == [
        (4, 10, "perturbed inputs"),
        (8, 10, "perturbed inputs"),
        (10, 10, "perturbed inputs"),
    ]
    # Given rows, counted on from earlier work towards an overall total.
    out = torch.zeros(10, 1)
    reports.clear()
    done = evaluate_in_chunks(
        evaluate,
        out,
        2,
        torch.tensor([7, 1, 3]),
        progress=lambda *a: reports.append(a),
        done=5,
        total=20,
        what="refined",
    )
    assert done == 8 and [r[0] for r in reports] == [7, 8] and reports[0][1:] == (20, "refined")
    assert out[:, 0].nonzero().flatten().tolist() == [1, 3, 7]


class ForwardOnly(xai_core.ModelAdapter):
    """A plugin-style adapter that offers the forward pass alone."""

    kind = "forward-only"

    def __init__(self, module):
        self.module_ = module

    def forward(self, inputs):
        return self.module_(inputs)


def test_runnable_checks_scope_then_capabilities_and_lists_what_runs(cnn):
    info, adapter = runnable("gradcam", cnn)
    assert info.name == "gradcam" and isinstance(adapter, xai_core.TorchAdapter)
    with pytest.raises(OptionError, match="'gradcam' is a local method; try 'aggregate'"):
        runnable("gradcam", cnn, scope=xai_core.Scope.GLOBAL, wrong_scope="try 'aggregate'")
    with pytest.raises(CapabilityError, match=r"gradients.*can run on this model: .*occlusion"):
        runnable("gradcam", ForwardOnly(cnn), scope=xai_core.Scope.LOCAL)


def test_the_core_adapts_before_any_plugin_is_loaded_and_adapt_model_is_not_firstresult(cnn):
    registry = xai_core.Registry()
    assert isinstance(registry.adapt(cnn), xai_core.TorchAdapter)
    assert not registry._loaded  # a PyTorch module never imports third-party plugins
    # The registry iterates the implementations itself (one guard each): the spec says so.
    assert not registry.pm.hook.adapt_model.spec.opts.get("firstresult")
