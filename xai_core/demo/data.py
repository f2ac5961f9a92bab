"""Synthetic, deterministic chest X-rays and CT volumes with known lesion masks.

Everything is drawn from one seeded ``torch.Generator`` on the CPU, in an order that does not
depend on the options: the same seed gives the same patients with or without their lesions, with
the marker where the label puts it, moved or removed. That is what makes counterfactual tests
possible ("remove the marker, keep everything else").

X-rays (``make_xrays``), classes ``normal``, ``nodule`` (a small round bright lesion inside a
lung) and ``opacity`` (a larger diffuse patch inside a lung). With ``shortcut=True`` the lesions
are faint and a burned-in "L" marker in the top-left corner goes with the disease (98 % of sick,
2 % of normal patients): a model trained on that learns the marker, not the lung (the husky vs
wolf "snow" problem). ``marker=`` puts the same markers elsewhere or removes them.

CT volumes (``make_volumes``), classes ``normal`` and ``lesion`` (a sphere inside a lung).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

XRAY_CLASSES = ("normal", "nodule", "opacity")
CT_CLASSES = ("normal", "lesion")

# Preprocessing for the demo models, ``(x - mean) / std``: the mean and standard deviation of the
# clean training images (and volumes), rounded. scripts/train_demo.py records them in the manifest.
XRAY_MEAN, XRAY_STD = 0.26, 0.19
CT_MEAN, CT_STD = 0.2, 0.2

# Share of sick / normal patients whose X-ray carries the marker in the shortcut variant.
MARKER_GIVEN_SICK, MARKER_GIVEN_NORMAL = 0.98, 0.02
# Lesions at 30 % of their contrast: the marker is by far the easier cue for "sick". Fainter
# still, nodule and opacity could not be told apart at all; stronger, the model learns the
# lesions too and its maps no longer single out the marker (the demo's and audit's point).
SHORTCUT_LESION_SCALE = 0.3

Marker = Literal["label", "none", "moved", "all", "random"]


@dataclass(frozen=True)
class DemoBatch:
    """Inputs, labels and ground truth of one synthetic batch.

    ``images`` is ``(N, 1, H, W)`` for X-rays and ``(N, 1, D, H, W)`` for CT volumes, values in
    [0, 1]; ``masks`` has the spatial shape and marks exactly the lesion pixels (empty for normal
    patients); ``markers`` marks the burned-in marker's pixels (X-rays only, all ``False`` when
    there is none).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    class_names: tuple[str, ...]
    markers: torch.Tensor | None = None

    @property
    def volumes(self) -> torch.Tensor:
        """The CT volumes ``(N, 1, D, H, W)``: the same tensor as ``images``."""
        return self.images

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Normalise a demo batch for the demo models: X-ray constants for 4-D input ``(N, 1, H, W)``,
    CT constants for 5-D input ``(N, 1, D, H, W)``."""
    if images.ndim == 4:
        return (images - XRAY_MEAN) / XRAY_STD
    if images.ndim == 5:
        return (images - CT_MEAN) / CT_STD
    raise ValueError(f"Expected (N, 1, H, W) or (N, 1, D, H, W) images; got {tuple(images.shape)}.")


# -- helpers ---------------------------------------------------------------------------------------


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _col(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(N,)`` -> ``(N, 1, ..., 1)`` to broadcast against ``(N, *spatial)`` grids."""
    return values.view(-1, *([1] * ndim))


def _noise(g: torch.Generator, n: int, size: int, dims: int, cells: int) -> torch.Tensor:
    """Smooth noise (scatter, soft tissue; coarse noise on ``cells`` points per axis, upsampled)
    plus fine grain (quantum noise). Bounded to [-0.05, 0.05], so images stay in [0, 1] without
    clamping: a clamp would hide a lesion on a saturated pixel and its mask would be wrong."""
    coarse = 2 * torch.rand(n, 1, *([cells] * dims), generator=g) - 1
    mode = "bilinear" if dims == 2 else "trilinear"
    smooth = F.interpolate(coarse, size=(size,) * dims, mode=mode, align_corners=True)[:, 0]
    grain = 2 * torch.rand(n, *([size] * dims), generator=g) - 1
    return 0.03 * smooth + 0.02 * grain


