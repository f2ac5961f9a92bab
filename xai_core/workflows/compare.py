"""``compare()``: run several explainers on one batch and score each with several metrics.

Every method explains the same targets (fixed once from the model's scores), every metric gets the
same context, and nothing one plugin does wrong stops the others: a method that cannot run on the
model is listed as skipped with the reason, a metric that fails for one method is recorded with its
error and NaN values.

The summary respects what each metric is (see :mod:`xai_core.workflows.statistics`):
intervals stay in the
metric's declared range and need at least ``MIN_N`` samples, equal means share a rank, methods are
compared pairwise over the same samples, and :meth:`Comparison.verdict` ranks the methods over all
metrics and flags those that fail the randomisation sanity check.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xai_core.core import executors
from xai_core.core.adapters import ParameterRandomization, torch_module_of
from xai_core.core.api import (
    check_masks,
    check_options,
    model_failures,
    run_explainer,
    validate_inputs,
)
from xai_core.core.contract import check_metric_result
from xai_core.core.errors import (
    InputError,
    OptionError,
    UnknownOptionError,
    XaiError,
    did_you_mean,
)
from xai_core.core.executors import DEFAULT_ENGINE, Executor, Partial
from xai_core.core.explanation import Explanation
from xai_core.core.metrics import (
    Direction,
    MetricContext,
    Need,
    metric_measured_once,
    metric_options,
    metric_range,
)
from xai_core.core.progress import ProgressFn, accepts_progress, settable, within
from xai_core.core.registry import get_registry
from xai_core.core.tags import Scope
from xai_core.core.targets import Region, Targets, TargetSpec
from xai_core.workflows import statistics
from xai_core.workflows.datasets import Batch, DataStream, is_ray_dataset
from xai_core.workflows.statistics import Interval
from xai_core.workflows.verdict import make_verdict

if TYPE_CHECKING:
    from xai_core.workflows.verdict import Verdict

@dataclass
class MethodCost:
    """Wall time and peak memory of one explainer on the batch, measured in this run (the
    ``cost`` metric, ``xai_metrics.Cost``, turns it into per-sample values)."""

    seconds: float
    seconds_per_image: float
    peak_bytes: int | None  # device memory on CUDA, resident-set growth on the CPU


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
    costs: dict[str, MethodCost]
    targets: torch.Tensor  # (N,) the explained class of each sample
    skipped_methods: dict[str, str] = field(default_factory=dict)
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    # metric -> declared range (None: unbounded) and whether it is one measurement per method
    ranges: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    measured_once: dict[str, bool] = field(default_factory=dict)
    # a Ray Dataset's rows that could not be read (id -> why), and each sample's id, in order
    failed: dict[str, str] = field(default_factory=dict)
    sample_ids: list[str] | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def bounds(self, method: str, metric: str) -> tuple[float, float] | None:
        """The range an interval is clipped to: the declared one, unless these values leave it
        (e.g. deletion with ``kind="logit"``), when clipping would hide the truth."""
        declared = self.ranges.get(metric)
        values = statistics.defined(self.values[(method, metric)])
        return declared if statistics.within(values, declared) else None

    # what was predicted before the work, and the options changed to fit the time budget
    estimate: dict[str, Any] = field(default_factory=dict)
    economies: list[str] = field(default_factory=list)

    def aggregate(self, method: str, metric: str) -> Interval:
        """Mean, 95% interval and n of the defined values (see :func:`statistics.interval`)."""
        key = ("aggregate", method, metric)
        if key not in self._cache:
            values = self.values[(method, metric)]
            if self.measured_once.get(metric):
                mean = float(statistics.defined(values).mean())  # NaN when there is none
                note = "measured once per method: no interval"
                agg = Interval(mean, math.nan, math.nan, 1, "none", note)
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
        significant differences, and the randomisation sanity check
        (:mod:`xai_core.workflows.verdict`)."""
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
            **({"sample_ids": self.sample_ids} if self.sample_ids is not None else {}),
            **({"failed": self.failed} if self.failed else {}),
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
            "estimate": self.estimate,
            "economies": self.economies,
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def mean_ci(
    values: torch.Tensor, bounds: tuple[float, float] | None = None, level: float = 0.95
) -> Interval:
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
    return os.sysconf("SC_PAGE_SIZE")


