"""Heat-map overlays that carry their meaning: a colour scale with units, the model's decision,
the input's own aspect ratio.

Unsigned maps (CAM, Grad-CAM, attention) are min-max scaled per map and drawn with a perceptual
sequential colormap; signed maps (occlusion's score drops, any map with negative values) are
scaled symmetrically around 0 and drawn with a diverging colormap centred at 0. In both, the
blend weight grows with |value| and is 0 near 0, so regions the map calls unimportant (the air
around a CT body) show the original anatomy instead of a tint.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# matplotlib, scikit-image and PIL are imported by the functions that draw: together they take
# most of a second to import, and most calls (and `xai --help`) never draw.

DEFAULT_COLORMAP = "inferno"  # perceptually uniform, readable in grayscale print, not rainbow
DIVERGING_COLORMAP = "RdBu_r"  # blue below 0, red above, white-ish at 0
DEAD_ZONE = 0.05  # |value| under this share of the map's largest |value| leaves the image as is
MAX_DISPLAY_SIDE = 512  # overlays are shown at the input's aspect, at most this many pixels
MAX_VOLUME_SIDE = 256  # ... and a volume's slices at most this many (a report holds every slice)

# Methods whose maps are signed by definition, and what their values measure.
SIGNED_METHODS = frozenset({"occlusion"})
UNITS = {"occlusion": "drop of the target score"}


@dataclass(frozen=True)
class MapScale:
    """How a raw map was scaled for display: signed or not, and its raw limits."""

    signed: bool
    low: float  # the raw value drawn at the colour bar's left end
    high: float  # ... and at its right end

    def label(self, method: str) -> str:
        """The colour bar's caption, e.g. 'gradcam, min-max per map: 0 … 1'."""
        units = UNITS.get(method)
        prefix = f"{method}: {units}" if units else method
        if self.signed:
            return f"{prefix}, signed, symmetric around 0: −{self.high:.3g} … +{self.high:.3g}"
        return f"{prefix}, min-max per map: 0 … 1 (raw {self.low:.3g} … {self.high:.3g})"

    def ticks(self) -> tuple[str, ...]:
        """Labels at the left end, the middle and the right end of the colour bar."""
        if self.signed:
            return (f"−{self.high:.3g}", "0", f"+{self.high:.3g}")
        return ("0", "0.5", "1")

    @property
    def colormap(self) -> str:
        return DIVERGING_COLORMAP if self.signed else DEFAULT_COLORMAP


def scale_map(raw: np.ndarray, method: str = "") -> tuple[np.ndarray, MapScale]:
    """A raw map (any shape) scaled for display: [-1, 1] by its largest |value| when signed
    (``method`` in :data:`SIGNED_METHODS` or any negative value), else min-max to [0, 1]."""
    values = np.nan_to_num(np.asarray(raw, dtype=np.float32))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if method in SIGNED_METHODS or low < 0:
        peak = max(abs(low), abs(high))
        scaled = values / peak if peak > 0 else np.zeros_like(values)
        return scaled, MapScale(True, -peak, peak)
    span = high - low
    scaled = (values - low) / span if span > 0 else np.zeros_like(values)
    return scaled, MapScale(False, low, high)


