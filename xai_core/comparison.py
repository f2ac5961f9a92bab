"""``compare()``: run several explainers on one batch and score each with several metrics.

Every method explains the same targets (fixed once from the model's scores), every metric gets the
same context, and nothing one plugin does wrong stops the others: a method that cannot run on the
model is listed as skipped with the reason, a metric that fails for one method is recorded with its
error and NaN values.

The summary respects what each metric is (see :mod:`xai_core.statistics`): intervals stay in the
metric's declared range and need at least ``MIN_N`` samples, equal means share a rank, methods are
compared pairwise over the same samples, and :meth:`Comparison.verdict` ranks the methods over all
metrics and flags those that fail the randomisation sanity check.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from xai_core import statistics
from xai_core.api import check_masks, check_options, run_explainer, validate_inputs
from xai_core.contract import check_metric_result
from xai_core.errors import OptionError, UnknownOptionError, XaiError, did_you_mean
from xai_core.explanation import Explanation
from xai_core.metrics import (
    Direction,
    MetricContext,
    Need,
    metric_measured_once,
    metric_options,
    metric_range,
)
from xai_core.registry import get_registry
from xai_core.tags import Scope
from xai_core.targets import Region, Targets, TargetSpec

if TYPE_CHECKING:
    from xai_core.verdict import Verdict

Progress = Callable[[str], None]


@dataclass
class Cost:
    """Wall time and peak memory of one explainer on the batch, measured in this run."""

    seconds: float
    seconds_per_image: float
    peak_bytes: int | None  # device memory on CUDA, resident-set growth on the CPU


Aggregate = statistics.Interval  # mean, 95% interval (Wilson or bootstrap), n, kind, note


@dataclass(frozen=True)
class PairTest:
    """Two methods on one metric, over the samples both scored: Wilcoxon signed-rank, with the
    p-value Holm-adjusted over all pairs of that metric. ``better`` is ``None`` when the two are
    not distinguishable (adjusted p >= alpha, or too few samples to test)."""

    first: str
    second: str
    n: int
    p: float
    p_adjusted: float
    better: str | None

    @property
    def significant(self) -> bool:
        return self.better is not None


@dataclass
class Comparison:
    """Per-sample metric values for every (method, metric), with aggregates and rankings."""

    methods: list[str]
    metrics: list[str]
    directions: dict[str, Direction]
    values: dict[tuple[str, str], torch.Tensor]  # (method, metric) -> (N,) float64 on the CPU
    details: dict[tuple[str, str], dict[str, Any]]
    explanations: dict[str, Explanation]
    costs: dict[str, Cost]
    targets: torch.Tensor  # (N,) the explained class of each sample
    skipped_methods: dict[str, str] = field(default_factory=dict)
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    # metric -> declared range (None: unbounded) and whether it is one measurement per method
    ranges: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    measured_once: dict[str, bool] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def bounds(self, method: str, metric: str) -> tuple[float, float] | None:
        """The range an interval is clipped to: the declared one, unless these values leave it
        (e.g. deletion with ``kind="logit"``), when clipping would hide the truth."""
        declared = self.ranges.get(metric)
        values = statistics.defined(self.values[(method, metric)])
        return declared if statistics.within(values, declared) else None

    def aggregate(self, method: str, metric: str) -> Aggregate:
        """Mean, 95% interval and n of the defined values (see :func:`statistics.interval`)."""
        key = ("aggregate", method, metric)
        if key not in self._cache:
            values = self.values[(method, metric)]
            if self.measured_once.get(metric):
                mean = float(statistics.defined(values).mean())  # NaN when there is none
                note = "measured once per method: no interval"
                agg = Aggregate(mean, math.nan, math.nan, 1, "none", note)
            else:
                bounds, declared = self.bounds(method, metric), self.ranges.get(metric)
                agg = statistics.interval(values, bounds)
                if declared is not None and bounds is None:
                    lo, hi = declared
                    said = f"values outside the declared range [{lo:g}, {hi:g}]: not clipped"
                    agg = replace(agg, note="; ".join(filter(None, [agg.note, said])))
            self._cache[key] = agg
        return self._cache[key]

    def ranks(self, metric: str) -> dict[str, int | None]:
        """Competition ranks by mean (equal means share the best rank: 1, 1, 3). ``None`` for a
        method without a value, and for every method of a metric measured once (cost), which is
        shown but not ranked as a statistic."""
        if self.measured_once.get(metric):
            return dict.fromkeys(self.methods)
        means = [
            math.nan if (m, metric) in self.errors else self.aggregate(m, metric).mean
            for m in self.methods
        ]
        higher = self.directions[metric] is Direction.HIGHER
        return dict(zip(self.methods, statistics.competition_ranks(means, higher), strict=True))

    def ranking(self, metric: str) -> list[str]:
        """Methods from best to worst by mean value (methods without a value come last; tied
        methods keep the order they were compared in)."""
        ranks = self.ranks(metric)
        sign = -1.0 if self.directions[metric] is Direction.HIGHER else 1.0

        def key(method: str) -> tuple[float, float]:
            rank, mean = ranks[method], self.aggregate(method, metric).mean
            if math.isnan(mean):
                return (math.inf, math.inf)
            return (math.inf if rank is None else rank, sign * mean)

        return sorted(self.methods, key=key)

    def pair_tests(self, metric: str, alpha: float = statistics.ALPHA) -> list[PairTest]:
        """Every pair of methods on ``metric``: paired Wilcoxon signed-rank over the samples both
        scored, Holm-adjusted across the pairs. Empty for a metric measured once."""
        key = ("pairs", metric, alpha)
        if key in self._cache:
            return self._cache[key]
        pairs = []
        if not self.measured_once.get(metric):
            scored = [m for m in self.methods if (m, metric) not in self.errors]
            pairs = [(a, b) for i, a in enumerate(scored) for b in scored[i + 1 :]]
        raw = [
            statistics.paired_test(self.values[(a, metric)], self.values[(b, metric)])
            for a, b in pairs
        ]
        adjusted = statistics.holm([r.p for r in raw])
        sign = 1.0 if self.directions[metric] is Direction.HIGHER else -1.0
        tests = []
        for (a, b), r, q in zip(pairs, raw, adjusted, strict=True):
            better = None
            if not math.isnan(q) and q < alpha and r.shift != 0:
                # the direction of the paired shift, the estimate that goes with the test
                better = a if sign * r.shift > 0 else b
            tests.append(PairTest(a, b, r.n, r.p, q, better))
        self._cache[key] = tests
        return tests

    def tied_with(self, method: str, metric: str) -> list[str]:
        """The methods ``method`` is not distinguishable from on ``metric`` (paired test)."""
        out = []
        for test in self.pair_tests(metric):
            if method in (test.first, test.second) and not test.significant:
                out.append(test.second if test.first == method else test.first)
        return out

    def verdict(self, metrics: Sequence[str] | None = None) -> Verdict:
        """One summary over ``metrics`` (default: every ranked metric): mean rank and spread,
        significant differences, and the randomisation sanity check (:mod:`xai_core.verdict`)."""
        from xai_core.verdict import make_verdict

        key = ("verdict", None if metrics is None else tuple(metrics))
        if key not in self._cache:
            self._cache[key] = make_verdict(self, metrics)
        return self._cache[key]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (method, metric): the table every export is made from."""
        rows = []
        for metric in self.metrics:
            ranks = self.ranks(metric)
            for method in self.methods:
                agg = self.aggregate(method, metric)
                rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "better": self.directions[metric].value,
                        "mean": agg.mean,
                        "ci_low": agg.low,
                        "ci_high": agg.high,
                        "interval": agg.kind,  # "wilson", "bootstrap" or "none"
                        "n": agg.n,
                        "note": agg.note,
                        # a metric that failed for this method has no value to rank
                        "rank": ranks[method],
                        "tied_with": self.tied_with(method, metric),
                        "error": self.errors.get((method, metric)),
                    }
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict().to_dict(),
            "methods": self.methods,
            "metrics": {
                m: {
                    "better": self.directions[m].value,
                    "range": None if self.ranges.get(m) is None else list(self.ranges[m]),
                    "measured_once": bool(self.measured_once.get(m)),
                    "pairs": [
                        {
                            "methods": [t.first, t.second],
                            "n": t.n,
                            "p": t.p,
                            "p_holm": t.p_adjusted,
                            "better": t.better,
                        }
                        for t in self.pair_tests(m)
                    ],
                }
                for m in self.metrics
            },
            "targets": self.targets.tolist(),
            "results": self.rows(),
            "per_sample": {
                f"{method}/{metric}": [_json_float(v) for v in values.tolist()]
                for (method, metric), values in self.values.items()
            },
            "costs": {
                m: {
                    "seconds": c.seconds,
                    "seconds_per_image": c.seconds_per_image,
                    "peak_bytes": c.peak_bytes,
                }
                for m, c in self.costs.items()
            },
            "skipped_methods": self.skipped_methods,
            "skipped_metrics": self.skipped_metrics,
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def mean_ci(
    values: torch.Tensor, bounds: tuple[float, float] | None = None, level: float = 0.95
) -> Aggregate:
    """Mean of the defined values and its interval within ``bounds`` (statistics.interval)."""
    return statistics.interval(values, bounds, level=level)