def compare(
    model: Any,
    inputs: Any,
    *,
    targets: TargetSpec = None,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    chunk_size: int = 64,
    progress: ProgressFn | None = None,
    budget: float | None = None,
    notice: Callable[[str], None] | None = None,
    batch_size: int | None = None,
    engine: str | Executor = DEFAULT_ENGINE,
) -> Comparison:
    """Explain ``inputs`` with several methods and score each explanation with several metrics.

    :param inputs: a ``(N, C, *spatial)`` tensor, or a Ray Data ``Dataset`` of rows (an
        ``image`` column, optional ``mask`` and ``id`` columns, as for
        :class:`~xai_core.workflows.datasets.DataStream`): read ``batch_size`` rows at a time
        (32 by default), here or on Ray's workers with ``engine="ray"``, in the dataset's order;
        each batch's targets are fixed from the model's scores where it runs; rows that cannot
        be read are listed in :attr:`Comparison.failed`, their ids in ``sample_ids``.
    :param methods: method names; ``None`` means every installed local method that can run on this
        model (the others are listed in ``skipped_methods`` with the reason).
    :param metrics: metric names; ``None`` means every installed metric whose needs are met (a
        metric needing masks is skipped without ``masks``).
    :param masks: ground-truth regions ``(N, *spatial)`` (bool), for the pointing games.
    :param options: method name -> that method's options, e.g. ``{"occlusion": {"window": 16}}``.
    :param metric_options: metric name -> that metric's options.
    :param chunk_size: rows per forward pass in the perturbation metrics.
    :param progress: ``progress(done, total, what)`` (:mod:`xai_core.core.progress`): steps are
        each method's explanation and each (method, metric); explainers and metrics taking a
        ``progress`` option report their own work (occlusion's perturbations, randomisation's
        stages) in ``what``.
    :param budget: seconds the comparison should take. Before any work, one forward and one
        forward+backward pass of the batch are timed and the cost of every method and metric
        estimated (:func:`estimate_cost`); over budget, options the caller did not set are made
        cheaper, one economy at a time (:data:`ECONOMIES`), and listed in ``economies``.
        ``None``: no economy, the estimate is still made. With a Ray Dataset, whose length is
        not known before it is read, the budget is per batch.
    :param notice: called with the estimate (and economies), in words, before the work starts.
    :param batch_size: images per batch; ``None`` (default): all of them in one batch. Each
        batch is explained and scored on its own, and the per-sample values merged in batch
        order, so any engine given the same ``batch_size`` gives the same values.
    :param engine: where the batches run: an executor's name (``"local"``, this process, the
        default; ``"ray"`` with xai-ray) or an executor (:mod:`xai_core.core.executors`).
        With another engine, ``costs`` (and the ``cost`` metric) are the seconds spent
        explaining summed over the batches where they ran, not the driver's wall clock.
    """
    registry = get_registry()
    adapter = registry.adapt(model)
    rows = first_rows = None
    if is_ray_dataset(inputs):  # its first batch stands for it until the steps run
        rows, first_rows = _dataset_rows(inputs, adapter, targets, masks, batch_size)
        inputs, masks = first_rows.inputs, first_rows.masks
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
                    f"Its options are: {', '.join(settable(accepted)) or 'none'}."
                )

    for name in chosen:  # every method's options (names, types, ranges) before any forward pass
        check_options(registry.get_explainer(name), options.get(name, {}))

    if rows is not None:
        assert first_rows is not None
        return _compare_rows(
            rows, first_rows, adapter, targets, chosen, skipped_methods, metric_classes,
            skipped_metrics, options, metric_opts, chunk_size, progress, budget, notice, engine,
        )  # fmt: skip
    size = _batch_size(batch_size, inputs.shape[0])
    # Fix the targets once, so every method explains the same class of each sample (the
    # forward pass batch by batch, as the steps see them).
    request = Targets(targets, inputs.shape[0], adapter.device)
    if request.multi or request.function is not None:
        raise OptionError(
            "compare() explains one class per sample: pass None, an int or one per sample."
        )
    with torch.no_grad(), adapter.session(), model_failures(adapter, inputs):
        if size >= inputs.shape[0]:
            scores = adapter.forward(inputs)
        else:
            chunks = range(0, inputs.shape[0], size)
            scores = torch.cat([adapter.forward(inputs[s : s + size]) for s in chunks])
        fixed = request.resolve(scores).indices
    assert fixed is not None
    class_targets = fixed[:, 0]
    spec: Any = class_targets
    if isinstance(targets, Region):  # segmentation: keep the user's mask or box with the classes
        spec = Region(class_targets, mask=targets.mask, box=targets.box)

    # The cost is estimated on the first batch (all of the inputs by default), then scaled.
    first = inputs[:size]
    probe = measure_probe(adapter, first, class_targets[:size])
    work = Workload(registry, tuple(first.shape), chosen, metric_classes, probe)
    estimate = estimate_cost(work, options, metric_opts)
    economies: list[str] = []
    if budget is not None:
        scale = inputs.shape[0] / first.shape[0]
        options, metric_opts, economies, estimate = economise(
            work, options, metric_opts, budget / scale
        )
    if first.shape[0] < inputs.shape[0]:
        estimate = _scaled(estimate, inputs.shape[0] / first.shape[0])
    if notice:
        notice(describe_estimate(estimate, budget, economies))

    batches = _split(inputs, masks, spec, size)
    step = CompareStep(
        chosen=list(chosen),
        metric_classes=metric_classes,
        adapter=adapter,
        options=options,
        metric_options=metric_opts,
        chunk_size=chunk_size,
        batches=len(batches),
        progress=progress,
    )
    merged: list[BatchResult] = []
    for done, part in enumerate(executors.parts(engine, step, batches), start=1):
        merged.extend(part.value.batches)
        if progress and len(batches) > 1:
            progress(done, len(batches), f"compared {done} of {len(batches)} batches")
    result = _assemble(sorted(merged, key=lambda b: b.start), chosen)
    return _comparison(
        result, class_targets.cpu(), metric_classes, skipped_methods, skipped_metrics,
        estimate, economies,
    )  # fmt: skip


