"""An audit's page: the flagged regions, then per class the mean input, the mean map, its
spread and the unexplained share, with the flagged boxes drawn on them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from xai_core.core.explanation import normalize
from xai_core.io.outputs import atomic_write_text
from xai_core.report.html import HtmlReport, data_uri, esc
from xai_core.report.overlay import as_rgb, overlay, to_png
from xai_core.workflows.audit import AuditResult

BOX_COLOUR = (0, 229, 255)  # cyan: stands out from the inferno colormap and from grey anatomy

_FLAG_COLUMNS = [
    "class",
    "box (left, top, right, bottom)",
    "share",
    "unexplained",
    "reference",
    "reference share",
    "other classes' share",
    "lift",
    "images",
]


def audit_report(result: AuditResult) -> HtmlReport:
    """An :class:`HtmlReport` of ``result``: the flags, then one section per audited class."""
    report = HtmlReport(title=f"xai-core audit: {result.method}")
    report.add_note(
        f"{result.images} images explained with {result.method}. A flag marks a region holding "
        f"a disproportionate share of a class's attribution in many of its images: a place "
        f"to look at (a marker, text, a border, a device), not proof of a shortcut."
    )
    report.add_heading("Flagged regions")
    if result.flags:
        rows = [
            [
                f.class_name,
                str(f.box),
                f.share,
                f.unexplained,
                f.reference,
                f.reference_share,
                f.other_classes_share,
                f.lift,
                f"{f.images} / {f.class_images}",
            ]
            for f in result.flags
        ]
        report.add_table(_FLAG_COLUMNS, rows)
    else:
        report.add_note("No region was flagged.")
    settings = ", ".join(
        f"{k}={result.settings[k]}"
        for k in ("group_by", "reference", "min_share", "min_lift", "min_fraction")
        if k in result.settings
    )
    report.add_note(f"Settings: {settings}. See docs/audit.md for their meaning.")
    for name, reason in result.skipped_classes.items():
        report.add_note(f"Class {name} not audited: {reason}")
    for key, error in result.failed.items():
        report.add_note(f"{key}: failed: {error}", error=True)
    report.add_heading("Classes")
    for c, name in enumerate(result.class_names):
        if result.counts[c] == 0:
            continue
        boxes = [f.box for f in result.flags if f.class_index == c]
        report.add_fragment(_class_section(result, c, name, boxes))
    return report


def write_audit(result: AuditResult, out: str | Path) -> Path:
    """``report.html`` and ``audit.json`` in the folder ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(result.to_dict(), indent=2))
    return audit_report(result).write(out / "report.html")


def _class_section(
    result: AuditResult, c: int, name: str, boxes: list[tuple[int, int, int, int]]
) -> str:
    def unit(maps: torch.Tensor) -> np.ndarray:  # min-max over the whole array, for display
        return normalize(maps, maps.dim()).numpy()

    image = unit(result.mean_image[c])
    panels = [
        ("mean input", as_rgb(image)),
        ("mean map", overlay(image, unit(result.mean[c]))),
        ("spread (std)", overlay(image, unit(result.std[c]))),
        ("unexplained share", overlay(image, unit(result.unexplained[c]))),
    ]
    cards = "".join(
        f'<div class="card"><img alt="{esc(title)}" '
        f'src="{data_uri(to_png(draw_boxes(rgb, boxes)))}">'
        f'<div class="caption">{esc(title)}</div></div>'
        for title, rgb in panels
    )
    flagged = f", {len(boxes)} flagged region(s)" if boxes else ""
    note = f"{result.counts[c]} images; reference: {result.references[c]}{flagged}"
    return f'<h3>{esc(name)}</h3><p class="note">{esc(note)}</p><div class="grid">{cards}</div>'


def draw_boxes(
    rgb: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], colour=BOX_COLOUR
) -> np.ndarray:
    """A copy of ``rgb`` ``(H, W, 3)`` with each ``(left, top, right, bottom)`` box outlined."""
    out = rgb.copy()
    h, w = out.shape[:2]
    width = max(1, round(max(h, w) / 128))  # about one display pixel at the report's 224 px
    for left, top, right, bottom in boxes:
        r, b = min(right, w), min(bottom, h)
        out[top : min(top + width, b), left:r] = colour
        out[max(b - width, top) : b, left:r] = colour
        out[top:b, left : min(left + width, r)] = colour
        out[top:b, max(r - width, left) : r] = colour
    return out
