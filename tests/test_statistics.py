"""Statistics of a comparison and its verdict: intervals in range, shared ranks, paired tests,
the randomisation sanity check, and the verdict in every export."""

from __future__ import annotations

import json
import math

import pytest
import torch

import xai_core
from xai_core.core.errors import PluginError
from xai_core.core.metrics import Direction, MetricResult, check_metric_class
from xai_core.report import comparison_json, comparison_markdown
from xai_core.testing import tiny_cnn
from xai_core.workflows import statistics
from xai_core.workflows.compare import Comparison, MethodCost, compare
from xai_core.workflows.verdict import SANITY_THRESHOLD

nan = math.nan


def table(
    values: dict[str, dict[str, list[float]]],
    directions: dict[str, Direction] | None = None,
    ranges: dict[str, tuple[float, float] | None] | None = None,
    details: dict[tuple[str, str], dict] | None = None,
    measured_once: dict[str, bool] | None = None,
) -> Comparison:
    """A Comparison from given per-sample values ``{metric: {method: [...]}}``, no model needed."""
    metrics = list(values)
    methods = list(next(iter(values.values())))
    n = len(next(iter(next(iter(values.values())).values())))
    return Comparison(
        methods=methods,
        metrics=metrics,
        directions=directions or dict.fromkeys(metrics, Direction.HIGHER),
        values={
            (method, metric): torch.tensor(v, dtype=torch.float64)
            for metric, per in values.items()
            for method, v in per.items()
        },
        details=details or {},
        explanations={},
        costs={m: MethodCost(1.0, 1.0 / n, None) for m in methods},
        targets=torch.zeros(n, dtype=torch.long),
        ranges=ranges or {},
        measured_once=measured_once or {},
    )


# -- intervals ---------------------------------------------------------------------------------


def test_wilson_interval_equals_the_hand_computed_value():
    # 3 hits in 10, z = 1.959964: centre (0.3 + z^2/20) / (1 + z^2/10) = 0.35551,
    # half-width z / (1 + z^2/10) * sqrt(0.3 * 0.7 / 10 + z^2 / 400) = 0.24772
    low, high = statistics.wilson(3, 10)
    assert (low, high) == (pytest.approx(0.10779, abs=1e-5), pytest.approx(0.60323, abs=1e-5))
    assert statistics.wilson(0, 5)[0] == 0.0 and statistics.wilson(0, 5)[1] > 0  # not degenerate
    assert statistics.wilson(5, 5) == (pytest.approx(1 - statistics.wilson(0, 5)[1]), 1.0)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_intervals_of_bounded_metrics_stay_in_range(n):
    hits = [1.0] * (n - 1) + [0.0]  # a pointing game: 0/1 per sample
    drops = [1.0] * (n - 1) + [0.0]  # avg_drop near its upper bound, not a 0/1 metric below
    drops[0] = 0.999
    result = table(
        {"pointing_game": {"a": hits}, "avg_drop": {"a": drops}},
        ranges={"pointing_game": (0.0, 1.0), "avg_drop": (0.0, 1.0)},
    )
    for metric, kind in (("pointing_game", "wilson"), ("avg_drop", "bootstrap")):
        agg = result.aggregate("a", metric)
        assert agg.n == n
        if n < statistics.MIN_N:  # too few samples: no interval, and the reason
            assert agg.kind == "none" and math.isnan(agg.low) and "n = 2 < 3" in agg.note
        else:
            assert agg.kind == kind and 0.0 <= agg.low <= agg.mean <= agg.high <= 1.0
    md = comparison_markdown(result)
    if n == 2:
        assert "| — * |" in md and "* n = 2 < 3: too few samples for an interval" in md


def test_values_outside_the_declared_range_are_not_clipped_and_say_so():
    logits = [2.5, 3.0, 4.0, 3.5]  # deletion with kind="logit" leaves [0, 1]
    result = table({"deletion": {"a": logits}}, ranges={"deletion": (0.0, 1.0)})
    agg = result.aggregate("a", "deletion")
    assert agg.high > 1.0 and "outside the declared range" in agg.note