def _comparison(
    result: dict[str, Any],
    targets: torch.Tensor,
    metric_classes: dict[str, type],
    skipped_methods: dict[str, str],
    skipped_metrics: dict[str, str],
    estimate: dict[str, Any],
    economies: list[str],
    **extra: Any,
) -> Comparison:
    return Comparison(
        methods=result["methods"],
        metrics=list(metric_classes),
        directions={m: cls.direction for m, cls in metric_classes.items()},
        values=result["values"],
        details=result["details"],
        explanations=result["explanations"],
        costs=result["costs"],
        targets=targets,
        skipped_methods={**skipped_methods, **result["skipped"]},
        skipped_metrics=skipped_metrics,
        errors=result["errors"],
        ranges={m: metric_range(cls) for m, cls in metric_classes.items()},
        measured_once={m: metric_measured_once(cls) for m, cls in metric_classes.items()},
        estimate=estimate,
        economies=economies,
        **extra,
    )


# -- a Ray Data Dataset: batches of rows, their targets fixed where they run --------------------


def _dataset_rows(
    dataset: Any, adapter: Any, targets: TargetSpec, masks: Any, batch_size: int | None
) -> tuple[DataStream, Batch]:
    """The stream of a Ray Dataset's rows, and its first batch (what the checks, the metrics'
    needs and the cost estimate are made on)."""
    if masks is not None:
        raise OptionError("A Ray Dataset holds its masks in a 'mask' column; pass masks=None.")
    if not (targets is None or (isinstance(targets, int) and not isinstance(targets, bool))):
        raise OptionError(
            "With a Ray Dataset, targets is None (each sample's predicted class) or one class "
            f"index for every sample; got {type(targets).__name__}."
        )
    stream = DataStream(dataset, batch_size=32 if batch_size is None else batch_size,
                        device=adapter.device)  # fmt: skip
    found = stream.ray_dataset()
    assert found is not None
    rows = found[1]
    try:
        columns = dataset.take_batch(stream.batch_size, batch_format="numpy")
    except ValueError as exc:  # Ray Data's "The dataset is empty."
        raise InputError(f"The Ray Dataset has no rows to compare on ({exc}).") from exc
    first, failed = rows(columns)
    if first is None:
        raise InputError(f"The first rows of the Ray Dataset cannot be read: {failed}")
    return stream, first


def _compare_rows(
    stream: DataStream,
    first: Batch,
    adapter: Any,
    targets: int | None,
    chosen: list[str],
    skipped_methods: dict[str, str],
    metric_classes: dict[str, type],
    skipped_metrics: dict[str, str],
    options: dict[str, dict[str, Any]],
    metric_opts: dict[str, dict[str, Any]],
    chunk_size: int,
    progress: ProgressFn | None,
    budget: float | None,
    notice: Callable[[str], None] | None,
    engine: str | Executor,
) -> Comparison:
    """compare() over a Ray Dataset's rows: the estimate (and economies) made on one batch, as
    the dataset's length is not known before it is read; parts merged in the order they
    come, which is the dataset's (the local engine iterates it; Ray's keeps its order)."""
    probe = measure_probe(adapter, first.inputs, _classes(adapter, first.inputs, targets))
    work = Workload(get_registry(), tuple(first.inputs.shape), chosen, metric_classes, probe)
    estimate = estimate_cost(work, options, metric_opts)
    economies: list[str] = []
    if budget is not None:  # per batch: the dataset's size is not known yet
        options, metric_opts, economies, estimate = economise(
            work, options, metric_opts, budget
        )
    if notice:
        notice(describe_estimate(estimate, budget, economies) + " (one batch of the dataset)")
    step = RowsCompareStep(
        CompareStep(
            chosen=list(chosen),
            metric_classes=metric_classes,
            adapter=adapter,
            options=options,
            metric_options=metric_opts,
            chunk_size=chunk_size,
            batches=1,
            progress=progress,
        ),
        targets,
    )
    merged: list[BatchResult] = []
    classes_of: list[torch.Tensor] = []
    ids: list[str] | None = []
    start = 0
    for done, part in enumerate(executors.parts(engine, step, stream), start=1):
        for batch in part.value.batches:  # in the dataset's order: number the samples so
            merged.append(replace(batch, start=start))
            start += batch.size
            classes_of.append(batch.targets)
            if ids is not None and batch.ids is not None:
                ids.extend(batch.ids)
            else:  # a dataset without an 'id' column
                ids = None
        if progress:
            progress(done, None, f"compared {done} batches ({start} samples)")
    if not merged:
        raise InputError(f"No row of the Ray Dataset could be read: {stream.failed}")
    result = _assemble(merged, chosen)
    return _comparison(
        result, torch.cat(classes_of), metric_classes, skipped_methods, skipped_metrics,
        estimate, economies, failed=dict(stream.failed), sample_ids=ids,
    )  # fmt: skip


