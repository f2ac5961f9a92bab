"""Statistics for comparing explainers on a handful of samples: honest intervals, shared ranks and
paired tests.

A clinician reads a comparison table as a claim. The numbers here are built so that none of them
claims more than the data holds:

- **Intervals respect the metric's range and the sample size.** A mean of 0/1 values (a hit rate
  such as the pointing game) gets the Wilson score interval (Wilson 1927), which always lies in
  [0, 1]; any other mean gets a seeded percentile bootstrap interval (Efron & Tibshirani 1993),
  clipped to the range the metric declares. Below :data:`MIN_N` defined samples there is no
  interval at all, and the reason says so.
- **Ties share a rank** ("competition" ranking: 1, 1, 3), on means equal to
  :data:`TIE_DIGITS` significant digits, so a method is never ranked above an identical one.
- **Differences are tested in pairs** over the samples both methods scored (Wilcoxon signed-rank),
  with Holm's correction across the pairs of a metric (Holm 1979), so a table can say "not
  distinguishable" instead of implying an order.

Everything here is small and runs on the CPU: a comparison holds one value per sample and method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# scipy.stats is imported by the two functions that need it (about 0.3 s at start-up).

MIN_N = 3  # fewer defined samples: no interval and no test (the reason is shown)
LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
ALPHA = 0.05  # family-wise error rate of the paired tests of one metric (Holm)
TIE_DIGITS = 9  # means equal to this many significant digits share a rank

Range = tuple[float, float]


@dataclass(frozen=True)
class Interval:
    """The mean of the defined values and its confidence interval (``low``/``high`` NaN when
    there is none; ``note`` says why)."""

    mean: float
    low: float
    high: float
    n: int
    kind: str  # "wilson", "bootstrap" or "none"
    note: str | None = None


def defined(values: torch.Tensor) -> torch.Tensor:
    """The non-NaN values as float64 on the CPU."""
    values = values.detach().to("cpu", torch.float64).flatten()
    return values[~values.isnan()]


def is_binary(values: torch.Tensor) -> bool:
    return bool(((values == 0) | (values == 1)).all())


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion (Wilson 1927): always within [0, 1], and not
    degenerate at 0 or n successes, unlike the normal-approximation (Wald) interval."""
    if n <= 0:
        raise ValueError("wilson() needs n >= 1")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_means(
    values: torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED
) -> torch.Tensor:
    """``resamples`` means of samples drawn with replacement, in one vectorised draw. A private
    generator makes the result reproducible and leaves the global random state alone."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(values.numel(), (resamples, values.numel()), generator=generator)
    return values[picks].mean(dim=1)


def bootstrap_interval(
    values: torch.Tensor, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    means = bootstrap_means(values, resamples, seed)
    tail = (1 - level) / 2
    q = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype))
    return float(q[0]), float(q[1])


def within(values: torch.Tensor, bounds: Range | None) -> bool:
    """Whether every value lies in ``bounds`` (``None``: unbounded)."""
    if bounds is None or values.numel() == 0:
        return True
    low, high = bounds
    slack = [1e-9 * max(1.0, abs(b)) if math.isfinite(b) else 0.0 for b in bounds]
    return bool((values >= low - slack[0]).all() and (values <= high + slack[1]).all())


def interval(
    values: torch.Tensor,
    bounds: Range | None = None,
    *,
    level: float = LEVEL,
    min_n: int = MIN_N,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """Mean and interval of the defined values, never outside ``bounds`` (the metric's range).

    0/1 values get Wilson's interval, others a percentile bootstrap; fewer than ``min_n`` defined
    values get none (``kind="none"`` and a ``note``).
    """
    x = defined(values)
    n = int(x.numel())
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none", "no defined value")
    mean = float(x.mean())
    if n < min_n:
        note = f"n = {n} < {min_n}: too few samples for an interval"
        return Interval(mean, math.nan, math.nan, n, "none", note)
    if is_binary(x):
        low, high = wilson(int(x.sum()), n, level)
        kind = "wilson"
    else:
        low, high = bootstrap_interval(x, level, resamples, seed)
        kind = "bootstrap"
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n, kind)


def same(a: float, b: float) -> bool:
    """Equal to :data:`TIE_DIGITS` significant digits (floating-point noise is not a win)."""
    return math.isclose(a, b, rel_tol=10.0**-TIE_DIGITS, abs_tol=1e-12)


def competition_ranks(scores: Sequence[float], higher_is_better: bool) -> list[int | None]:
    """Ranks 1, 1, 3 ...: equal scores share the best rank of their block; NaN gets ``None``."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(
        (i for i, s in enumerate(scores) if not math.isnan(s)), key=lambda i: sign * scores[i]
    )
    ranks: list[int | None] = [None] * len(scores)
    for position, i in enumerate(order):
        previous = order[position - 1] if position else None
        if previous is not None and same(scores[i], scores[previous]):
            ranks[i] = ranks[previous]
        else:
            ranks[i] = position + 1
    return ranks


def average_ranks(scores: Sequence[float], higher_is_better: bool) -> list[float | None]:
    """Ranks with ties given the mean of the positions they occupy (1.5, 1.5, 3), as Demšar
    (2006) averages ranks over data sets; NaN gets ``None``."""
    low = competition_ranks(scores, higher_is_better)
    out: list[float | None] = []
    for rank in low:
        if rank is None:
            out.append(None)
            continue
        size = sum(1 for r in low if r == rank)
        out.append(rank + (size - 1) / 2)
    return out


@dataclass(frozen=True)
class Paired:
    p: float  # two-sided; NaN when there are too few pairs to test
    n: int  # samples both methods scored
    shift: float  # Hodges-Lehmann estimate of a - b: its sign says which is higher


def hodges_lehmann(diff: torch.Tensor) -> float:
    """Median of the Walsh averages ``(d_i + d_j) / 2, i <= j``: the location estimate that goes
    with the signed-rank test (plain median of the differences above 2000 samples)."""
    if diff.numel() == 0:
        return math.nan
    if diff.numel() > 2000:
        return float(diff.median())
    i, j = torch.triu_indices(diff.numel(), diff.numel())
    return float(((diff[i] + diff[j]) / 2).median())


def paired_test(a: torch.Tensor, b: torch.Tensor, min_n: int = MIN_N) -> Paired:
    """Two-sided Wilcoxon signed-rank test of ``a - b`` over the samples both define. NaN below
    ``min_n`` pairs; p = 1 when every difference is zero (two identical methods). Zero
    differences are dropped (Wilcoxon's convention), which makes the test on 0/1 values the
    sign test."""
    a = a.detach().to("cpu", torch.float64).flatten()
    b = b.detach().to("cpu", torch.float64).flatten()
    both = ~(a.isnan() | b.isnan())
    diff = (a - b)[both]
    n = int(diff.numel())
    if n < min_n:
        return Paired(math.nan, n, hodges_lehmann(diff))
    scale = max(float(a[both].abs().max()), float(b[both].abs().max()), 1e-300)
    nonzero = diff[diff.abs() > scale * 10.0**-TIE_DIGITS]
    if nonzero.numel() == 0:
        return Paired(1.0, n, 0.0)
    from scipy.stats import wilcoxon

    p = float(wilcoxon(nonzero.numpy(), alternative="two-sided").pvalue)
    return Paired(p, n, hodges_lehmann(diff))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979); NaN stays NaN and is not counted."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted
