"""Throughput and time left in progress reports: the one place they are computed and formatted
(xai_core/core/progress.py), and the plain lines `xai` prints when stderr is a pipe."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from xai_core.core.progress import LineProgress, Throughput, status_line
from xai_core.demo import data

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_leaves_out_the_start_up_and_follows_a_change_of_pace():
    clock = Clock()
    meter = Throughput(window=10, clock=clock)
    clock.now += 20  # start-up (a Ray pool, say): no image done yet
    meter.update(32)
    assert meter.rate is None
    assert meter.left(32, 320) == (320 - 32) / (32 / 20)  # the average since the start
    for _ in range(4):
        clock.now += 2
        meter.update(meter.points[-1][1] + 32)  # 16 images/s
    assert meter.rate == 16 and meter.left(160, 320) == 10
    for _ in range(10):  # slower: 4 images/s; the window forgets the fast part
        clock.now += 2
        meter.update(meter.points[-1][1] + 8)
    assert meter.rate == 4
    meter.update(0)  # counted from 0 again: a new phase, a new rate
    assert meter.rate is None


def test_the_line_says_counts_rate_elapsed_and_time_left():
    clock = Clock()
    meter = Throughput(clock=clock)
    clock.now += 4
    meter.update(40)
    clock.now += 2
    meter.update(120)
    line = status_line("audit (gradcam)", 120, 2000, "gradcam: images", meter, "images")
    assert line == (
        "audit (gradcam): 120/2000 (6%) gradcam: images; 40 images/s, 6 s elapsed, "
        "about 47 s left"
    )
    unknown = status_line("explain", 3, None, "a.png", meter, "inputs")
    assert unknown == "explain: 3/? a.png; 40 inputs/s, 6 s elapsed"


def test_line_progress_prints_every_tenth_of_the_work():
    out = io.StringIO()
    report = LineProgress("audit", interval=3600, file=out)
    for done in range(0, 101, 5):
        report(done, 100, "images")
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == [f"{d}/100" for d in range(0, 101, 10)]


def test_the_audit_command_prints_throughput_and_eta_lines_to_a_pipe(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(data.make_xrays(20, seed=5, size=32).images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"x{i:02d}.png")
    ran = subprocess.run(
        [XAI, "audit", "demo:cnn", "images", "-m", "gradcam", "--batch-size", "2", "--out", "au"],
        cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("audit (gradcam): ")]
    # one line per tenth of the work (2 images each), plain text, counts going up
    pattern = re.compile(
        r"audit \(gradcam\): (\d+)/20 \(\d+%\) gradcam: images; "
        r"(?:[\d.e+]+ images/s, )?\d+ s elapsed(?:, about \d+ s left)?"
    )
    assert all(pattern.fullmatch(line) for line in lines), lines
    counts = [int(pattern.fullmatch(line)[1]) for line in lines]
    assert counts == list(range(2, 21, 2)), counts
    assert sum("images/s" in line for line in lines) >= 8  # a rate from the second batch on
    assert sum(" left" in line for line in lines) == 9  # all but the last
    assert "\x1b" not in ran.stderr


def test_the_explain_command_reports_inputs_per_second(tmp_path):
    for i, image in enumerate(data.make_xrays(4, seed=6, size=32).images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"x{i}.png")
    ran = subprocess.run(
        [XAI, "explain", "demo:cnn", ".", "-m", "gradcam", "--out", "out"],
        cwd=tmp_path, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("gradcam: ")]
    assert re.fullmatch(r"gradcam: 0/4 \(0%\) x0\.png; \d+ s elapsed", lines[0]), lines
    assert any(re.search(r" 4/4 \(100%\) .*; [\d.e+]+ inputs/s, ", line) for line in lines), lines
    assert "\x1b" not in ran.stderr