@contextmanager
def measure_peak(device: torch.device) -> Iterator[dict[str, int | None]]:
    """Peak memory of the block: CUDA allocator peak, or resident-set growth sampled on the CPU."""
    result: dict[str, int | None] = {"peak_bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    statm = "/proc/self/statm"
    try:
        page = _page_size()

        def read() -> int:
            with open(statm) as f:
                return int(f.read().split()[1]) * page

        base = read()
    except OSError:  # not Linux: time only
        yield result
        return
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], read())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], read())
        result["peak_bytes"] = peak[0] - base


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def compare(
    model: Any,
    inputs: torch.Tensor,
    *,
    targets: TargetSpec = None,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    chunk_size: int = 64,
    progress: Progress | None = None,
) -> Comparison:
    """Explain ``inputs`` with several methods and score each explanation with several metrics.

    :param methods: method names; ``None`` means every installed local method that can run on this
        model (the others are listed in ``skipped_methods`` with the reason).
    :param metrics: metric names; ``None`` means every installed metric whose needs are met (a
        metric needing masks is skipped without ``masks``).
    :param masks: ground-truth regions ``(N, *spatial)`` (bool), for the pointing games.
    :param options: method name -> that method's options, e.g. ``{"occlusion": {"window": 16}}``.
    :param metric_options: metric name -> that metric's options.
    :param chunk_size: rows per forward pass in the perturbation metrics.
    :param progress: called with a short message before each method and metric.
    """
    registry = get_registry()
    adapter = registry.adapt(model)
    validate_inputs(inputs, adapter)
    options = dict(options or {})
    metric_opts = dict(metric_options or {})
    if masks is not None:
        masks = check_masks(masks, inputs).to(adapter.device)

    chosen, skipped_methods = _choose_methods(registry, adapter, methods)
    unknown = set(options) - set(chosen) - set(skipped_methods)
    if unknown:
        raise UnknownOptionError(f"options name methods that are not compared: {sorted(unknown)}.")
    metric_classes, skipped_metrics = _choose_metrics(registry, adapter, metrics, masks)
    for name, opts in metric_opts.items():
        if name in skipped_metrics:
            continue  # skipped with its reason; its options do not matter
        if name not in metric_classes:
            raise UnknownOptionError(f"metric_options names {name!r}, which is not computed.")
        accepted = metric_options_of(metric_classes[name])
        for key in opts:
            if key not in accepted:
                raise UnknownOptionError(
                    f"The metric {name!r} has no option {key!r}.{did_you_mean(key, accepted)} "
                    f"Its options are: {', '.join(accepted) or 'none'}."
                )

    for name in chosen:  # every method's options (names, types, ranges) before any forward pass
        check_options(registry.get_explainer(name), options.get(name, {}))

    # Fix the targets once, so every method explains the same class of each sample.
    request = Targets(targets, inputs.shape[0], adapter.device)
    if request.multi or request.function is not None:
        raise OptionError(
            "compare() explains one class per sample: pass None, an int or one per sample."
        )
    with torch.no_grad(), adapter.session():
        fixed = request.resolve(adapter.forward(inputs)).indices
    assert fixed is not None
    class_targets = fixed[:, 0]
    spec: Any = class_targets
    if isinstance(targets, Region):  # segmentation: keep the user's mask or box with the classes
        spec = Region(class_targets, mask=targets.mask, box=targets.box)

    explanations: dict[str, Explanation] = {}
    costs: dict[str, Cost] = {}
    for name in chosen:
        info = registry.get_explainer(name)
        opts = options.get(name, {})
        if progress:
            progress(f"explaining with {name}")
        try:
            check_options(info, opts)
            with measure_peak(adapter.device) as peak:
                start = time.perf_counter()
                exp = run_explainer(info, adapter, inputs, spec, opts)
                seconds = time.perf_counter() - start
        except XaiError as exc:
            if isinstance(exc, UnknownOptionError | OptionError):
                raise
            skipped_methods[name] = f"{type(exc).__name__}: {exc}"
            continue
        explanations[name] = exp
        costs[name] = Cost(seconds, seconds / inputs.shape[0], peak["peak_bytes"])

    values: dict[tuple[str, str], torch.Tensor] = {}
    details: dict[tuple[str, str], dict[str, Any]] = {}
    errors: dict[tuple[str, str], str] = {}
    nan = torch.full((inputs.shape[0],), math.nan, dtype=torch.float64)
    for method, exp in explanations.items():
        info = registry.get_explainer(method)
        opts = options.get(method, {})

        def rerun(inputs=inputs, model=adapter, targets=spec, _info=info, _opts=opts):
            return run_explainer(_info, registry.adapt(model), inputs, targets, dict(_opts))

        context = MetricContext(
            model=adapter,
            inputs=inputs,
            explanation=exp,
            method=method,
            rerun=rerun,
            masks=masks,
            chunk_size=chunk_size,
            measurements={"seconds": costs[method].seconds, "peak_bytes": costs[method].peak_bytes},
        )
        for metric, cls in metric_classes.items():
            if progress:
                progress(f"{metric} of {method}")
            try:
                result = cls().compute(context, **metric_opts.get(metric, {}))
                n, source = inputs.shape[0], registry.metric_source(metric)
                values[(method, metric)] = check_metric_result(result, metric, source, n)
                details[(method, metric)] = result.details
            except Exception as exc:  # one failing metric must not lose the others
                values[(method, metric)] = nan.clone()
                details[(method, metric)] = {}
                errors[(method, metric)] = f"{type(exc).__name__}: {exc}"

    return Comparison(
        methods=list(explanations),
        metrics=list(metric_classes),
        directions={m: cls.direction for m, cls in metric_classes.items()},
        values=values,
        details=details,
        explanations=explanations,
        costs=costs,
        targets=class_targets.cpu(),
        skipped_methods=skipped_methods,
        skipped_metrics=skipped_metrics,
        errors=errors,
        ranges={m: metric_range(cls) for m, cls in metric_classes.items()},
        measured_once={m: metric_measured_once(cls) for m, cls in metric_classes.items()},
    )


