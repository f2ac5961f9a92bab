"""Rendering results for people: overlays, tables (Markdown, CSV, JSON) and one HTML report."""

from xai_core.report.audit import audit_report, write_audit
from xai_core.report.html import HtmlReport
from xai_core.report.overlay import overlay, to_png
from xai_core.report.tables import (
    comparison_csv,
    comparison_json,
    comparison_markdown,
    verdict_markdown,
)

__all__ = [
    "HtmlReport",
    "audit_report",
    "comparison_csv",
    "comparison_json",
    "comparison_markdown",
    "overlay",
    "to_png",
    "verdict_markdown",
    "write_audit",
]
