"""One self-contained HTML file: overlays with colour bars and the model's decision, 3D slice
sliders, comparison tables and perturbation-curve plots.

No network and no server: images are embedded as PNG data URIs, the stylesheet and the small
slider script are inline, and a Content-Security-Policy forbids every other source. Every piece
of text that comes from data (file names, class names, method names, errors) is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# matplotlib is imported where a plot is drawn (start-up time, as in overlay.py).
from xai_core.io.outputs import atomic_write_text
from xai_core.report.overlay import (
    MapScale,
    as_rgb,
    colour_bar,
    fact_lines,
    on_display_grid,
    overlay,
    scale_map,
    to_png,
)
from xai_core.report.tables import ARROW, COLUMNS, economies_text, metric_rows

if TYPE_CHECKING:
    from xai_core.workflows.compare import Comparison

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem}table{border-collapse:collapse;margin:.5rem 0 1rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:1rem}
.card{background:#fff;border:1px solid #ddd;padding:.5rem}
.card img{display:block;width:224px;height:auto;image-rendering:pixelated}
.caption{font-size:.8rem;max-width:224px;overflow-wrap:anywhere}.note{color:#555}
.error{color:#b00020}.slider{width:224px}
.card img.cbar-img{height:10px;margin-top:.25rem;image-rendering:auto}
.cbar-ticks{display:flex;justify-content:space-between;width:224px;font-size:.7rem}
.cbar-label{font-size:.7rem;max-width:224px;color:#333}
.facts{font-size:.85rem}.fact{margin-right:1rem}.fact-verdict.error{font-weight:bold}
.curves{display:flex;flex-wrap:wrap;gap:1rem}.curves img{width:420px;height:auto}
"""

