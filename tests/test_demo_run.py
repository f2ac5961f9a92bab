"""`xai demo`, the README's main job, runs end to end and its report renders in Chromium."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from xai_core.cli.app import build_app

from .browser import check_report


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(build_app(), ["demo", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_writes_every_study_and_a_summary(demo):
    out, output = demo
    for name in ("report.html", "summary.md", "study1.json", "study5.json", "study6.json"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    for method in ("cam", "gradcam", "occlusion", "rollout", "grad_rollout", "attention"):
        assert f"| {method} |" in summary
    assert "xai demo (" in output and "report:" in output  # the printed summary table
    assert "pointing_game" in summary and "X-ray ViT" in summary and "CT 3D CNN" in summary
    # each study opens with its verdict, and the report opens with all of them
    assert summary.count("### Verdict") == 6 and "Best" in summary
    report = (out / "report.html").read_text()
    assert report.index("<h2>Verdicts</h2>") < report.index("<h2>Comparison</h2>")


def test_demo_exposes_the_shortcut_model(demo):
    import json

    out, _ = demo
    shortcut = json.loads((out / "study5.json").read_text())
    clean = json.loads((out / "study6.json").read_text())

    def energy(result, method):
        rows = [r for r in result["results"] if r["method"] == method]
        return next(r["mean"] for r in rows if r["metric"] == "energy_pointing_game")

    for method in ("gradcam", "occlusion"):
        on_marker, control = energy(shortcut, method), energy(clean, method)
        assert not math.isnan(on_marker) and on_marker > 2 * control, method


def test_demo_report_renders_in_chromium(demo, tmp_path):
    out, _ = demo
    page = check_report(out / "report.html", tmp_path / "demo.png")
    assert page.console_errors == []
    assert page.images > 50 and page.broken_images == 0
    assert page.slider_changed is True  # the CT study has slice sliders
    # Every map has a labelled colour bar, every input its decision, the curves are drawn.
    assert page.decoded["cbar-img"] == len(page.colour_bar_labels) > 50
    assert any("occlusion: drop of the target score, signed" in t for t in page.colour_bar_labels)
    assert any(t.startswith("gradcam, min-max per map") for t in page.colour_bar_labels)
    assert all("predicted:" in f and "target:" in f and "truth:" in f for f in page.facts)
    assert len(page.facts) == 6 + 6 + 6 + 4 + 6 + 6
    assert page.decoded["curve"] == 4 * 2  # deletion and insertion of the first four studies
    # The verdicts are visible text, above the first picture: the overview and one per study.
    assert page.verdict_first is True and len(page.verdicts) == 1 + 6
    assert page.verdicts[0].startswith("Verdicts") and all("Best" in v for v in page.verdicts[:5])
    assert all("mean rank" in v for v in page.verdicts[1:])


def test_demo_writes_overlay_files(demo):
    from PIL import Image

    out, _ = demo
    files = sorted((out / "overlays").glob("*.png"))
    names = {f.name for f in files}
    assert {"study1_sample0_occlusion.png", "study4_sample0_gradcam.png"} <= names
    assert len(files) > 50
    with Image.open(out / "overlays" / "study1_sample0_gradcam.png") as image:
        assert image.width >= 320 and image.height > image.width  # text, overlay, colour bar
