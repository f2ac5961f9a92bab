"""Fuzzing the result contract: every malformed explainer or metric result a plugin can return
raises PluginContractError naming the plugin, and every well-formed one passes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xai_core
from xai_core import Attribution, Registry, Tags
from xai_core.core.api import run_explainer
from xai_core.core.errors import PluginContractError
from xai_core.core.metrics import Direction, MetricResult
from xai_core.testing import tiny_cnn

CLASSES = 4
MAP_FAULTS = [
    "n",  # wrong batch size
    "k",  # wrong number of targets
    "flatten",  # (N * K, *grid): the target axis folded into the batch
    "extra_dim",  # grid of the wrong rank
    "missing_dim",
    "empty_grid",
    "int_dtype",
    "nonfinite",
    "meta",  # on another device than the model
    "not_tensor",
]
FAULTS = [
    *MAP_FAULTS,
    "scores_n",
    "scores_1d",
    "scores_nonfinite",
    "scores_meta",
    "scores_int",
    "not_attribution",
    "no_resolve",
    "layer_names",
    "details",
]


class Fuzzed:
    """Returns the result ``case`` describes: well-formed for kind "ok", one fault otherwise."""

    name = "fuzzed"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets, *, case: dict):
        scores = model.forward(inputs).detach()
        kind, n = case["kind"], inputs.shape[0]
        if kind == "no_resolve":
            return Attribution(torch.zeros(n, 1, *inputs.shape[2:]), scores)
        k = targets.resolve(scores).count
        maps = [torch.rand(n, k, *grid).to(case["dtype"]) for grid in case["grids"]]
        layers = [f"layer{i}" for i in range(len(maps))] if case["named"] else []
        details: object = {"seed": 1}
        i = case["pick"] % len(maps)
        m, delta = maps[i], case["delta"]
        if kind == "n":
            maps[i] = torch.rand(max(n + delta, 0), k, *m.shape[2:])
        elif kind == "k":
            maps[i] = torch.rand(n, max(k + delta, 0), *m.shape[2:])
        elif kind == "flatten":
            maps[i] = m.flatten(0, 1)
        elif kind == "extra_dim":
            maps[i] = m.unsqueeze(-1).expand(*m.shape, 2)
        elif kind == "missing_dim":
            maps[i] = m[..., 0]
        elif kind == "empty_grid":
            maps[i] = m[..., :0]
        elif kind == "int_dtype":
            maps[i] = (m * 10).to(case["int_dtype"])
        elif kind == "nonfinite":
            m = m.clone()
            m.view(-1)[case["pick"] % m.numel()] = case["bad_value"]
            maps[i] = m
        elif kind == "meta":
            maps[i] = m.to("meta")
        elif kind == "not_tensor":
            maps[i] = m.tolist()
        elif kind == "scores_n":
            scores = scores[:-1] if n > 1 else torch.cat([scores, scores])
        elif kind == "scores_1d":
            scores = scores[:, 0]
        elif kind == "scores_nonfinite":
            scores = scores.clone()
            scores[case["pick"] % n, 0] = case["bad_value"]
        elif kind == "scores_meta":
            scores = scores.to("meta")
        elif kind == "scores_int":
            scores = scores.long()
        elif kind == "not_attribution":
            return {"maps": maps, "scores": scores}
        elif kind == "layer_names":
            layers = [f"layer{j}" for j in range(len(maps) + 1)]
        elif kind == "details":
            details = ["not", "a", "dict"]
        result = maps if case["as_list"] or len(maps) > 1 else maps[0]
        return Attribution(result, scores, layers, details)


class _Plugin:
    @xai_core.hookimpl
    def register_explainers(self, register):
        register(Fuzzed)


REGISTRY = Registry(entry_points_group=None)
REGISTRY.register_plugin(_Plugin(), "fuzz", distribution="xai-fuzz", version="0.1")
MODEL = REGISTRY.adapt(tiny_cnn(classes=CLASSES))


@st.composite
def cases(draw, kinds=("ok", *FAULTS)):
    n, k, layers = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    delta = draw(st.integers(-3, 3).filter(bool))
    return {
        "n": n,
        "targets": None if k == 1 and draw(st.booleans()) else [list(range(k))] * n,
        "kind": draw(st.sampled_from(kinds)),
        "grids": [draw(st.tuples(st.integers(1, 8), st.integers(1, 8))) for _ in range(layers)],
        "dtype": draw(st.sampled_from([torch.float16, torch.float32, torch.float64])),
        "int_dtype": draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool])),
        "bad_value": draw(st.sampled_from([math.nan, math.inf, -math.inf])),
        "named": draw(st.booleans()),
        "as_list": draw(st.booleans()),
        "pick": draw(st.integers(0, 1000)),
        "delta": delta,
    }


def _run(case: dict):
    inputs = torch.rand(case["n"], 3, 16, 16)
    info = REGISTRY.get_explainer("fuzzed")
    return run_explainer(info, MODEL, inputs, case["targets"], {"case": case})


@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_explainer_results_are_checked_against_the_contract(case):
    if case["kind"] == "ok":
        exp = _run(case)
        k = 1 if case["targets"] is None else len(case["targets"][0])
        assert [tuple(m.shape) for m in exp.raw] == [(case["n"], k, *g) for g in case["grids"]]
        return
    with pytest.raises(PluginContractError) as err:
        _run(case)
    message = str(err.value)
    assert "xai-fuzz" in message and "'fuzzed'" in message and "contract" in message


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("flatten", r"shape \(4, 32, 32\).*\(N=2, K=2, 2 spatial sizes\)"),
        ("n", r"shape \(3, 2, 32, 32\)"),
        ("nonfinite", r"NaN or infinite"),
        ("meta", r"is on meta"),
    ],
)
def test_the_error_says_what_was_wrong(kind, says):
    case = {
        "n": 2, "targets": [[0, 1], [0, 1]], "kind": kind, "grids": [(32, 32)], "pick": 0,
        "dtype": torch.float32, "bad_value": math.nan, "named": False, "as_list": False,
        "delta": 1,
    }  # fmt: skip
    with pytest.raises(PluginContractError, match=says):
        _run(case)


# -- metrics through compare() ---------------------------------------------------------------

METRIC_FAULTS = ["n", "column", "scalar", "inf", "complex", "meta", "not_result", "list", "details"]


class FuzzedMetric:
    name = "fuzzed_metric"
    direction = Direction.HIGHER
    needs = frozenset()

    def compute(self, context, *, case: dict | None = None):
        case = case or {"kind": "ok", "dtype": torch.float64, "nan": False}
        n, kind = context.inputs.shape[0], case["kind"]
        values = torch.arange(n, dtype=torch.float64).to(case["dtype"])
        if case["nan"] and values.is_floating_point():
            values[0] = math.nan  # undefined for this sample: allowed
        if kind == "n":
            values = torch.zeros(max(n + case["delta"], 0))
        elif kind == "column":
            values = values[:, None]
        elif kind == "scalar":
            values = values.sum()
        elif kind == "inf":
            values = values.double()
            values[-1] = math.inf
        elif kind == "complex":
            values = values.to(torch.complex64)
        elif kind == "meta":
            values = values.to("meta")
        elif kind == "not_result":
            return values
        elif kind == "list":
            values = values.tolist()
        return MetricResult(values, ["bad"] if kind == "details" else {})


class Steady:
    """A well-behaved metric next to the fuzzed one."""

    name = "steady"
    direction = Direction.HIGHER
    needs = frozenset()

    def compute(self, context):
        return MetricResult(context.maps.flatten(1).mean(1))


class Flat:
    name = "flat"
    tags = Tags("local", "model-agnostic")

    def explain(self, model, inputs, targets):
        scores = model.forward(inputs).detach()
        k = targets.resolve(scores).count
        return Attribution(torch.ones(inputs.shape[0], k, *inputs.shape[2:]), scores)


class _MetricPlugin:
    @xai_core.hookimpl
    def register_metrics(self, register):
        register(FuzzedMetric)
        register(Steady)

    @xai_core.hookimpl
    def register_explainers(self, register):
        register(Flat)
        register(Fuzzed)


def test_metric_results_are_checked_in_compare(fresh_registry):
    fresh_registry.register_plugin(_MetricPlugin(), "fuzz", distribution="xai-fuzz", version="1")
    model = tiny_cnn(classes=CLASSES)

    @settings(max_examples=25, deadline=None)
    @given(
        kind=st.sampled_from(["ok", *METRIC_FAULTS]),
        n=st.integers(1, 3),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
        nan=st.booleans(),
        delta=st.integers(-2, 2).filter(bool),
    )
    def check(kind, n, dtype, nan, delta):
        case = {"kind": kind, "dtype": dtype, "nan": nan, "delta": delta}
        result = xai_core.compare(
            model,
            torch.rand(n, 3, 16, 16),
            methods=["flat"],
            metrics=["fuzzed_metric", "steady"],
            metric_options={"fuzzed_metric": {"case": case}},
        )
        assert ("flat", "steady") not in result.errors  # the other metric still ran
        assert result.values[("flat", "steady")].tolist() == [1.0] * n
        rows = {r["metric"]: r for r in result.rows()}
        assert rows["steady"]["rank"] == 1
        values = result.values[("flat", "fuzzed_metric")]
        if kind == "ok":
            assert ("flat", "fuzzed_metric") not in result.errors
            expected = torch.arange(n, dtype=torch.float64).to(dtype).double()
            if nan and dtype.is_floating_point:
                expected[0] = math.nan
            torch.testing.assert_close(values, expected, equal_nan=True)
            # NaN marks a sample the metric could not score; with no finite value left there is
            # nothing to rank (hypothesis found n=1 with the one value NaN).
            ranked = bool(expected.isfinite().any())
            assert rows["fuzzed_metric"]["rank"] == (1 if ranked else None)
            return
        error = result.errors[("flat", "fuzzed_metric")]
        assert error.startswith("PluginContractError") and "xai-fuzz" in error
        assert values.isnan().all()  # the malformed values are never kept
        assert rows["fuzzed_metric"]["rank"] is None  # and never ranked

    check()


def test_a_method_breaking_the_contract_is_skipped_by_compare_with_the_reason(fresh_registry):
    fresh_registry.register_plugin(_MetricPlugin(), "fuzz", distribution="xai-fuzz", version="1")
    case = {
        "kind": "nonfinite", "grids": [(4, 4)], "dtype": torch.float32, "named": False,
        "as_list": False, "pick": 0, "bad_value": math.nan, "delta": 1,
    }  # fmt: skip
    result = xai_core.compare(
        tiny_cnn(classes=CLASSES),
        torch.rand(2, 3, 16, 16),
        methods=["fuzzed", "flat"],
        metrics=["steady"],
        options={"fuzzed": {"case": case}},
    )
    assert result.methods == ["flat"]
    assert result.skipped_methods["fuzzed"].startswith("PluginContractError")
    assert "xai-fuzz" in result.skipped_methods["fuzzed"]
