"""The verdict of a comparison as an HTML fragment, for the top of a report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xai_core.report.html import esc
from xai_core.report.tables import _fmt

if TYPE_CHECKING:
    from xai_core.workflows.compare import Comparison

CSS = (
    ".verdict{background:#fff;border:2px solid #1d1d1f;padding:.5rem 1rem;margin:1rem 0}"
    ".verdict .untrusted{color:#b00020;font-weight:bold}"
)


def verdict_overview_html(studies: list[tuple[str, Comparison]]) -> str:
    """The verdicts of several comparisons in words, one list each, for the top of a report."""
    parts = ["<h2>Verdicts</h2>"]
    for title, result in studies:
        items = "".join(f"<li>{esc(line)}</li>" for line in result.verdict().lines)
        parts.append(f"<h3>{esc(title)}</h3><ul>{items}</ul>")
    return f'<section class="verdict">{"".join(parts)}</section>'


def verdict_html(result: Comparison, title: str = "Verdict") -> str:
    """The verdict's sentences and its one-line-per-method table; every name is escaped."""
    verdict = result.verdict()
    items = "".join(f"<li>{esc(line)}</li>" for line in verdict.lines)
    head = "".join(
        f"<th>{esc(c)}</th>"
        for c in (
            "position",
            "method",
            "mean rank",
            "rank range",
            "metrics",
            "sanity |ρ|",
            "s / image",
        )
    )
    body = []
    for s in verdict.methods:
        untrusted = s.trusted is False
        position = "✗ untrusted" if untrusted else (s.position or "—")
        spread = "n/a" if s.best_rank is None else f"{s.best_rank:g}–{s.worst_rank:g}"
        sanity = "not checked" if s.sanity is None else f"{s.sanity:.2f}"
        cells = [
            position,
            s.method,
            _fmt(s.mean_rank, 3),
            spread,
            s.metrics,
            sanity,
            _fmt(s.seconds_per_image),
        ]
        css = ' class="untrusted"' if untrusted else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    note = (
        f"Mean rank over {', '.join(verdict.metrics) or 'no metric'}; differences: paired "
        f"Wilcoxon signed-rank, Holm-adjusted p < {verdict.alpha:g}; sanity fails above "
        f"|ρ| = {verdict.threshold:g} at the deepest randomised layer."
    )
    return (
        f'<section class="verdict"><style>{CSS}</style><h2>{esc(title)}</h2><ul>{items}</ul>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f'<p class="note">{esc(note)}</p></section>'
    )
