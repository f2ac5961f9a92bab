"""Progress, cost and CLI-native messages: the installed `xai` run as users run it (a
subprocess in another working directory, no TTY), and the core's progress protocol."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import xai_core
from xai_core.report import HtmlReport
from xai_core.report.tables import comparison_markdown

from .files import write_nifti, write_png

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
ENV.pop("XAI_CORE_DEBUG", None)
ESC = "\x1b"


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [XAI, *args], cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=300,
    )


@pytest.fixture
def cwd(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        write_png(folder / name, seed=i, size=32)
    return folder


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_explain_progress_lines_on_stderr_without_escapes_and_plain_class_names(cwd):
    done = run(cwd, "explain", "demo:cnn", "a.png", "-m", "occlusion", "-O", "chunk_size=8")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("occlusion: ")]
    assert lines[0].startswith("occlusion: 0/1 (0%) a.png")
    # occlusion's own chunks move the count between inputs, every 10 %, with an ETA
    inner = [line for line in lines if "perturbed inputs" in line]
    assert len(inner) >= 5 and any("left" in line for line in inner)
    assert ESC not in done.stderr and ESC not in done.stdout
    html = (cwd / "xai-out" / "a.png" / "report_occlusion.html").read_text()
    assert "target: " in html and "target: [" not in html  # a name, not a Python list


def test_occlusion_reports_each_chunk_through_the_protocol():
    calls = []
    x = torch.rand(2, 3, 12, 12)
    got = xai_core.explain(
        small_cnn(), x, method="occlusion", window=4, stride=4, chunk_size=5,
        incremental=False, progress=lambda done, total, what: calls.append((done, total, what)),
    )
    total = got.details["evaluations"]
    assert total == 2 * 9
    assert len(calls) == math.ceil(total / 5)  # one call per chunk of perturbed inputs
    assert calls[-1] == (total, total, "perturbed inputs")
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def counted(model: nn.Module) -> list[int]:
    """Images forwarded by ``model`` and by any deep copy of it (the hook is shared)."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen


def test_budget_makes_compare_cheaper_and_lists_the_economies():
    x = torch.rand(2, 3, 32, 32)
    kwargs = dict(methods=["occlusion"], metrics=["randomization", "deletion"])
    model = small_cnn()
    seen = counted(model)
    notes: list[str] = []
    full = xai_core.compare(model, x, notice=notes.append, **kwargs)
    full_images = sum(seen)
    seen.clear()
    cheap = xai_core.compare(model, x, budget=0.0, **kwargs)
    assert sum(seen) < full_images / 2
    assert full.economies == [] and notes[0].startswith("estimate: about ")
    assert "occlusion.window=8,8" in cheap.economies
    assert "deletion.steps=20" in cheap.economies
    assert cheap.to_dict()["economies"] == cheap.economies
    assert cheap.estimate["forward_images"] < full.estimate["forward_images"]
    # the report and the Markdown say which settings were made coarser; without economies, nothing
    report = HtmlReport(title="t")
    report.add_comparison(cheap)
    for text in (comparison_markdown(cheap), report.render()):
        assert "Made cheaper to fit the time budget" in text and "deletion.steps=20" in text
    assert "Made cheaper" not in comparison_markdown(full)
    # what the caller set is never changed
    mine = xai_core.compare(
        model, x, budget=0.0, options={"occlusion": {"window": 16}}, **kwargs
    )
    assert not any(e.startswith("occlusion.") for e in mine.economies)


def test_compare_prints_its_estimate_before_the_work(cwd):
    done = run(
        cwd, "compare", "demo:cnn", "a.png", "b.png", "--methods", "gradcam",
        "--metrics", "deletion", "--metric-option", "deletion.steps=4",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    first_estimate = next(i for i, line in enumerate(lines) if line.startswith("estimate: "))
    first_work = next(i for i, line in enumerate(lines) if line.startswith("compare: "))
    assert first_estimate < first_work
    assert "forward passes" in lines[first_estimate]
    assert any(line.startswith("compare: 2/2 (100%)") for line in lines)
    result = json.loads((cwd / "xai-compare" / "comparison.json").read_text())
    assert result["economies"] == [] and result["estimate"]["forward_images"] > 0
    assert ESC not in done.stderr


def test_cli_hints_name_flags(tmp_path):
    model = tmp_path / "fixed.onnx"
    torch.onnx.export(
        small_cnn(), (torch.randn(1, 3, 16, 16),), str(model), dynamo=False,
        input_names=["x"], dynamic_axes={"x": {0: "n"}},
    )
    write_png(tmp_path / "grey.png", seed=0, size=32)
    grey = run(tmp_path, "explain", str(model), "grey.png", "-m", "occlusion", "-o", "o1")
    assert "hint: pass --channels 3" in grey.stderr, grey.stderr
    assert "expand(" not in grey.stderr

    big = run(
        tmp_path, "explain", str(model), "grey.png", "--channels", "3", "-m", "occlusion",
        "-o", "o2",
    )
    assert "hint: pass --size 16,16" in big.stderr, big.stderr
    assert "Resize the inputs" not in big.stderr

    write_nifti(tmp_path / "vol.nii.gz", shape=(4, 16, 16))
    volume = run(tmp_path, "explain", "demo:cnn", "vol.nii.gz", "-m", "gradcam", "-o", "o3")
    assert volume.returncode == 1
    assert "--slice-axis" in volume.stderr, volume.stderr


def test_progress_is_not_a_cli_option(cwd):
    done = run(cwd, "explain", "demo:cnn", "a.png", "-m", "occlusion", "-O", "progress=true")
    assert done.returncode == 2
    assert "progress is drawn by xai itself" in done.stderr


def test_plugins_listing_off_a_terminal_keeps_one_line_per_plugin(tmp_path):
    listed = run(tmp_path, "plugins")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(run(tmp_path, "plugins", "--json").stdout)
    lines = listed.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["name", "kind", "scope"]
    assert [line.split("\t")[0] for line in lines[1:]] == [row["name"] for row in rows]
    assert all(len(line.split("\t")) == 8 for line in lines)
    assert ESC not in listed.stdout


def test_python_callers_keep_python_advice():
    from xai_core.core.errors import ChannelMismatchError, InputError

    with pytest.raises(ChannelMismatchError) as caught:
        xai_core.explain(small_cnn(), torch.rand(1, 1, 8, 8), method="gradcam")
    assert isinstance(caught.value, InputError)  # callers catching InputError still do
    assert "inputs.expand(-1, 3, ...)" in str(caught.value)
    assert "expand" not in caught.value.facts and caught.value.details["expected"] == 3
