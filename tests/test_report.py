"""Overlays, tables and the self-contained HTML report, checked in a real headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
import torch

import xai_core
from xai_core.comparison import compare
from xai_core.metrics import Direction, MetricResult
from xai_core.report import (
    HtmlReport,
    comparison_csv,
    comparison_json,
    comparison_markdown,
    overlay,
)

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
    report.add_input(
        "ct.nii.gz", volume, {"occlusion": np.random.default_rng(1).random((6, 32, 32))}
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
    # 2 inputs + 3 overlays, each overlay with its colour bar; deletion and insertion curves
    assert page.decoded == {"overlay": 2 + 3, "cbar-img": 3, "curve": 2}
    assert page.slider_changed is True
    assert page.screenshot.stat().st_size > 10_000