def test_bootstrap_is_seeded_reproducible_and_leaves_the_global_state():
    x = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.5, 0.2], dtype=torch.float64)
    state = torch.random.get_rng_state()
    first = statistics.bootstrap_interval(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert statistics.bootstrap_interval(x) == first
    assert statistics.bootstrap_interval(x, seed=1) != first
    assert first[0] < float(x.mean()) < first[1]
    means = statistics.bootstrap_means(x, resamples=4000)
    assert float(means.std()) == pytest.approx(float(x.std(unbiased=False)) / 6**0.5, rel=0.1)


# -- ranks and paired tests --------------------------------------------------------------------


def test_equal_means_share_a_rank():
    assert statistics.competition_ranks([1 / 3, 1 / 3, 1 / 3], True) == [1, 1, 1]
    assert statistics.competition_ranks([0.2, 0.5, 0.5, nan, 0.1], True) == [3, 1, 1, None, 4]
    assert statistics.competition_ranks([0.1 + 0.2, 0.3, 0.4], False) == [1, 1, 3]  # fp noise
    assert statistics.average_ranks([0.2, 0.5, 0.5], True) == [3, 1.5, 1.5]


def test_cam_and_gradcam_tie_on_a_gap_linear_network(fresh_registry):
    model = tiny_cnn()
    with torch.no_grad():
        model[-1].weight.abs_()  # CAM >= 0, so Grad-CAM's map is CAM / (H W): the same map
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = compare(
        model,
        x,
        methods=["cam", "gradcam"],
        metrics=["deletion", "avg_increase"],
        metric_options={"deletion": {"steps": 8}},
    )
    for metric in result.metrics:
        assert result.ranks(metric) == {"cam": 1, "gradcam": 1}, metric
        assert result.tied_with("cam", metric) == ["gradcam"]
    assert result.verdict().best == ["cam", "gradcam"]
    assert "Best (tied): cam and gradcam" in result.verdict().lines[0]


def test_identical_methods_are_not_distinguishable_and_a_clear_winner_is():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(20, generator=gen, dtype=torch.float64) * 0.5
    result = table(
        {
            "insertion": {
                "good": (base + 0.3).tolist(),
                "same": base.tolist(),
                "twin": base.tolist(),
            }
        },
        ranges={"insertion": (0.0, 1.0)},
    )
    tests = {(t.first, t.second): t for t in result.pair_tests("insertion")}
    assert tests[("same", "twin")].p == 1.0 and not tests[("same", "twin")].significant
    assert tests[("good", "same")].better == "good" and tests[("good", "same")].p_adjusted < 1e-3
    assert result.tied_with("same", "insertion") == ["twin"]
    assert result.tied_with("good", "insertion") == []
    verdict = result.verdict()
    assert verdict.best == ["good"]
    assert any("good is significantly better than same on insertion" in s for s in verdict.lines)


def test_paired_test_direction_follows_the_hodges_lehmann_shift():
    a = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1], dtype=torch.float64)
    assert statistics.hodges_lehmann(torch.tensor([1.0, 2.0, 3.0])) == 2.0
    same = statistics.paired_test(a, a.clone())
    assert (same.p, same.n, same.shift) == (1.0, 7, 0.0)
    shifted = statistics.paired_test(a, a - 0.1)
    assert shifted.shift == pytest.approx(0.1) and shifted.p == pytest.approx(2 / 2**7)
    few = statistics.paired_test(a[:2], a[:2] - 1)
    assert math.isnan(few.p) and few.n == 2


def test_holm_adjusts_step_down():
    adjusted = statistics.holm([0.01, 0.04, 0.03, nan])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, nan], nan_ok=True)


def test_too_few_samples_cannot_show_a_difference_and_the_verdict_says_so():
    result = table({"insertion": {"a": [0.9, 0.8, 0.95, 0.9], "b": [0.1, 0.2, 0.15, 0.1]}})
    assert not any(t.significant for t in result.pair_tests("insertion"))  # min p = 0.125
    verdict = result.verdict()
    assert verdict.untestable == ["insertion"]
    assert any("not evidence" in line for line in verdict.lines)
    assert not any("is not distinguishable from" in line for line in verdict.lines)


def test_cost_is_shown_but_not_ranked_or_averaged():
    result = table(
        {"cost": {"a": [0.1] * 5, "b": [0.3] * 5}, "insertion": {"a": [0.5] * 5, "b": [0.6] * 5}},
        directions={"cost": Direction.LOWER, "insertion": Direction.HIGHER},
        measured_once={"cost": True},
    )
    assert result.ranks("cost") == {"a": None, "b": None}
    assert result.aggregate("a", "cost").kind == "none" and result.pair_tests("cost") == []
    assert result.verdict().metrics == ["insertion"]
    assert "measured once per method: no interval" in comparison_markdown(result)


