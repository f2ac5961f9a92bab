"""Comparison tables as Markdown, CSV and JSON; every metric carries its direction.

The verdict comes first; then one table per metric with shared ranks, the interval of each mean
(Wilson for 0/1 values, bootstrap otherwise, within the metric's range; none below n = 3, with a
footnote) and the methods each one is not distinguishable from."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xai_core.workflows.compare import Comparison

ARROW = {"higher": "↑ higher is better", "lower": "↓ lower is better"}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


INTERVAL = {"wilson": "Wilson", "bootstrap": "bootstrap"}


def metric_rows(result: Comparison, metric: str) -> tuple[list[list[str]], list[str]]:
    """The cells of one metric's table (rank, method, mean, 95% CI, n, not distinguishable
    from), best first, and its footnotes. Shared by the Markdown and HTML exports."""
    ranks = result.ranks(metric)
    rows, notes = [], []
    for method in result.ranking(metric):
        agg = result.aggregate(method, metric)
        if agg.kind == "none":
            ci = "—"
        else:
            ci = f"[{_fmt(agg.low)}, {_fmt(agg.high)}] ({INTERVAL[agg.kind]})"
        if agg.note:
            if agg.note not in notes:
                notes.append(agg.note)
            ci += " " + "*" * (notes.index(agg.note) + 1)
        rank = ranks[method]
        tied = ", ".join(result.tied_with(method, metric))
        rows.append(
            ["—" if rank is None else str(rank), method, _fmt(agg.mean), ci, str(agg.n), tied]
        )
    return rows, notes


COLUMNS = ["rank", "method", "mean", "95% CI", "n", "not distinguishable from"]


def verdict_markdown(result: Comparison) -> str:
    """The verdict: what to trust, then one line per method."""
    verdict = result.verdict()
    lines = ["### Verdict", ""]
    lines += [f"- {line.replace(chr(10), ' ')}" for line in verdict.lines]  # not in a table
    lines += [
        "",
        "| position | method | mean rank | rank range | metrics | sanity: abs(ρ) | s / image |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for s in verdict.methods:
        position = "✗ untrusted" if s.trusted is False else (s.position or "—")
        spread = "n/a" if s.best_rank is None else f"{s.best_rank:g}–{s.worst_rank:g}"
        sanity = "not checked" if s.sanity is None else f"{s.sanity:.2f}"
        cost = _fmt(s.seconds_per_image)
        lines.append(
            f"| {position} | {_md_escape(s.method)} | {_fmt(s.mean_rank, 3)} | {spread} | "
            f"{s.metrics} | {sanity} | {cost} |"
        )
    lines += [
        "",
        f"Mean rank over {', '.join(verdict.metrics) or 'no metric'} (ties share the mean of "
        f"their positions); differences: paired Wilcoxon signed-rank, Holm-adjusted, "
        f"p < {verdict.alpha:g}; sanity fails above |ρ| = {verdict.threshold:g} at the deepest "
        "randomised layer. See docs/comparing.md.",
        "",
    ]
    return "\n".join(lines)


def economies_text(result: Comparison) -> str | None:
    """The options ``compare()`` made cheaper to fit its time budget, in words (``None`` when it
    changed none): a reader must know the numbers come from coarser settings."""
    if not result.economies:
        return None
    return (
        f"Made cheaper to fit the time budget: {', '.join(result.economies)}. Set these options "
        f"yourself, or allow more time (`--budget SECONDS`; `--budget 0` sets no limit)."
    )


def comparison_markdown(result: Comparison) -> str:
    """The verdict, the economies made to fit the time budget, then one table per metric:
    shared ranks, mean with its 95% interval, n, and the methods each is not distinguishable
    from."""
    lines: list[str] = [verdict_markdown(result)]
    if (economies := economies_text(result)) is not None:
        lines += [_md_escape(economies), ""]
    for metric in result.metrics:
        better = result.directions[metric].value
        lines += [
            f"### {_md_escape(metric)} ({ARROW[better]})",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "| ---: | --- | ---: | --- | ---: | --- |",
        ]
        rows, notes = metric_rows(result, metric)
        for cells in rows:
            method = cells[1]
            error = result.errors.get((method, metric))
            cells = [_md_escape(c) for c in cells]
            if error:
                cells[1] += f" (error: {_md_escape(error)})"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"{'*' * (i + 1)} {_md_escape(note)}  " for i, note in enumerate(notes)]
        if notes:
            lines.append("")
    if result.costs:
        lines += [
            "### cost (measured in this run)",
            "",
            "| method | seconds / image | peak memory (MB) |",
            "| --- | ---: | ---: |",
        ]
        for method, cost in result.costs.items():
            peak = "n/a" if cost.peak_bytes is None else f"{cost.peak_bytes / 2**20:.1f}"
            lines.append(f"| {_md_escape(method)} | {cost.seconds_per_image:.4g} | {peak} |")
        lines.append("")
    for title, skipped in (
        ("Skipped methods", result.skipped_methods),
        ("Skipped metrics", result.skipped_metrics),
    ):
        if skipped:
            lines += [f"**{title}:**", ""]
            lines += [f"- {_md_escape(k)}: {_md_escape(v)}" for k, v in skipped.items()]
            lines.append("")
    return "\n".join(lines)


def comparison_csv(result: Comparison) -> str:
    """Per-sample values: one row per (method, metric, sample)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "metric", "better", "sample", "target", "value"])
    for (method, metric), values in result.values.items():
        better = result.directions[metric].value
        for i, value in enumerate(values.tolist()):
            writer.writerow(
                [
                    method,
                    metric,
                    better,
                    i,
                    int(result.targets[i]),
                    "" if math.isnan(value) else repr(value),
                ]
            )
    return buffer.getvalue()


def comparison_json(result: Comparison) -> str:
    """Strict JSON (undefined values are ``null``, never ``NaN``)."""
    return json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
