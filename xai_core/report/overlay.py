"""Heat-map overlays with a perceptual colormap, for grayscale and RGB images alike."""

from __future__ import annotations

import io

import numpy as np

DEFAULT_COLORMAP = "inferno"  # perceptually uniform, readable in grayscale print, not rainbow


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
    alpha: float = 0.45,
    colormap: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """Blend a normalised map (H, W) over an image; weak heat stays see-through.

    The blend weight grows with the heat, so unimportant regions show the original anatomy
    instead of a uniform tint of the colormap's low end.
    """
    base = as_rgb(image).astype(np.float32)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {base.shape[:2]} differ in size.")
    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    weight = (alpha * np.sqrt(h))[..., None]
    out = base * (1 - weight) + colorize(h, colormap).astype(np.float32) * weight
    return out.round().astype(np.uint8)


def to_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