@dataclass
class RowsCompareStep:
    """A batch of a Ray Dataset's rows (a :class:`~xai_core.workflows.datasets.Batch`): its
    targets fixed from the model's scores here, then :class:`CompareStep`."""

    compare: CompareStep
    targets: int | None

    def __call__(self, batch: Batch) -> Partial:
        classes = _classes(self.compare.adapter, batch.inputs, self.targets)
        one = CompareBatch(0, 0, batch.inputs, batch.masks, classes)
        result = _compare_batch(self.compare, one, self.compare.progress)
        ids = None if batch.keys is None else list(batch.keys)
        result = replace(result, targets=classes.cpu(), ids=ids)
        return Partial(ComparePart([result]), len(batch))


def _classes(adapter: Any, inputs: torch.Tensor, targets: int | None) -> torch.Tensor:
    """``(N,)`` the class each sample is explained for: ``targets`` (None: the predicted class)
    resolved against one forward pass of ``inputs``."""
    with torch.no_grad(), adapter.session(), model_failures(adapter, inputs):
        request = Targets(targets, len(inputs), adapter.device)
        classes = request.resolve(adapter.forward(inputs)).indices
    assert classes is not None
    return classes[:, 0]


# -- the batch step and the merge --------------------------------------------------------------
#
# compare() is one step mapped over batches of the inputs (one batch by default, or
# ``batch_size`` images each) by an executor (:mod:`xai_core.core.executors`): each batch is
# explained by every method and scored by every metric, here or on a worker, and its
# :class:`BatchResult` comes back inside a :class:`ComparePart`. The driver merges them in batch
# order into the per-sample values the statistics are computed from (docs/scale.md).


@dataclass
class CompareBatch:
    """Samples ``start:start + len`` of the inputs, with their masks and fixed targets."""

    index: int
    start: int
    inputs: torch.Tensor
    masks: torch.Tensor | None
    targets: Any  # (B,) class indices, or a Region holding them

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatchResult:
    """What one batch gave: explanations, costs and per-sample metric values of each method."""

    start: int
    size: int
    explanations: dict[str, Explanation]
    costs: dict[str, MethodCost]
    skipped: dict[str, str]  # methods that could not run on this batch, with the reason
    values: dict[tuple[str, str], torch.Tensor]
    details: dict[tuple[str, str], dict[str, Any]]
    errors: dict[tuple[str, str], str]
    targets: torch.Tensor | None = None  # a Ray Dataset's batch: the classes fixed on it
    ids: list[str] | None = None  # and its rows' ids, when the dataset has an 'id' column


@dataclass
class ComparePart:
    """Batch results merged with ``+``: kept apart until the end, where :func:`compare`
    orders them by their first sample, so the merge does not depend on the order of arrival."""

    batches: list[BatchResult]

    def __add__(self, other: ComparePart) -> ComparePart:
        return ComparePart(self.batches + other.batches)


def _batch_size(batch_size: int | None, n: int) -> int:
    if batch_size is None:
        return n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(
            f"batch_size must be an int >= 1 (images per batch) or None (all in one batch); got "
            f"{batch_size!r}."
        )
    return batch_size


