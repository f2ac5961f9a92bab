"""Faults seen in plugins written from the docs: the kit catches each, naming the fault."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xai_core.core.errors import ConformanceError
from xai_core.core.targets import Targets
from xai_core.testing import check_explainer, explainer_checks

from .test_conformance_suite import Good


class ExplainsTopClass(Good):
    """(a) Resolves the targets, then explains each sample's top class anyway."""

    name = "explains_top_class"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        k = targets.resolve(model.forward(inputs)).count
        top = Targets(None, inputs.shape[0], inputs.device)
        result = super().explain(model, inputs, top, scale=scale)
        result.maps = result.maps.expand(-1, k, *result.maps.shape[2:])
        return result


class Transposed(Good):
    """(b) H and W swapped: invisible on square inputs."""

    name = "transposed"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = result.maps.transpose(-1, -2).contiguous()
        return result


class FixedGrid(Good):
    """(b) Always a 7x7 grid, whatever the input's aspect."""

    name = "fixed_grid"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = F.adaptive_avg_pool2d(result.maps, 7)
        return result


class SeedsTorch(Good):
    """(c) Seeds the caller's global generators for 'reproducibility'."""

    name = "seeds_torch"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        torch.manual_seed(0)
        return super().explain(model, inputs, targets, scale=scale)


class SeedsNumpy(Good):
    name = "seeds_numpy"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        np.random.seed(0)
        return super().explain(model, inputs, targets, scale=scale)


class SeedsRandom(Good):
    name = "seeds_random"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        random.seed(0)
        return super().explain(model, inputs, targets, scale=scale)


class Float64(Good):
    """(d) Computes in float64 and returns that."""

    name = "float64"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = result.maps.double()
        return result


class SignFlipped(Good):
    """(e) Lower means more important: the convention inverted."""

    name = "sign_flipped"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        result = super().explain(model, inputs, targets, scale=scale)
        result.maps = -result.maps
        return result


@pytest.mark.parametrize(
    ("cls", "check", "fault"),
    [
        (ExplainsTopClass, "targets_honoured", "target ignored"),
        (Transposed, "grid", "looks transposed"),
        (FixedGrid, "grid", r"wrong grid: raw map 0 has grid \(7, 7\)"),
        (SeedsTorch, "global_rng", "torch.manual_seed"),
        (SeedsNumpy, "global_rng", "np.random.seed"),
        (SeedsRandom, "global_rng", "random.seed"),
        (Float64, "dtype", "torch.float64 but the inputs are torch.float32"),
        (SignFlipped, "sign", "sign-flipped"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_each_fault_is_caught_by_its_check_with_a_message_naming_it(cls, check, fault):
    checks = {c.name: c for c in explainer_checks(cls)}
    with pytest.raises(ConformanceError, match=fault):
        checks[check]()
    with pytest.raises(ConformanceError, match=f"- {check}: .*{fault}"):
        check_explainer(cls)


def test_the_faults_pass_the_checks_of_before():
    """Each fault slips through every check the kit had before these (why they were added)."""
    before = {
        "protocol", "result", "inputs_untouched", "state_restored", "state_restored_on_error",
        "batch_invariance", "stateless", "multi_target",
    }  # fmt: skip
    for cls in (ExplainsTopClass, Transposed, SeedsTorch, Float64, SignFlipped):
        for check in explainer_checks(cls):
            if check.name in before:
                check()


def test_the_global_rng_check_leaves_no_trace_on_the_callers_state():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    checks = {c.name: c for c in explainer_checks(Good)}
    checks["global_rng"]()
    assert torch.equal(torch.rand(3), expected)
