"""The verdict of a comparison: which method to trust, in a few lines.

Nine per-metric tables do not tell anyone which map to believe. The verdict does, by rules that
are simple to state and to check (docs/comparing.md):

1. **Mean rank.** On every ranked metric each method gets its rank, ties sharing the mean of the
   positions they occupy (1.5, 1.5, 3: Demšar 2006); the verdict orders methods by the mean of
   those ranks over the metrics they were scored on, and shows the spread (best and worst rank).
   A metric measured once per method (cost) is shown beside it but not averaged in.
2. **Significance.** For every metric, every pair of methods is tested over the samples both
   scored (Wilcoxon signed-rank, Holm-adjusted across the pairs of that metric); the verdict lists
   the significant differences and says when the leaders are not distinguishable.
3. **Sanity.** A method whose maps survive randomising the model's weights does not explain the
   model (Adebayo et al. 2018). A method whose mean ``|Spearman|`` between the original map and
   the map with every chosen layer re-initialised (the deepest stage of the ``randomization``
   metric) is above :data:`SANITY_THRESHOLD` is flagged untrustworthy and placed after every
   other method, whatever its other scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from xai_core.workflows import statistics

if TYPE_CHECKING:
    from xai_core.workflows.compare import Comparison

SANITY_METRIC = "randomization"
SANITY_THRESHOLD = 0.5  # mean |Spearman| at the deepest randomised stage; above: fails


@dataclass(frozen=True)
class MethodSummary:
    """One method's line in the verdict."""

    method: str
    position: int | None  # 1 = best; shared when mean ranks are equal; None: untrusted/unranked
    mean_rank: float | None
    best_rank: float | None  # the spread of its per-metric ranks
    worst_rank: float | None
    metrics: int  # how many ranked metrics it was scored on
    sanity: float | None  # mean |Spearman| at the deepest randomised stage (None: not checked)
    trusted: bool | None  # False: fails the sanity check; None: not checked
    seconds_per_image: float | None = None


@dataclass(frozen=True)
class Difference:
    """``better`` is significantly better than ``worse`` on ``metric``."""

    metric: str
    better: str
    worse: str
    p_holm: float
    n: int


@dataclass
class Verdict:
    metrics: list[str]  # the metrics averaged into the mean rank
    methods: list[MethodSummary]  # trusted or unchecked ones by mean rank, then untrusted ones
    differences: list[Difference]
    lines: list[str]  # the verdict in words, most important first
    threshold: float = SANITY_THRESHOLD
    alpha: float = statistics.ALPHA
    untestable: list[str] = field(default_factory=list)  # metrics with too few paired samples

    @property
    def best(self) -> list[str]:
        """The method(s) in first position (several when their mean ranks are equal)."""
        return [m.method for m in self.methods if m.position == 1]

    @property
    def untrusted(self) -> list[str]:
        return [m.method for m in self.methods if m.trusted is False]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["best"] = self.best
        out["untrusted"] = self.untrusted
        return out


def sanity_score(result: Comparison, method: str) -> float | None:
    """Mean ``|Spearman|`` at the deepest randomised stage, or ``None`` if not measured."""
    key = (method, SANITY_METRIC)
    if SANITY_METRIC not in result.metrics or key in result.errors or key not in result.values:
        return None
    deepest = result.details.get(key, {}).get("abs_spearman_deepest")
    values = result.values[key] if deepest is None else torch.as_tensor(deepest)
    x = statistics.defined(values.abs())
    return float(x.mean()) if x.numel() else None


def make_verdict(result: Comparison, metrics: Sequence[str] | None = None) -> Verdict:
    chosen = [
        m
        for m in (result.metrics if metrics is None else metrics)
        if m in result.metrics and not result.measured_once.get(m)
    ]
    per_method: dict[str, list[float]] = {m: [] for m in result.methods}
    for metric in chosen:
        means = [
            math.nan if (m, metric) in result.errors else result.aggregate(m, metric).mean
            for m in result.methods
        ]
        higher = result.directions[metric].value == "higher"
        for method, rank in zip(
            result.methods, statistics.average_ranks(means, higher), strict=True
        ):
            if rank is not None:
                per_method[method].append(rank)

    sanity = {m: sanity_score(result, m) for m in result.methods}
    trusted = {m: None if s is None else s <= SANITY_THRESHOLD for m, s in sanity.items()}
    mean_rank = {m: sum(r) / len(r) if r else math.nan for m, r in per_method.items()}
    ranked = [m for m in result.methods if trusted[m] is not False and per_method[m]]
    positions = dict(
        zip(
            ranked,
            statistics.competition_ranks([mean_rank[m] for m in ranked], False),
            strict=True,
        )
    )
    cost = {m: c.seconds_per_image for m, c in result.costs.items()}
    summaries = [
        MethodSummary(
            method=m,
            position=positions.get(m),
            mean_rank=None if math.isnan(mean_rank[m]) else mean_rank[m],
            best_rank=min(per_method[m]) if per_method[m] else None,
            worst_rank=max(per_method[m]) if per_method[m] else None,
            metrics=len(per_method[m]),
            sanity=sanity[m],
            trusted=trusted[m],
            seconds_per_image=cost.get(m),
        )
        for m in result.methods
    ]

    def order(s: MethodSummary) -> tuple[int, float]:
        group = 0 if s.position is not None else (1 if s.trusted is not False else 2)
        return (group, math.inf if s.mean_rank is None else s.mean_rank)

    summaries.sort(key=order)

    differences, untestable = [], []
    for metric in chosen:
        tests = result.pair_tests(metric)
        # Wilcoxon's smallest two-sided p on n pairs is 2 / 2**n, times the pairs under Holm: on
        # fewer samples no difference can show, which the verdict must say rather than imply.
        if tests and all(
            math.isnan(t.p) or 2.0 / 2.0**t.n * len(tests) >= statistics.ALPHA for t in tests
        ):
            untestable.append(metric)
        for t in tests:
            if t.better is not None:
                worse = t.second if t.better == t.first else t.first
                differences.append(Difference(metric, t.better, worse, t.p_adjusted, t.n))

    verdict = Verdict(chosen, summaries, differences, [], untestable=untestable)
    verdict.lines = _words(result, verdict)
    return verdict