def _split(
    inputs: torch.Tensor, masks: torch.Tensor | None, spec: Any, size: int
) -> list[CompareBatch]:
    if size >= inputs.shape[0]:  # one batch: everything as it is
        return [CompareBatch(0, 0, inputs, masks, spec)]

    def cut(tensor: Any, part: slice) -> Any:
        # A copy, not a view: a pickled view carries its whole storage, i.e. every batch
        # would send all of the inputs to a worker.
        return None if tensor is None else torch.as_tensor(tensor)[part].clone()

    batches = []
    for index, start in enumerate(range(0, inputs.shape[0], size)):
        part = slice(start, start + size)
        if isinstance(spec, Region):
            box = spec.box
            if box is not None and torch.as_tensor(box).ndim == 3:  # one box per sample
                box = cut(box, part)
            mask = cut(spec.mask, part)
            targets = Region(cut(spec.classes, part), mask=mask, box=box, ignore=spec.ignore)
        else:
            targets = cut(spec, part)
        batches.append(CompareBatch(index, start, cut(inputs, part), cut(masks, part), targets))
    return batches


def _scaled(estimate: dict[str, Any], factor: float) -> dict[str, Any]:
    """An estimate made on one batch, for ``factor`` times as many images."""
    f = factor
    scaled = [
        {**p, "forward_images": round(p["forward_images"] * f), "seconds": p["seconds"] * f}
        for p in estimate["parts"]
    ]
    return {
        **estimate,
        "forward_images": sum(p["forward_images"] for p in scaled),
        "seconds": estimate["seconds"] * factor,
        "parts": scaled,
    }


@dataclass
class CompareStep:
    """One batch explained by every method and scored by every metric: what an executor maps,
    here or on a worker (picklable; the progress callback stays in this process)."""

    chosen: list[str]
    metric_classes: dict[str, type]
    adapter: Any
    options: dict[str, dict[str, Any]]
    metric_options: dict[str, dict[str, Any]]
    chunk_size: int
    batches: int
    progress: ProgressFn | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "progress": None}

    def __call__(self, batch: CompareBatch) -> Partial:
        progress = self.progress
        if progress is not None and self.batches > 1:
            what = f"batch {batch.index + 1}/{self.batches}"
            progress = within(progress, batch.index, self.batches, what)
        result = _compare_batch(self, batch, progress)
        return Partial(ComparePart([result]), len(batch))


def _compare_batch(step: CompareStep, batch: CompareBatch, progress: ProgressFn | None):
    registry = get_registry()
    adapter, inputs, spec, masks = step.adapter, batch.inputs, batch.targets, batch.masks
    metric_classes, chunk_size = step.metric_classes, step.chunk_size
    options, metric_opts = step.options, step.metric_options
    explanations: dict[str, Explanation] = {}
    costs: dict[str, MethodCost] = {}
    skipped_methods: dict[str, str] = {}
    steps, step_no = len(step.chosen) * (1 + len(metric_classes)), 0
    for name in step.chosen:
        info = registry.get_explainer(name)
        opts = options.get(name, {})
        if progress:
            progress(step_no, steps, f"explaining with {name}")
        run_opts = _with_progress(info.cls, opts, within(progress, step_no, steps, name))
        step_no += 1
        try:
            check_options(info, opts)
            with measure_peak(adapter.device) as peak:
                start = time.perf_counter()
                exp = run_explainer(info, adapter, inputs, spec, run_opts)
                seconds = time.perf_counter() - start
        except XaiError as exc:
            if isinstance(exc, UnknownOptionError | OptionError):
                raise
            skipped_methods[name] = f"{type(exc).__name__}: {exc}"
            continue
        explanations[name] = exp
        costs[name] = MethodCost(seconds, seconds / inputs.shape[0], peak["peak_bytes"])

    values: dict[tuple[str, str], torch.Tensor] = {}
    details: dict[tuple[str, str], dict[str, Any]] = {}
    errors: dict[tuple[str, str], str] = {}
    nan = torch.full((inputs.shape[0],), math.nan, dtype=torch.float64)
    steps = step_no + len(explanations) * len(metric_classes)  # without the skipped methods
    current: dict[str, Any] = {"progress": None}  # the running metric's step, for reruns
    shared = {"model": adapter, "inputs": inputs, "masks": masks, "chunk_size": chunk_size}
    for method, exp in explanations.items():
        info = registry.get_explainer(method)
        opts = options.get(method, {})

        def rerun(inputs=inputs, model=adapter, targets=spec, _info=info, _opts=opts):
            tracker = current["progress"]
            run_opts = _with_progress(_info.cls, dict(_opts), tracker and tracker.rerun)
            return run_explainer(_info, registry.adapt(model), inputs, targets, run_opts)

        cost = costs[method]
        context = MetricContext(
            **shared,
            explanation=exp,
            method=method,
            rerun=rerun,
            measurements={"seconds": cost.seconds, "peak_bytes": cost.peak_bytes},
        )
        for metric, cls in metric_classes.items():
            label = f"{metric} of {method}"
            if progress:
                progress(step_no, steps, label)
            current["progress"] = tracker = _MetricStep(progress, step_no, steps, label)
            run_opts = _with_progress(cls, metric_opts.get(metric, {}), tracker.own)
            step_no += 1
            try:
                result = cls().compute(context, **run_opts)
                n, source = inputs.shape[0], registry.metric_source(metric)
                values[(method, metric)] = check_metric_result(result, metric, source, n)
                details[(method, metric)] = result.details
            except Exception as exc:  # one failing metric must not lose the others
                values[(method, metric)] = nan.clone()
                details[(method, metric)] = {}
                errors[(method, metric)] = f"{type(exc).__name__}: {exc}"
    if progress:
        progress(steps, steps, "compared")
    return BatchResult(
        batch.start, len(batch), explanations, costs, skipped_methods, values, details, errors
    )


