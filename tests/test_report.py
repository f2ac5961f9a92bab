"""Overlays, tables and the self-contained HTML report, checked in a real headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import numpy as np
import pytest
import torch

import xai_core
from xai_core.core.metrics import Direction, MetricResult
from xai_core.report import (
    HtmlReport,
    comparison_csv,
    comparison_json,
    comparison_markdown,
    overlay,
)
from xai_core.report.overlay import (
    decision_facts,
    fact_lines,
    figure_png,
    on_display_grid,
    scale_map,
)
from xai_core.workflows.compare import compare

from .browser import check_report


class Coverage:
    """Share of the map above a threshold (a test metric); NaN for sample 0 to test n/a."""

    name = "coverage"
    direction = Direction.HIGHER
    needs = frozenset()

    def compute(self, context, *, threshold: float = 0.5):
        values = (context.explanation.normalized() > threshold).flatten(1).float().mean(1)
        values[0] = float("nan")
        return MetricResult(values)


class Broken:
    name = "broken"
    direction = Direction.LOWER
    needs = frozenset()

    def compute(self, context):
        raise RuntimeError("<b>metric|bug</b>")


@pytest.fixture
def comparison(fresh_registry, cnn, images):
    class Plugin:
        @xai_core.hookimpl
        def register_metrics(self, register):
            register(Coverage)
            register(Broken)

    fresh_registry.register_plugin(Plugin(), "report-metrics")
    x = torch.cat([images, images.flip(-1)])
    return compare(
        cnn, x, methods=["gradcam", "cam"], metric_options={"coverage": {"threshold": 0.25}}
    )


def test_overlay_keeps_cold_regions_and_colours_hot_ones():
    gray = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[4:] == 100).all()  # no heat: the anatomy shows through unchanged
    assert not (out[:4] == 100).all()
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    assert overlay(rgb, np.zeros((8, 8))).tolist() == rgb.tolist()


def test_tables_rank_with_direction_and_escape(comparison):
    md = comparison_markdown(comparison)
    assert "### coverage (↑ higher is better)" in md
    assert "### broken (↓ lower is better)" in md
    assert "error: RuntimeError: <b>metric\\|bug</b>" in md  # a pipe cannot break the table
    rows = list(csv.DictReader(io.StringIO(comparison_csv(comparison))))
    assert {r["method"] for r in rows} == {"gradcam", "cam"}
    assert len([r for r in rows if r["metric"] == "coverage"]) == 2 * 4
    assert any(r["value"] == "" for r in rows)  # undefined values stay empty, not 'nan'
    data = json.loads(comparison_json(comparison))  # strict JSON: no NaN literals
    assert data["metrics"]["coverage"]["better"] == "higher"
    assert data["per_sample"]["gradcam/coverage"][0] is None


def test_html_report_is_self_contained_escaped_and_renders(tmp_path, comparison):
    report = HtmlReport(title="<script>alert(1)</script> report")
    image = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    report.add_input("chest <1>.png", image, {"gradcam": np.eye(64), "cam": np.zeros((64, 64))})
    volume = np.random.default_rng(0).random((6, 32, 32))
    signed = np.random.default_rng(1).normal(size=(6, 16, 16))  # on a coarser model grid
    facts = decision_facts(np.array([0.2, 1.5, -0.3]), 1, ("a", "b", "c"), truth=0)
    report.add_input(
        "ct.nii.gz", volume, {"occlusion": signed}, facts=facts,
        masks={"lesion": np.zeros((6, 32, 32))},
    )
    report.add_comparison(comparison)
    path = report.write(tmp_path / "report.html")
    text = path.read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text
    assert "&lt;b&gt;metric|bug&lt;/b&gt;" in text
    assert not re.search(r"(src|href)=\"(https?:|//)", text)  # nothing fetched from anywhere

    page = check_report(path, tmp_path / "report.png")
    assert page.console_errors == []
    assert page.broken_images == 0
    # 2 inputs + 3 overlays + a mask; each map (not the mask) with its colour bar; deletion and
    # insertion curves as plots
    assert page.decoded == {"overlay": 2 + 3 + 1, "cbar-img": 3, "curve": 2}
    assert page.colour_bar_labels[0].startswith("gradcam, min-max per map: 0 … 1")
    assert page.colour_bar_labels[2].startswith("occlusion: drop of the target score, signed")
    peak = f"{np.abs(signed).max():.3g}"
    assert page.colour_bar_ticks[0].split() == ["0", "0.5", "1"]
    assert page.colour_bar_ticks[2].split() == [f"−{peak}", "0", f"+{peak}"]
    assert len(page.facts) == 1 and page.facts[0].startswith("predicted: b (softmax")
    assert "target: b (score 1.5)" in page.facts[0] and "MISCLASSIFIED" in page.facts[0]
    assert page.slider_changed is True
    assert page.screenshot.stat().st_size > 10_000


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_signed_maps_are_diverging_symmetric_and_leave_zero_untinted():
    gray = np.full((8, 8), 100, np.uint8)
    raw = np.zeros((8, 8), np.float32)
    raw[:2] = 0.6  # evidence for the class: red
    raw[2:4] = -0.3  # against it: blue
    heat, scale = scale_map(raw, "occlusion")
    assert scale.signed and (scale.low, scale.high) == pytest.approx((-0.6, 0.6))
    assert heat.min() == pytest.approx(-0.5) and heat.max() == pytest.approx(1.0)
    assert "signed, symmetric around 0: −0.6 … +0.6" in scale.label("occlusion")
    assert scale.label("occlusion").startswith("occlusion: drop of the target score")
    out = overlay(gray, heat, signed=True)
    assert (out[4:] == 100).all()  # zero (the air around a CT body): the image, untinted
    red, blue = out[0, 0].astype(int), out[2, 0].astype(int)
    assert red[0] > red[2] + 30 and blue[2] > blue[0] + 20  # RdBu_r: + red, − blue
    # Any negative value makes a map signed; a non-negative one is min-max scaled.
    assert scale_map(np.array([[-1.0, 2.0]]))[1].signed
    plain, unsigned = scale_map(np.array([[1.0, 3.0]]), "gradcam")
    assert not unsigned.signed and plain.tolist() == [[0.0, 1.0]]
    assert unsigned.label("gradcam") == "gradcam, min-max per map: 0 … 1 (raw 1 … 3)"


def test_png_figure_has_a_colour_bar_and_the_decision():
    image = np.full((16, 32), 90, np.uint8)
    raw = np.zeros((16, 32), np.float32)
    raw[4:8, 4:12] = 2.0
    heat, scale = scale_map(raw, "occlusion")
    facts = decision_facts(np.array([2.0, 0.0]), 1, ("normal", "pneumonia"), truth=1)
    assert facts == {
        "predicted": "normal (softmax 0.88)",
        "target": "pneumonia (score 0)",
        "verdict": "MISCLASSIFIED",
        "truth": "pneumonia",
    }
    assert fact_lines(facts)[-1] == "truth: pneumonia  (MISCLASSIFIED)"
    png = _png(figure_png(image, heat, scale, method="occlusion", lines=fact_lines(facts)))
    # Enlarged by whole pixels (32 -> 320 wide), with text above and the bar below.
    assert png.shape[0] > 160 + 60 and png.shape[1] >= 320
    below = png[-40:]  # the colour bar and its ticks
    assert len(np.unique(below.reshape(-1, 3), axis=0)) > 50  # a ramp of colours, not blank
    above = png[:40]  # three lines of text
    assert (above < 100).any()


def test_maps_are_shown_at_the_inputs_aspect(tmp_path):
    """A 2:1 radiograph explained at a square --size is shown 2:1, in the PNG and the HTML."""
    from PIL import Image

    from xai_core.cli.jobs import explain_files
    from xai_core.io.inputs import find_inputs
    from xai_core.io.preprocess import Preprocess
    from xai_core.testing import tiny_cnn

    wide = (np.random.default_rng(0).random((24, 48)) * 255).astype(np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    display, heat = on_display_grid(wide, np.ones((16, 16), np.float32), 2)
    assert display.shape == (24, 48) and heat.shape == (24, 48)
    big = on_display_grid(np.zeros((2, 1024, 512), np.uint8), np.zeros((2, 8, 8)), 3)
    assert big[0].shape == big[1].shape == (2, 256, 128)  # a volume's slices: capped, aspect kept
    out = tmp_path / "out"
    pre = Preprocess(size=(16, 16), channels=3)
    summary = explain_files(
        tiny_cnn(), find_inputs([tmp_path / "wide.png"]), out, method="cam", preprocess=pre,
        class_names=["normal", "effusion", "nodule"],
    )
    assert summary.done == ["wide.png"]
    record = json.loads((out / "wide.png" / "result_cam.json").read_text())
    assert set(record["decision"]) == {"predicted", "target"}
    assert record["colour_scale"]["label"].startswith("cam, ")
    fragment = (out / "wide.png" / "report_cam.html").read_text()
    sizes = [_png(base64.b64decode(uri)).shape[:2] for uri in re.findall(
        r'class="overlay"[^>]*src="data:image/png;base64,([^"]+)"', fragment)]
    assert sizes == [(24, 48), (24, 48)]  # the input and its overlay, both 2:1
    assert 'class="fact fact-predicted"' in fragment and "cbar-label" in fragment
    figure = _png((out / "wide.png" / "overlay_cam.png").read_bytes())
    # The overlay in the figure is the input enlarged 7x (48 -> 336 wide, 24 -> 168 high): the
    # rows that are not page-white across its columns are its rows.
    painted = (figure[:, 8 : 8 + 336] != 255).any(axis=2).mean(axis=1) > 0.95
    assert painted.sum() == 168


def test_compare_report_shows_masks_decisions_and_curves_at_the_inputs_aspect(tmp_path):
    from PIL import Image

    from xai_core.cli.jobs import compare_files
    from xai_core.io.inputs import find_inputs
    from xai_core.io.preprocess import Preprocess
    from xai_core.testing import tiny_cnn

    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray((rng.random((20, 40)) * 255).astype(np.uint8)).save(
            tmp_path / "in" / f"{name}.png"
        )
        mask = np.zeros((20, 40), np.uint8)
        mask[5:10, 10:20] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    summary = compare_files(
        tiny_cnn(), find_inputs([tmp_path / "in"]), tmp_path / "out",
        preprocess=Preprocess(size=(16, 16), channels=3), methods=["occlusion"],
        metrics=["deletion"], masks=tmp_path / "masks", class_names=["n", "e", "d"],
        options={"occlusion": {"window": 4, "stride": 4}},
        metric_options={"deletion": {"steps": 4}},
    )
    text = summary.report.read_text()
    assert text.count('class="fact fact-predicted"') == 2
    assert text.count('alt="mask (mask)"') == 2 and text.count('class="cbar-label"') == 2
    assert "occlusion: drop of the target score, signed" in text
    curves = re.findall(r'class="curve"[^>]*src="data:image/png;base64,([^"]+)"', text)
    assert len(curves) == 1 and min(_png(base64.b64decode(curves[0])).shape[:2]) > 100
    overlays = re.findall(r'class="overlay"[^>]*src="data:image/png;base64,([^"]+)"', text)
    assert {_png(base64.b64decode(uri)).shape[:2] for uri in overlays} == {(20, 40)}


def test_decision_of_a_single_output_model_and_of_a_segmentation_model():
    assert decision_facts(np.array([0.0]), 0, ("nodule",)) == {
        "predicted": "nodule (sigmoid 0.50)",
        "target": "nodule (score 0)",
    }
    assert decision_facts(np.zeros((2, 4, 4)), 1, ("bg", "liver")) == {"target": "liver"}