def _fmt_rank(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _words(result: Comparison, verdict: Verdict) -> list[str]:
    """The verdict in plain sentences, most important first."""
    lines: list[str] = []
    if not verdict.metrics or not any(s.metrics for s in verdict.methods):
        lines.append("No ranked metric was computed for any method: no verdict.")
    best = verdict.best
    if best:
        lead = next(s for s in verdict.methods if s.position == 1)
        spread = (
            f"rank {_fmt_rank(lead.best_rank)} on every one"
            if lead.best_rank == lead.worst_rank
            else f"ranks {_fmt_rank(lead.best_rank)}–{_fmt_rank(lead.worst_rank)}"
        )
        names = best[0] if len(best) == 1 else f"{', '.join(best[:-1])} and {best[-1]}"
        tie = " (tied)" if len(best) > 1 else ""
        lines.append(
            f"Best{tie}: {names}, mean rank {_fmt_rank(lead.mean_rank)} over "
            f"{lead.metrics} metric{'s' if lead.metrics != 1 else ''} ({spread})."
        )
        said: set[frozenset[str]] = set()
        # When no metric has enough samples for a test, one sentence says so (below) instead of
        # "not distinguishable" for every pair, which would read as "equal".
        testable = set(verdict.metrics) - set(verdict.untestable)
        for leader in best if testable else []:
            for other in (s.method for s in verdict.methods if s.method != leader):
                if frozenset((leader, other)) in said:  # two tied leaders: one sentence
                    continue
                said.add(frozenset((leader, other)))
                pairs = [(d.metric, d.better, d.worse) for d in verdict.differences]
                wins = [m for m, b, w in pairs if (b, w) == (leader, other)]
                losses = [m for m, b, w in pairs if (b, w) == (other, leader)]
                if not wins and not losses:
                    lines.append(
                        f"{leader} is not distinguishable from {other} on any metric "
                        f"(paired test, Holm-adjusted p < {verdict.alpha:g})."
                    )
                    continue
                parts = []
                if wins:
                    parts.append(f"significantly better than {other} on {', '.join(wins)}")
                if losses:
                    parts.append(f"significantly worse on {', '.join(losses)}")
                lines.append(f"{leader} is {' but '.join(parts)}.")
    for s in verdict.methods:
        if s.trusted is False:
            lines.append(
                f"Untrustworthy: {s.method}. Its maps survive randomising the model's weights "
                f"(|Spearman| {s.sanity:.2f} > {verdict.threshold:g} at the deepest randomised "
                f"layer), so they do not explain this model, whatever its other scores."
            )
    unchecked = [s.method for s in verdict.methods if s.trusted is None]
    if unchecked:
        if SANITY_METRIC not in result.metrics:
            why = result.skipped_metrics.get(SANITY_METRIC, "not requested")
            lines.append(
                f"Sanity check not run ({SANITY_METRIC}: {why}): nothing here shows that the "
                f"maps depend on the model."
            )
        else:
            lines.append(
                f"Sanity check without a result for {', '.join(unchecked)} (error or constant "
                f"maps)."
            )
    checked = [s for s in verdict.methods if s.trusted is not None]
    if checked and all(s.trusted for s in checked):
        lines.append(
            f"Every checked method passes the randomisation sanity check (|Spearman| <= "
            f"{verdict.threshold:g} at the deepest randomised layer)."
        )
    if verdict.untestable and set(verdict.untestable) == set(verdict.metrics):
        lines.append(
            f"Too few samples for a paired test to show any difference at p < {verdict.alpha:g} "
            f"on any metric: the order above describes these samples, it is not evidence that "
            f"one method is better. 'Not distinguishable' in the tables means 'not enough data', "
            f"not 'equal'."
        )
    elif verdict.untestable:
        lines.append(
            f"Too few samples for a paired test to show any difference at p < {verdict.alpha:g} "
            f"on: {', '.join(verdict.untestable)}. 'Not distinguishable' there means 'not "
            f"enough data', not 'equal'."
        )
    return lines