def _assemble(batches: list[BatchResult], chosen: Sequence[str]) -> dict[str, Any]:
    """The batches' results, in sample order, as one: a method skipped on any batch is skipped
    (with the first reason); a metric's error on any batch is its error (values NaN there)."""
    if len(batches) == 1:  # the default: the batch's result as it is
        b = batches[0]
        return {
            "methods": list(b.explanations),
            "values": b.values,
            "details": b.details,
            "explanations": b.explanations,
            "costs": b.costs,
            "skipped": b.skipped,
            "errors": b.errors,
        }
    skipped: dict[str, str] = {}
    for b in batches:
        for name, reason in b.skipped.items():
            skipped.setdefault(name, reason)
    methods = [m for m in chosen if m not in skipped]
    keys = [key for key in batches[0].values if key[0] in methods]
    errors: dict[tuple[str, str], str] = {}
    for b in batches:
        for key, error in b.errors.items():
            if key[0] in methods:
                errors.setdefault(key, error)
    sizes = [b.size for b in batches]
    return {
        "methods": methods,
        "values": {key: torch.cat([b.values[key] for b in batches]) for key in keys},
        "details": {key: merge_details([b.details[key] for b in batches], sizes) for key in keys},
        "explanations": {
            m: _concat_explanations([b.explanations[m] for b in batches], sizes) for m in methods
        },
        "costs": {m: _total_cost([b.costs[m] for b in batches], sum(sizes)) for m in methods},
        "skipped": skipped,
        "errors": errors,
    }


def _total_cost(costs: list[MethodCost], n: int) -> MethodCost:
    """Seconds summed over the batches (time spent explaining, wherever it ran), the largest
    peak of one batch."""
    seconds = sum(c.seconds for c in costs)
    peaks = [c.peak_bytes for c in costs if c.peak_bytes is not None]
    return MethodCost(seconds, seconds / n, max(peaks) if peaks else None)


def merge_details(details: list[Any], sizes: list[int]) -> Any:
    """The ``details`` of one (method, metric) over batches of ``sizes`` samples, as one:

    * a dict is merged key by key (keys every batch has);
    * a tensor or array with one entry per sample (the batch's size on its first axis, else on
      its last) is concatenated along that axis, in sample order;
    * a number (a count, a mean, a time: one batch's summary) becomes the list of the batches'
      numbers, in batch order; summaries over all samples come from the per-sample values;
    * anything else equal in every batch is kept (a curve's fractions, a name, a setting), and
      what differs becomes the list of the batches' values.
    """
    first = details[0]
    if all(isinstance(d, dict) for d in details):
        keys = [k for k in first if all(k in d for d in details)]
        return {k: merge_details([d[k] for d in details], sizes) for k in keys}
    if all(isinstance(d, torch.Tensor) for d in details):
        axis = _sample_axis([tuple(d.shape) for d in details], sizes)
        if axis is not None:
            return torch.cat([d.to(first.device) for d in details], dim=axis)
    if all(isinstance(d, np.ndarray) for d in details):
        axis = _sample_axis([d.shape for d in details], sizes)
        if axis is not None:
            return np.concatenate(details, axis=axis)
    if all(d is None or isinstance(d, int | float) for d in details):
        return list(details)
    if all(_equal(d, first) for d in details[1:]):
        return first
    return list(details)


def _sample_axis(shapes: list[tuple[int, ...]], sizes: list[int]) -> int | None:
    if any(len(shape) == 0 for shape in shapes):
        return None
    for axis in (0, -1):
        if all(shape[axis] == n for shape, n in zip(shapes, sizes, strict=True)):
            rest = {shape[1:] if axis == 0 else shape[:-1] for shape in shapes}
            if len(rest) == 1:  # the same shape but for the samples
                return axis
    return None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # a value whose == is not a truth value
        return False