# Sliders swap each image's source among its slices; the slices live in data attributes.
SCRIPT = """
document.querySelectorAll('input.slider').forEach(function (slider) {
  var group = slider.dataset.group;
  var label = document.getElementById('label-' + group);
  slider.addEventListener('input', function () {
    var i = parseInt(slider.value, 10);
    document.querySelectorAll('img[data-group="' + group + '"]').forEach(function (img) {
      var slices = JSON.parse(img.dataset.slices);
      img.src = slices[i];
    });
    label.textContent = 'slice ' + (i + 1) + ' / ' + (parseInt(slider.max, 10) + 1);
  });
});
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class _Panel:
    caption: str
    frames: list[str]  # data URIs: one for a 2D image, one per slice for a volume
    scale: MapScale | None = None  # the colour scale of a map (None: the input or a mask)
    method: str = ""


@dataclass
class HtmlReport:
    """Build a report section by section, then :meth:`render` or :meth:`write` it."""

    title: str = "xai-core report"
    parts: list[str] = field(default_factory=list)

    def add_heading(self, text: str) -> None:
        self.parts.append(f"<h2>{esc(text)}</h2>")

    def add_note(self, text: str, *, error: bool = False) -> None:
        css = "error" if error else "note"
        self.parts.append(f'<p class="{css}">{esc(text)}</p>')

    def add_table(self, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        head = "".join(f"<th>{esc(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
        )
        cap = f"<caption>{esc(caption)}</caption>" if caption else ""
        self.parts.append(
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def add_input(
        self,
        name: str,
        image: np.ndarray,
        maps: dict[str, np.ndarray],
        *,
        caption: str = "",
        alpha: float = 0.55,
        facts: dict[str, str] | None = None,
        masks: dict[str, np.ndarray] | None = None,
    ) -> None:
        """One input with one overlay per method (see :func:`input_section`)."""
        self.parts.append(
            input_section(name, image, maps, caption=caption, alpha=alpha, facts=facts, masks=masks)
        )

    def add_fragment(self, fragment: str) -> None:
        """A section rendered earlier by :func:`input_section` (e.g. by a resumed batch job)."""
        self.parts.append(fragment)

    def add_comparison(self, result: Comparison) -> None:
        """The verdict, the metric tables (shared ranks, direction, 95% interval, n, methods not
        distinguishable) and measured costs."""
        from xai_core.report.verdict import verdict_html  # verdict.py imports this module

        self.parts.append(verdict_html(result))  # the verdict first: what to trust
        if (economies := economies_text(result)) is not None:
            self.add_note(economies)
        self.add_heading("Comparison")
        for metric in result.metrics:
            better = result.directions[metric].value
            rows, notes = metric_rows(result, metric)
            for row in rows:
                row.append(result.errors.get((row[1], metric), ""))
            caption = f"{metric} ({ARROW[better]})"
            notes_text = " ".join(f"{'*' * (i + 1)} {n}" for i, n in enumerate(notes))
            self.add_table([*COLUMNS, "error"], rows, caption=f"{caption} {notes_text}".strip())
        plots = [png for m in result.metrics if (png := curves_png(result, m)) is not None]
        if plots:
            images = "".join(
                f'<img class="curve" alt="perturbation curves" src="{data_uri(p)}">' for p in plots
            )
            self.parts.append(f'<div class="curves">{images}</div>')
        if result.costs:
            rows = [
                [m, c.seconds_per_image, "n/a" if c.peak_bytes is None else c.peak_bytes / 2**20]
                for m, c in result.costs.items()
            ]
            self.add_table(["method", "seconds / image", "peak MB"], rows, caption="cost")
        for kind, skipped in (
            ("method", result.skipped_methods),
            ("metric", result.skipped_metrics),
        ):
            for name, reason in skipped.items():
                self.add_note(f"Skipped {kind} {name}: {reason}")

    def render(self) -> str:
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(self.title)}</h1>{''.join(self.parts)}<script>{SCRIPT}</script></body></html>"
        )

    def write(self, path: str | Path) -> Path:
        atomic_write_text(Path(path), self.render())
        return Path(path)


def input_section(
    name: str,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    *,
    caption: str = "",
    alpha: float = 0.55,
    facts: dict[str, str] | None = None,
    masks: dict[str, np.ndarray] | None = None,
) -> str:
    """HTML for one input and one overlay per method, each with its colour bar.

    ``image``: the input as read, (H, W) / (H, W, 3) for 2D, or (D, H, W) / (D, H, W, 3) for a
    volume; ``maps``: method -> raw map (H', W') or (D', H', W') on the grid the model saw (any
    size: it is shown at the input's aspect ratio, see :func:`on_display_grid`), scaled per map
    by :func:`scale_map`; ``facts``: the model's decision (:func:`decision_facts`), shown above
    the maps; ``masks``: name -> ground-truth mask, drawn as overlays without a colour bar.
    Volumes get a slice slider.
    """
    volume = _is_volume(image)
    dims = 3 if volume else 2
    panels = []
    for method, raw in {**maps, **(masks or {})}.items():
        is_mask = method not in maps
        # Scaled on the model's grid, so the colour bar's limits are the map's own values.
        heat, scale = scale_map(np.asarray(raw, np.float32), "" if is_mask else method)
        display, heat = on_display_grid(image, heat, dims)
        caption_of = f"{method} (mask)" if is_mask else method
        frames = _frames(display, heat, volume, alpha, scale.signed)
        panels.append(_Panel(caption_of, frames, None if is_mask else scale, method))
    display, _ = on_display_grid(image, np.zeros(image.shape[:dims], np.float32), dims)
    panels.insert(0, _Panel("input", _frames(display, None, volume, alpha, False)))
    group = "g" + hashlib.sha1(name.encode()).hexdigest()[:12]  # stable across resumed runs
    parts = [f"<h3>{esc(name)}</h3>"]
    if caption:
        parts.append(f'<p class="note">{esc(caption)}</p>')
    if facts:
        parts.append(_facts_html(facts))
    cards = []
    for panel in panels:
        middle = len(panel.frames) // 2
        slices = ""
        if volume:
            slices = f' data-group="{group}" data-slices="{esc(json.dumps(panel.frames))}"'
        bar = "" if panel.scale is None else _colour_bar_html(panel.scale, panel.method)
        cards.append(
            f'<div class="card"><img class="overlay" alt="{esc(panel.caption)}" '
            f'src="{panel.frames[middle]}"{slices}>{bar}'
            f'<div class="caption">{esc(panel.caption)}</div></div>'
        )
    parts.append('<div class="grid">' + "".join(cards) + "</div>")
    if volume:
        depth = len(panels[0].frames)
        parts.append(
            f'<input type="range" class="slider" min="0" max="{depth - 1}" '
            f'value="{depth // 2}" data-group="{group}" aria-label="slice">'
            f' <span id="label-{group}">slice {depth // 2 + 1} / {depth}</span>'
        )
    return "".join(parts)


def _facts_html(facts: dict[str, str]) -> str:
    """The model's decision as labelled spans; a misclassification stands out in red."""
    spans = []
    for key in ("predicted", "target", "truth", "verdict"):
        if key in facts:
            text = facts[key] if key == "verdict" else f"{key}: {facts[key]}"
            css = " error" if facts[key] == "MISCLASSIFIED" else ""
            spans.append(f'<span class="fact fact-{key}{css}">{esc(text)}</span>')
    title = esc(" · ".join(fact_lines(facts)))
    return f'<p class="facts" title="{title}">{"".join(spans)}</p>'


def _colour_bar_html(scale: MapScale, method: str) -> str:
    ticks = "".join(f"<span>{esc(t)}</span>" for t in scale.ticks())
    return (
        f'<div class="cbar"><img class="cbar-img" alt="colour scale of {esc(method)}" '
        f'src="{data_uri(to_png(colour_bar(scale)))}">'
        f'<div class="cbar-ticks">{ticks}</div>'
        f'<div class="cbar-label">{esc(scale.label(method))}</div></div>'
    )


def curves_png(result: Comparison, metric: str) -> bytes | None:
    """The mean perturbation curve of each method for ``metric`` (deletion, insertion), as a
    PNG plot; None when the metric kept no curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = []
    for method in result.methods:
        details = result.details.get((method, metric)) or {}
        if "curves" in details and "fractions" in details:
            curves = np.asarray(details["curves"], dtype=np.float64)
            fractions = np.asarray(details["fractions"], dtype=np.float64)
            lines.append((method, fractions, curves, details.get("kind", "score")))
    if not lines:
        return None
    fig = Figure(figsize=(4.2, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, fractions, curves, _ in lines:
        auc = result.aggregate(method, metric).mean
        (line,) = ax.plot(fractions, np.nanmean(curves, axis=0), label=f"{method} (AUC {auc:.3g})")
        for curve in curves:  # each sample, faint, in the method's colour
            ax.plot(fractions, curve, color=line.get_color(), alpha=0.15, linewidth=0.8)
    verb = "removed" if metric == "deletion" else "revealed"
    ax.set_xlabel(f"share of pixels {verb}, most important first", fontsize=8)
    ax.set_ylabel(f"target score ({lines[0][3]})", fontsize=8)
    ax.set_title(f"{metric} curves (mean; faint: each input)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _is_volume(image: np.ndarray) -> bool:
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] not in (1, 3))


def _frames(
    image: np.ndarray, heat: np.ndarray | None, volume: bool, alpha: float, signed: bool
) -> list[str]:
    slices = list(image) if volume else [image]
    heats = [None] * len(slices) if heat is None else (list(heat) if volume else [heat])
    out = []
    for img, h in zip(slices, heats, strict=True):
        rgb = as_rgb(img) if h is None else overlay(img, h, alpha=alpha, signed=signed)
        out.append(data_uri(to_png(rgb)))
    return out