# -- randomisation and the verdict -------------------------------------------------------------


def test_verdict_flags_a_method_that_survives_randomisation_even_if_it_wins_everything():
    n = 8
    wins, loses = [0.9] * n, [0.2] * n
    result = table(
        {
            "insertion": {"edges": wins, "gradcam": loses},
            "pointing_game": {"edges": [1.0] * n, "gradcam": [0.0] * n},
            "randomization": {"edges": [1.0] * n, "gradcam": [0.1] * n},
        },
        directions={
            "insertion": Direction.HIGHER,
            "pointing_game": Direction.HIGHER,
            "randomization": Direction.LOWER,
        },
        details={
            ("edges", "randomization"): {"abs_spearman_deepest": torch.ones(n)},
            ("gradcam", "randomization"): {"abs_spearman_deepest": torch.full((n,), 0.05)},
        },
    )
    verdict = result.verdict()
    assert verdict.untrusted == ["edges"] and verdict.best == ["gradcam"]
    assert [s.method for s in verdict.methods] == ["gradcam", "edges"]  # untrusted last
    edges = verdict.methods[1]
    assert edges.trusted is False and edges.position is None and edges.sanity == 1.0
    assert edges.mean_rank < verdict.methods[0].mean_rank  # it did win the other scores
    assert any(line.startswith("Untrustworthy: edges") for line in verdict.lines)
    assert SANITY_THRESHOLD == 0.5


def test_verdict_without_randomisation_says_the_check_was_not_run():
    result = table({"insertion": {"a": [0.5, 0.6, 0.7], "b": [0.1, 0.2, 0.3]}})
    verdict = result.verdict()
    assert all(s.trusted is None for s in verdict.methods)
    assert any("Sanity check not run" in line for line in verdict.lines)


def test_verdict_is_first_in_markdown_and_in_strict_json():
    result = table(
        {"pointing_game": {"a": [1.0, nan, 0.0], "b": [nan, nan, 1.0]}},
        ranges={"pointing_game": (0.0, 1.0)},
    )
    md = comparison_markdown(result)
    assert md.startswith("### Verdict") and md.index("### Verdict") < md.index("### pointing_game")
    text = comparison_json(result)
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["verdict"]["best"] == ["b"]  # mean 1 of one sample beats 0.5
    assert data["verdict"]["methods"][0]["method"] == "b"
    assert data["metrics"]["pointing_game"]["range"] == [0.0, 1.0]
    row = next(r for r in data["results"] if r["method"] == "b")
    assert row["n"] == 1 and row["ci_low"] is None and row["interval"] == "none"


def test_html_report_opens_with_the_escaped_verdict():
    from xai_core.report import HtmlReport

    result = table({"insertion": {"<b>x</b>": [0.9, 0.8, 0.7], "cam": [0.1, 0.2, 0.3]}})
    report = HtmlReport()
    report.add_comparison(result)
    page = report.render()
    assert page.index('<section class="verdict">') < page.index("<h2>Comparison</h2>")
    assert "<b>x</b>" not in page and "Best: &lt;b&gt;x&lt;/b&gt;" in page


def test_metric_range_is_checked_at_registration():
    class Ranged:
        name = "ranged"
        direction = Direction.HIGHER
        needs = frozenset()
        range = (0.0, 1.0)

        def compute(self, context):
            return MetricResult(context.maps.flatten(1).mean(1))

    check_metric_class(Ranged)
    for bad in ((1.0, 0.0), (0.0,), [0.0, 1.0], (0.0, nan), ("0", "1")):
        Ranged.range = bad
        with pytest.raises(PluginError, match="range"):
            check_metric_class(Ranged)
    Ranged.range = None
    Ranged.measured_once = "yes"
    with pytest.raises(PluginError, match="measured_once"):
        check_metric_class(Ranged)


def test_builtin_metrics_declare_their_ranges():
    metrics = xai_core.get_registry().metrics()
    assert metrics["pointing_game"].range == (0.0, 1.0)
    assert metrics["randomization"].range == (0.0, 1.0)
    assert metrics["stability"].range == (-1.0, 1.0)
    assert metrics["cost"].measured_once is True
