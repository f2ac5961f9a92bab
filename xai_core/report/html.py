"""One self-contained HTML file: overlays, 3D slice sliders, comparison tables.

No network and no server: images are embedded as PNG data URIs, the stylesheet and the small
slider script are inline, and a Content-Security-Policy forbids every other source. Every piece
of text that comes from data (file names, class names, method names, errors) is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xai_core.report.overlay import as_rgb, overlay, to_png
from xai_core.report.tables import ARROW

if TYPE_CHECKING:
    from xai_core.comparison import Comparison

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
        alpha: float = 0.45,
    ) -> None:
        """One input with one overlay per method (see :func:`input_section`)."""
        self.parts.append(input_section(name, image, maps, caption=caption, alpha=alpha))

    def add_fragment(self, fragment: str) -> None:
        """A section rendered earlier by :func:`input_section` (e.g. by a resumed batch job)."""
        self.parts.append(fragment)

    def add_comparison(self, result: Comparison) -> None:
        """The verdict, the metric tables (shared ranks, direction, 95% interval, n, methods not
        distinguishable) and measured costs."""
        from xai_core.report.tables import COLUMNS, metric_rows
        from xai_core.report.verdict import verdict_html

        self.parts.append(verdict_html(result))  # the verdict first: what to trust
        self.add_heading("Comparison")
        for metric in result.metrics:
            better = result.directions[metric].value
            rows, notes = metric_rows(result, metric)
            for row in rows:
                row.append(result.errors.get((row[1], metric), ""))
            caption = f"{metric} ({ARROW[better]})"
            notes_text = " ".join(f"{'*' * (i + 1)} {n}" for i, n in enumerate(notes))
            self.add_table([*COLUMNS, "error"], rows, caption=f"{caption} {notes_text}".strip())
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
        from xai_core.io.outputs import atomic_write_text

        atomic_write_text(Path(path), self.render())
        return Path(path)


def input_section(
    name: str,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    *,
    caption: str = "",
    alpha: float = 0.45,
) -> str:
    """HTML for one input and one overlay per method.

    ``image``: (H, W) / (H, W, 3) for 2D, or (D, H, W) / (D, H, W, 3) for a volume; ``maps``:
    method -> normalised map (H, W) or (D, H, W). Volumes get a slice slider.
    """
    volume = _is_volume(image)
    panels = [_Panel("input", _frames(image, None, volume, alpha))]
    panels += [_Panel(method, _frames(image, heat, volume, alpha)) for method, heat in maps.items()]
    group = "g" + hashlib.sha1(name.encode()).hexdigest()[:12]  # stable across resumed runs
    parts = [f"<h3>{esc(name)}</h3>"]
    if caption:
        parts.append(f'<p class="note">{esc(caption)}</p>')
    cards = []
    for panel in panels:
        middle = len(panel.frames) // 2
        slices = ""
        if volume:
            slices = f' data-group="{group}" data-slices="{esc(json.dumps(panel.frames))}"'
        cards.append(
            f'<div class="card"><img alt="{esc(panel.caption)}" src="{panel.frames[middle]}"'
            f'{slices}><div class="caption">{esc(panel.caption)}</div></div>'
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


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _is_volume(image: np.ndarray) -> bool:
    return image.ndim == 4 or (image.ndim == 3 and image.shape[-1] not in (1, 3))


def _frames(image: np.ndarray, heat: np.ndarray | None, volume: bool, alpha: float) -> list[str]:
    slices = list(image) if volume else [image]
    heats = [None] * len(slices) if heat is None else (list(heat) if volume else [heat])
    out = []
    for img, h in zip(slices, heats, strict=True):
        rgb = as_rgb(img) if h is None else overlay(img, h, alpha=alpha)
        out.append(data_uri(to_png(rgb)))
    return out