def colorize(heat: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """``heat`` in [0, 1] (any shape) to RGB uint8 with a matplotlib colormap."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](np.clip(np.nan_to_num(heat), 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A display image (H, W) gray or (H, W, 3) RGB, uint8 or float in [0, 1], as RGB uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"A display image must be (H, W) or (H, W, 3); got {img.shape}.")
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    alpha: float = 0.55,
    colormap: str | None = None,
    signed: bool = False,
) -> np.ndarray:
    """Blend a scaled map (H, W) over an image: [0, 1], or [-1, 1] when ``signed``.

    The blend weight grows with |heat| and is 0 below :data:`DEAD_ZONE`, so unimportant regions
    show the original anatomy unchanged. Signed maps use a diverging colormap centred at 0.
    """
    base = as_rgb(image).astype(np.float32)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {base.shape[:2]} differ in size.")
    low = -1.0 if signed else 0.0
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), low, 1.0)
    strength = np.clip((np.abs(h) - DEAD_ZONE) / (1 - DEAD_ZONE), 0.0, 1.0)
    weight = (alpha * np.sqrt(strength))[..., None]
    cmap = colormap or (DIVERGING_COLORMAP if signed else DEFAULT_COLORMAP)
    colours = colorize((h + 1) / 2 if signed else h, cmap).astype(np.float32)
    out = base * (1 - weight) + colours * weight
    return out.round().astype(np.uint8)


def colour_bar(scale: MapScale, width: int = 256, height: int = 12) -> np.ndarray:
    """The colour bar of ``scale`` as an (height, width, 3) uint8 image, low end on the left."""
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)
    return np.repeat(colorize(ramp, scale.colormap)[None], height, axis=0)


def display_shape(shape: Sequence[int], max_side: int = MAX_DISPLAY_SIDE) -> tuple[int, ...]:
    """``shape`` (the input's own spatial shape) scaled so its two last sides fit ``max_side``,
    aspect kept; leading (depth) sides are kept as they are."""
    *depth, h, w = (int(s) for s in shape)
    factor = min(1.0, max_side / max(h, w))
    return (*depth, max(1, round(h * factor)), max(1, round(w * factor)))


def on_display_grid(
    image: np.ndarray, heat: np.ndarray, spatial_dims: int, max_side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The display image and a map on the input's own aspect ratio.

    ``image``: the input as read, (*spatial) or (*spatial, 3); ``heat``: a map on the grid the
    model saw (e.g. square after ``--size``). Both are resampled to the input's shape (longest
    side capped at ``max_side``, by default :data:`MAX_DISPLAY_SIDE` for images and
    :data:`MAX_VOLUME_SIDE` for volumes), so a 2:1 radiograph explained at 224x224 is shown 2:1.
    """
    from skimage.transform import resize

    if max_side is None:
        max_side = MAX_DISPLAY_SIDE if spatial_dims == 2 else MAX_VOLUME_SIDE
    image = np.asarray(image)
    target = display_shape(image.shape[:spatial_dims], max_side)
    if image.shape[:spatial_dims] != target:
        image = resize(
            image, target + image.shape[spatial_dims:], order=1, preserve_range=True,
            anti_aliasing=True,
        )
        image = np.clip(image, 0, 255).round().astype(np.uint8)
    if heat.shape != target:
        heat = resize(heat.astype(np.float32), target, order=1, preserve_range=True)
    return image, heat.astype(np.float32)


def figure_png(
    image: np.ndarray, heat: np.ndarray, scale: MapScale, *, method: str, lines: Sequence[str] = ()
) -> bytes:
    """One overlay as a PNG with its colour bar, the bar's units and ``lines`` of text (the
    model's score, predicted and explained class, ground truth) above it. ``heat`` is scaled
    (see :func:`scale_map`) and has the image's size.

    Laid out in pixels with matplotlib's Agg (no axes: a figure costs ~30 ms), the overlay
    enlarged by whole pixels to at least 320 wide so that small inputs stay legible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb = overlay(image, heat, signed=scale.signed)
    factor = max(1, -(-320 // rgb.shape[1]))
    rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    h, w = rgb.shape[:2]
    pad, line, bar_w = 8, 15, 300
    label = scale.label(method)
    width = max(w, bar_w + 40, 6 * len(label), 400) + 2 * pad  # ~6 px a character at 8 pt
    top = pad + line * len(lines)
    height = top + h + pad + line + 12 + line + pad  # image, bar label, bar, ticks
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)

    def text(x: float, y: float, value: str, **kw: object) -> None:  # pixels from the top left
        fig.text(x / width, 1 - y / height, value, fontsize=8, va="top", **kw)

    for i, value in enumerate(lines):
        text(pad, pad + i * line, value)
    fig.figimage(rgb, xo=pad, yo=height - top - h)
    bar_x, bar_y = (width - bar_w) // 2, top + h + pad + line
    text(width / 2, bar_y - line + 2, label, ha="center")
    bar = colour_bar(scale, bar_w, 12)
    fig.figimage(bar, xo=bar_x, yo=height - bar_y - bar.shape[0])
    for value, x in zip(scale.ticks(), (bar_x, bar_x + bar_w / 2, bar_x + bar_w), strict=True):
        text(x, bar_y + 14, value, ha="center")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def decision_facts(
    scores: np.ndarray | None,
    target: int | None,
    class_names: Sequence[str] = (),
    truth: int | None = None,
) -> dict[str, str]:
    """What the model decided for one input, for captions: its predicted class with the softmax
    probability, the explained (target) class with its raw score, the ground truth when known,
    and ``verdict`` 'misclassified' when the prediction is not the truth.

    ``scores``: the model's raw outputs for this input, (C,); anything else (a segmentation
    model's per-pixel scores) gives no predicted class.
    """

    def name(index: int) -> str:
        return class_names[index] if 0 <= index < len(class_names) else f"class {index}"

    facts: dict[str, str] = {}
    row = None if scores is None else np.asarray(scores, dtype=np.float64)
    if row is not None and row.ndim == 1 and row.size:
        predicted = int(row.argmax())
        if row.size > 1:
            prob = np.exp(row - row.max())
            prob /= prob.sum()
            facts["predicted"] = f"{name(predicted)} (softmax {prob[predicted]:.2f})"
            if truth is not None:
                facts["verdict"] = "correct" if predicted == truth else "MISCLASSIFIED"
        else:  # one output (a binary model's logit): its sigmoid, no argmax to speak of
            facts["predicted"] = f"{name(0)} (sigmoid {1 / (1 + np.exp(-row[0])):.2f})"
        if target is not None and 0 <= target < row.size:
            facts["target"] = f"{name(target)} (score {row[target]:.3g})"
    elif target is not None:
        facts["target"] = name(target)
    if truth is not None:
        facts["truth"] = name(truth)
    return facts


def fact_lines(facts: dict[str, str]) -> list[str]:
    """``facts`` as lines of text: 'predicted: …', 'target: …', 'truth: … (MISCLASSIFIED)'."""
    lines = [f"{k}: {facts[k]}" for k in ("predicted", "target", "truth") if k in facts]
    if "verdict" in facts and lines:
        lines[-1] += f"  ({facts['verdict']})"
    return lines


def to_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