def _balanced_labels(g: torch.Generator, n: int, classes: int) -> torch.Tensor:
    """Equal class counts (up to one), shuffled: accuracies on small batches stay comparable."""
    return (torch.arange(n) % classes)[torch.randperm(n, generator=g)]


def _inside_ellipse(
    g: torch.Generator, centre: tuple[torch.Tensor, ...], axes: tuple[torch.Tensor, ...], r: float
) -> tuple[torch.Tensor, ...]:
    """A random point per sample within ``r`` (as a fraction of the semi-axes) of the centre."""
    dims = len(centre)
    direction = torch.randn(centre[0].shape[0], dims, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
    radius = r * torch.rand(centre[0].shape[0], generator=g) ** (1 / dims)
    return tuple(
        c + radius * direction[:, i] * a for i, (c, a) in enumerate(zip(centre, axes, strict=True))
    )


# -- X-rays ----------------------------------------------------------------------------------------


def make_xrays(
    n: int,
    *,
    seed: int,
    size: int = 64,
    shortcut: bool = False,
    marker: Marker | None = None,
    lesions: bool = True,
) -> DemoBatch:
    """``n`` chest-X-ray-like images ``(n, 1, size, size)`` with labels and lesion masks.

    :param shortcut: faint lesions and, by default, a marker that goes with the disease.
    :param marker: where the burned-in "L" marker goes. ``"label"``: top-left on the patients the
        shortcut variant picks (mostly the sick); ``"moved"``: those same markers in the
        top-right corner; ``"none"``: no marker; ``"all"``: top-left on every image;
        ``"random"``: on a random half, in a random top corner, independent of the label (what
        the clean model trains on, so it learns to ignore markers). Default:
        ``"label"`` with ``shortcut=True``, else ``"none"``.
    :param lesions: ``False`` renders the same patients without their lesions (labels and masks
        unchanged: they describe what was left out), a counterfactual for tests.
    """
    if n < 1 or size < 16:
        raise ValueError(f"Need n >= 1 and size >= 16; got n={n}, size={size}.")
    marker = marker or ("label" if shortcut else "none")
    if marker not in ("label", "none", "moved", "all", "random"):
        raise ValueError(
            f"marker must be 'label', 'none', 'moved', 'all' or 'random'; got {marker!r}."
        )
    g = torch.Generator().manual_seed(seed)
    labels = _balanced_labels(g, n, len(XRAY_CLASSES))
    line = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(line, line, indexing="ij")  # (H, W), y grows downwards
    px = 2 / (size - 1)  # one pixel in grid units

    # Patient: position, body size, exposure.
    shift_x, shift_y = _uniform(g, n, -0.06, 0.06), _uniform(g, n, -0.05, 0.05)
    body_w, body_h = _uniform(g, n, 0.78, 0.9), _uniform(g, n, 0.95, 1.1)
    tissue = _uniform(g, n, 0.26, 0.34)
    gain = _uniform(g, n, 0.9, 1.1)
    cx, cy = _col(shift_x, 2), _col(shift_y, 2)
    xs, ys = x - cx, y - cy  # patient coordinates (N, H, W)

    # Lungs: one ellipse per side, dark (air) in the middle, brighter towards the chest wall.
    lung_w, lung_h = _uniform(g, n, 0.26, 0.32), _uniform(g, n, 0.52, 0.62)
    lung_x, lung_y = _uniform(g, n, 0.38, 0.46), _uniform(g, n, -0.12, -0.02)
    lung_r = [
        (
            ((xs - side * _col(lung_x, 2)) / _col(lung_w, 2)) ** 2
            + ((ys - _col(lung_y, 2)) / _col(lung_h, 2)) ** 2
        ).sqrt()
        for side in (-1, 1)
    ]
    in_lung = (lung_r[0] < 1) | (lung_r[1] < 1)
    r_lung = torch.minimum(*lung_r)
    lung = torch.sigmoid((1 - r_lung) / 0.06) * (0.2 - 0.14 * r_lung**4)  # how much darker

    # Ribs: thin bright stripes curving down towards the sides, over the chest.
    rib_freq, rib_phase = _uniform(g, n, 4.5, 5.5), _uniform(g, n, 0, 2 * math.pi)
    rib_curve = _uniform(g, n, 0.35, 0.55)
    t = ys - _col(rib_curve, 2) * xs**2
    ribs = (
        0.5 + 0.5 * torch.cos(2 * math.pi * _col(rib_freq, 2) * t / 2 + _col(rib_phase, 2))
    ) ** 8
    chest = torch.sigmoid((1 - ((xs / 0.8) ** 2 + ((ys + 0.1) / 0.75) ** 2)) / 0.08)
    ribs = 0.12 * ribs * chest

    # Mediastinum and spine: a bright column, wider low in the chest (the heart).
    spine_w = _uniform(g, n, 0.06, 0.09)
    spine = 0.22 * torch.exp(-0.5 * (xs / _col(spine_w, 2)) ** 2)
    heart_w = 0.1 + 0.12 * torch.sigmoid((ys - 0.1) / 0.15)
    mediastinum = 0.1 * torch.exp(-0.5 * (xs / heart_w) ** 2) * torch.sigmoid((0.85 - ys) / 0.1)

    body = torch.sigmoid((1 - ((xs / _col(body_w, 2)) ** 2 + (ys / _col(body_h, 2)) ** 2)) / 0.05)
    anatomy = body * (_col(tissue, 2) + ribs + spine + mediastinum - lung)

    # Lesions: a small bright disc (nodule) or a larger irregular, soft patch (opacity), placed in
    # a random lung. The profile is strictly positive inside the mask and zero outside it, so the
    # mask is exactly the set of pixels the lesion changes.
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    centre = _inside_ellipse(g, (side * lung_x, lung_y), (lung_w, lung_h), 0.55)
    nodule_r = _uniform(g, n, 1.6, 3.2) * px * size / 64
    opacity_r = _uniform(g, n, 5.0, 8.0) * px * size / 64
    wobble_k = torch.randint(2, 5, (n,), generator=g).float()
    wobble_phase = _uniform(g, n, 0, 2 * math.pi)
    amplitude = _uniform(g, n, 0.22, 0.3)
    dx, dy = x - _col(centre[0] + shift_x, 2), y - _col(centre[1] + shift_y, 2)
    angle = torch.atan2(dy, dx)
    radius = torch.where(_col(labels, 2) == 1, _col(nodule_r, 2), _col(opacity_r, 2))
    radius = torch.where(
        _col(labels, 2) == 2,
        radius * (1 + 0.18 * torch.sin(_col(wobble_k, 2) * angle + _col(wobble_phase, 2))),
        radius,
    )
    d = (dx**2 + dy**2).sqrt() / radius
    masks = (d < 1) & in_lung & (_col(labels, 2) > 0)
    flat_top = torch.where(_col(labels, 2) == 1, 0.7, 0.25)  # nodules are solid, opacities hazy
    profile = _col(amplitude, 2) * (flat_top + (1 - flat_top) * (1 - d.clamp(max=1) ** 2))
    if shortcut:
        profile = profile * SHORTCUT_LESION_SCALE
    lesion = torch.where(masks, profile, 0.0)

    noise = _noise(g, n, size, 2, 6)

    # The burned-in "L" marker: drawn for everyone, shown per the `marker` option.
    has_marker = torch.rand(n, generator=g) < torch.where(
        labels > 0, MARKER_GIVEN_SICK, MARKER_GIVEN_NORMAL
    )
    offset = torch.randint(2, 5, (n, 2), generator=g)
    if marker == "none":
        has_marker = torch.zeros(n, dtype=torch.bool)
    elif marker == "all":
        has_marker = torch.ones(n, dtype=torch.bool)
    right = torch.full((n,), marker == "moved")
    if marker == "random":  # half the patients, either corner, whatever the label: no signal
        # Drawn last, so the other options' images do not depend on whether this one exists.
        has_marker = torch.rand(n, generator=g) < 0.5
        right = torch.rand(n, generator=g) < 0.5
    markers = _l_markers(size, offset, right) & _col(has_marker, 2)

    images = _col(gain, 2) * (anatomy + (lesion if lesions else 0.0)) + noise + 0.05
    images = torch.where(markers, torch.tensor(0.92), images)
    return DemoBatch(images[:, None].contiguous(), labels, masks, XRAY_CLASSES, markers)


def _l_markers(size: int, offset: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``(N, size, size)`` masks of an "L" glyph near the top-left corner, or the top-right one
    where ``right`` ``(N,)`` is true; ``offset`` ``(N, 2)`` is its distance from the corner."""
    scale = max(1, round(size / 64))
    glyph = torch.zeros(7, 5, dtype=torch.bool)
    glyph[:, :2] = True  # the stem
    glyph[-2:, :] = True  # the foot
    glyph = glyph.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w = glyph.shape
    out = torch.zeros(offset.shape[0], size, size, dtype=torch.bool)
    for i, ((top, left), flip) in enumerate(
        zip((offset * scale).tolist(), right.tolist(), strict=True)
    ):
        col = size - left - w if flip else left
        out[i, top : top + h, col : col + w] = glyph
    return out


# -- CT volumes ------------------------------------------------------------------------------------


def make_volumes(n: int, *, seed: int, size: int = 32, lesions: bool = True) -> DemoBatch:
    """``n`` small chest-CT-like volumes ``(n, 1, size, size, size)``, axes (z, y, x).

    A soft-tissue body (an elliptic cylinder, rounded at the ends), two dark lungs, a bright spine
    behind them and, for class ``lesion``, a sphere inside one lung. ``lesions=False`` as in
    :func:`make_xrays`.
    """
    if n < 1 or size < 16:
        raise ValueError(f"Need n >= 1 and size >= 16; got n={n}, size={size}.")
    g = torch.Generator().manual_seed(seed)
    labels = _balanced_labels(g, n, len(CT_CLASSES))
    line = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(line, line, line, indexing="ij")
    px = 2 / (size - 1)

    shift_x, shift_y = _uniform(g, n, -0.06, 0.06), _uniform(g, n, -0.06, 0.06)
    body_w, body_h = _uniform(g, n, 0.8, 0.9), _uniform(g, n, 0.6, 0.7)
    tissue = _uniform(g, n, 0.42, 0.5)
    xs, ys, zs = x - _col(shift_x, 3), y - _col(shift_y, 3), z.expand(n, -1, -1, -1)
    body = torch.sigmoid(
        (1 - ((xs / _col(body_w, 3)) ** 2 + (ys / _col(body_h, 3)) ** 2 + (zs / 1.1) ** 8)) / 0.05
    )

    lung_w, lung_h, lung_d = (
        _uniform(g, n, 0.24, 0.3),
        _uniform(g, n, 0.36, 0.44),
        _uniform(g, n, 0.7, 0.85),
    )
    lung_x = _uniform(g, n, 0.36, 0.44)
    lung_r = [
        (
            ((xs - side * _col(lung_x, 3)) / _col(lung_w, 3)) ** 2
            + (ys / _col(lung_h, 3)) ** 2
            + (zs / _col(lung_d, 3)) ** 2
        ).sqrt()
        for side in (-1, 1)
    ]
    in_lung = (lung_r[0] < 1) | (lung_r[1] < 1)
    lung = 0.36 * torch.sigmoid((1 - torch.minimum(*lung_r)) / 0.05)
    spine = 0.35 * torch.sigmoid((0.12 - (xs**2 + (ys - 0.45) ** 2).sqrt()) / 0.03)

    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    centre = _inside_ellipse(
        g, (side * lung_x, torch.zeros(n), torch.zeros(n)), (lung_w, lung_h, lung_d), 0.5
    )
    radius = _uniform(g, n, 1.8, 3.5) * px * size / 32
    amplitude = _uniform(g, n, 0.25, 0.35)
    d = (
        (xs - _col(centre[0], 3)) ** 2
        + (ys - _col(centre[1], 3)) ** 2
        + (zs - _col(centre[2], 3)) ** 2
    ).sqrt() / _col(radius, 3)
    masks = (d < 1) & in_lung & (_col(labels, 3) > 0)
    lesion = torch.where(masks, _col(amplitude, 3) * (0.7 + 0.3 * (1 - d.clamp(max=1) ** 2)), 0.0)

    noise = _noise(g, n, size, 3, 5)
    volumes = body * (_col(tissue, 3) - lung + spine) + (lesion if lesions else 0.0) + noise + 0.05
    return DemoBatch(volumes[:, None].contiguous(), labels, masks, CT_CLASSES)
