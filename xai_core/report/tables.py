"""Comparison tables as Markdown, CSV and JSON; every metric carries its direction."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xai_core.comparison import Comparison

ARROW = {"higher": "↑ higher is better", "lower": "↓ lower is better"}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def comparison_markdown(result: Comparison) -> str:
    """One table per metric: methods ranked best first, mean with its 95% interval."""
    lines: list[str] = []
    for metric in result.metrics:
        better = result.directions[metric].value
        lines += [
            f"### {_md_escape(metric)} ({ARROW[better]})",
            "",
            "| rank | method | mean | 95% CI | n |",
            "| ---: | --- | ---: | --- | ---: |",
        ]
        for rank, method in enumerate(result.ranking(metric), start=1):
            agg = result.aggregate(method, metric)
            ci = f"[{_fmt(agg.low)}, {_fmt(agg.high)}]"
            error = result.errors.get((method, metric))
            name = _md_escape(method) + (f" (error: {_md_escape(error)})" if error else "")
            lines.append(f"| {rank} | {name} | {_fmt(agg.mean)} | {ci} | {agg.n} |")
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