def metric_options_of(cls: type) -> list[str]:
    return list(metric_options(cls))


def _choose_methods(registry, adapter, methods):
    skipped: dict[str, str] = {}
    if methods is None:
        chosen = []
        skipped.update(registry.unusable_explainers())  # never drop a method without a word
        for info in registry.list_explainers(scope=Scope.LOCAL):
            reason = registry.unsupported_reason(info, adapter)
            if reason is None:
                chosen.append(info.name)
            else:
                skipped[info.name] = reason
        return chosen, skipped
    chosen = []
    for name in methods:
        info = registry.get_explainer(name)  # unknown names are the user's mistake: raise
        reason = registry.unsupported_reason(info, adapter)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def _choose_metrics(registry, adapter, metrics, masks):
    available = registry.metrics()
    names = list(available) if metrics is None else list(metrics)
    chosen: dict[str, type] = {}
    skipped: dict[str, str] = registry.unusable_metrics() if metrics is None else {}
    for name in names:
        cls = available.get(name) or registry.get_metric(name)
        missing = []
        if Need.MASKS in cls.needs and masks is None:
            missing.append("ground-truth masks (masks=...)")
        if Need.TORCH_MODEL in cls.needs and not hasattr(adapter, "module"):
            missing.append("a PyTorch model")
        if missing:
            skipped[name] = f"needs {' and '.join(missing)}"
        else:
            chosen[name] = cls
    return dict(sorted(chosen.items())), skipped