def _concat_explanations(parts: list[Explanation], sizes: list[int]) -> Explanation:
    """One method's explanations of the batches as one explanation of all the samples."""
    first = parts[0]

    def cat(tensors: list[Any]) -> Any:
        return None if tensors[0] is None else torch.cat([t.to(first.device) for t in tensors])

    return replace(
        first,
        raw=[cat([p.raw[i] for p in parts]) for i in range(len(first.raw))],
        targets=cat([p.targets for p in parts]),
        scores=cat([p.scores for p in parts]),
        regions=cat([p.regions for p in parts]),
        input_shape=(sum(sizes), *first.input_shape[1:]),
        seconds=sum(p.seconds for p in parts),
        details=merge_details([p.details for p in parts], sizes),
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
        if Need.TORCH_MODEL in cls.needs and not isinstance(adapter, ParameterRandomization):
            missing.append("a PyTorch model")
        if missing:
            skipped[name] = f"needs {' and '.join(missing)}"
        else:
            chosen[name] = cls
    return dict(sorted(chosen.items())), skipped


# -- progress and cost ------------------------------------------------------------------------
#
# Plugins may say what their work costs, in forward passes of one image, through optional class
# methods (a plugin without them is counted as one forward+backward pass of the batch):
#   explainer: ``forward_images(shape, options) -> int``, images forwarded for a batch ``shape``;
#   metric: ``work(shape, options) -> (images forwarded, re-explanations of the method)``.


def _with_progress(cls: type, opts: dict[str, Any], callback: ProgressFn | None) -> dict[str, Any]:
    """``opts`` with ``progress`` added when the plugin takes one and the caller set none."""
    if callback is None or "progress" in opts or not accepts_progress(cls):
        return opts
    return {**opts, "progress": callback}


class _MetricStep:
    """Progress of one (method, metric) step: the metric's own counts (randomisation's stages)
    and, inside the current one, the counts of the method it re-runs (occlusion's perturbed
    inputs), so that the step advances monotonically while either reports."""

    def __init__(self, progress: ProgressFn | None, step: int, steps: int, label: str) -> None:
        self.progress, self.step, self.steps, self.label = progress, step, steps, label
        self.sub: tuple[float, int | None, str] = (0, None, "")
        self.own = None if progress is None else self._own
        self.rerun = None if progress is None else self._rerun

    def _own(self, done: float, total: int | None, detail: str) -> None:
        self.sub = (done, total, detail)
        self._rerun(0, None, "")

    def _rerun(self, done: float, total: int | None, detail: str) -> None:
        assert self.progress is not None
        share = done / total if total else 0.0
        sub_done, sub_total, sub_detail = self.sub
        text = self.label
        if sub_total:
            text += f": {sub_detail} {sub_done:g}/{sub_total}"
            share = (sub_done + share) / sub_total
        if total:
            text += f"{',' if sub_total else ':'} {detail} {done:g}/{total}"
        self.progress(self.step + min(max(share, 0.0), 1.0), self.steps, text)


@dataclass
class Probe:
    """Measured seconds of one pass of the whole batch, the unit of every estimate."""

    forward: float
    forward_backward: float


def measure_probe(adapter: Any, inputs: torch.Tensor, targets: torch.Tensor) -> Probe:
    """Time one forward pass (the fastest of three: the first warms up) and one forward+backward
    pass of the batch. Gradients go to a copy of the inputs only: the model's ``.grad`` are
    left as they were."""

    def timed(run: Callable[[], Any]) -> float:
        start = time.perf_counter()
        run()
        if inputs.device.type == "cuda":
            torch.cuda.synchronize(inputs.device)
        return time.perf_counter() - start

    with torch.no_grad(), adapter.session():
        forward = min(timed(lambda: adapter.forward(inputs)) for _ in range(3))
    backward = 3 * forward  # a backward pass costs about two forward passes
    if torch_module_of(adapter) is not None:

        def forward_backward() -> None:
            x = inputs.detach().clone().requires_grad_(True)
            out = adapter.forward(x)
            rows = torch.arange(len(x), device=out.device)
            picked = out.reshape(out.shape[0], out.shape[1], -1)[rows, targets.to(out.device)]
            torch.autograd.grad(picked.float().sum(), x)

        try:
            with adapter.session(), torch.inference_mode(False), torch.enable_grad():
                backward = timed(forward_backward)
        except Exception:  # not differentiable: keep the rule of thumb
            pass
    return Probe(forward, backward)


def _explainer_work(registry, name: str, shape: tuple[int, ...], opts: dict[str, Any]):
    """Images one explanation of the batch forwards, or ``None`` when the plugin does not say
    (then it counts as one forward+backward pass of the batch)."""
    hook = getattr(registry.get_explainer(name).cls, "forward_images", None)
    return None if hook is None else int(hook(shape, opts))


@dataclass(frozen=True)
class Workload:
    """What a comparison will run, for estimating its cost before any work: everything but the
    options, which :func:`economise` varies."""

    registry: Any
    shape: tuple[int, ...]
    methods: Sequence[str]
    metric_classes: dict[str, type]
    probe: Probe


def estimate_cost(
    work: Workload,
    options: dict[str, dict[str, Any]],
    metric_opts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Predicted forward passes (of one image) and seconds of every method and (method, metric),
    from the measured ``work.probe``; an estimate, made before any work, to decide whether to
    go on."""
    shape, probe = work.shape, work.probe
    n = shape[0]
    parts, images, seconds = [], 0, 0.0
    for method in work.methods:
        forwarded = _explainer_work(work.registry, method, shape, options.get(method, {}))
        if forwarded is None:
            forwarded, explain_s = n, probe.forward_backward
        else:
            explain_s = forwarded / n * probe.forward
        parts.append({"what": method, "forward_images": forwarded, "seconds": explain_s})
        for metric, cls in work.metric_classes.items():
            hook = getattr(cls, "work", None)
            fwd, reruns = hook(shape, metric_opts.get(metric, {})) if hook else (n, 0)
            s = fwd / n * probe.forward + reruns * explain_s
            parts.append(
                {
                    "what": f"{metric} of {method}",
                    "forward_images": fwd + reruns * forwarded,
                    "seconds": s,
                }
            )
    for part in parts:
        images += part["forward_images"]
        seconds += part["seconds"]
    return {
        "probe": {"forward_s": probe.forward, "forward_backward_s": probe.forward_backward},
        "forward_images": images,
        "seconds": seconds,
        "parts": parts,
    }


def _quarter_window(shape: tuple[int, ...]) -> list[int]:
    return [max(1, math.ceil(s / 4)) for s in shape[2:]]


# Economies, cheapest loss of information first: (plugin, option, value or f(shape), is a
# method's option). Each applies only where the caller did not set that option.
ECONOMIES: list[tuple[str, str, Any, bool]] = [
    ("randomization", "stages", 3, False),  # 3 cascade points instead of 10: start, middle, all
    ("deletion", "steps", 20, False),  # 21 points of the curve instead of 101
    ("insertion", "steps", 20, False),
    ("occlusion", "window", _quarter_window, True),  # 7x7 positions instead of 15x15 at 224 px
    ("stability", "augmentations", ["hflip"], False),
    ("randomization", "stages", 2, False),  # the output layer alone, then every layer
]


def economise(
    work: Workload,
    options: dict[str, dict[str, Any]],
    metric_opts: dict[str, dict[str, Any]],
    budget: float,
) -> tuple[dict, dict, list[str], dict[str, Any]]:
    """Options made cheaper, one economy of :data:`ECONOMIES` at a time, until the estimate
    fits ``budget`` seconds; returns the new options, the economies in words and the estimate."""
    options = {k: dict(v) for k, v in options.items()}
    metric_opts = {k: dict(v) for k, v in metric_opts.items()}
    user_set = {(k, o) for k, v in options.items() for o in v}
    user_set |= {(k, o) for k, v in metric_opts.items() for o in v}
    estimate = estimate_cost(work, options, metric_opts)
    applied: dict[tuple[str, str], Any] = {}
    for plugin, option, value, is_method in ECONOMIES:
        if estimate["seconds"] <= budget:
            break
        present = plugin in work.methods if is_method else plugin in work.metric_classes
        if not present or (plugin, option) in user_set:
            continue
        value = value(work.shape) if callable(value) else value
        (options if is_method else metric_opts).setdefault(plugin, {})[option] = value
        applied[(plugin, option)] = value
        estimate = estimate_cost(work, options, metric_opts)
    economies = [f"{plugin}.{option}={_show(value)}" for (plugin, option), value in applied.items()]
    return options, metric_opts, economies, estimate


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def describe_estimate(estimate: dict[str, Any], budget: float | None, economies: list[str]) -> str:
    """The estimate in words, for the user to decide before the work starts."""
    probe = estimate["probe"]
    text = (
        f"estimate: about {estimate['forward_images']} forward passes of one image, "
        f"~{_duration(estimate['seconds'])} (measured: {probe['forward_s']:.3f} s per forward "
        f"and {probe['forward_backward_s']:.3f} s per forward+backward pass of the batch)"
    )
    if economies:
        text += f"; to fit the budget of {_duration(budget or 0)}: {', '.join(economies)}"
    elif budget is not None and estimate["seconds"] > budget:
        text += f"; over the budget of {_duration(budget)} with no economy left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"
