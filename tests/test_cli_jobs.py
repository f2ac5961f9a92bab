"""The installed `xai` command run as users run it: a subprocess in another working directory,
relative paths, no TTY. Resume keys, whole-run errors, clean messages, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .files import write_png

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
ENV.pop("XAI_CORE_DEBUG", None)


def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [XAI, *args],
        cwd=cwd,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def cwd(tmp_path) -> Path:
    """A working directory with two small images, and the test run from elsewhere."""
    folder = tmp_path / "work"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        write_png(folder / name, seed=i, size=32)
    return folder


def test_relative_paths_resume_keys_and_methods_sharing_a_folder(cwd):
    # The README's form: relative inputs ("." holds the default output folder, xai-out, too).
    first = run(cwd, "explain", "demo:cnn", ".", "--method", "gradcam")
    assert first.returncode == 0, first.stderr
    out = cwd / "xai-out"
    assert summary_of(out)["done"] == ["a.png", "b.png"]
    assert not (out / "xai-out").exists() and (out / "report.html").is_file()

    # Identical rerun: nothing redone, and the output folder's own PNGs are not inputs.
    again = run(cwd, "explain", "demo:cnn", ".", "-m", "gradcam", "-o", "xai-out")
    assert again.returncode == 0, again.stderr
    summary = summary_of(out)
    assert summary["skipped"] == ["a.png", "b.png"] and summary["done"] == []
    assert "0 explained, 2 already done" in again.stderr

    # Another target is another request: redone, never mixed with the old results.
    retarget = run(cwd, "explain", "demo:cnn", "a.png", "b.png", "-m", "gradcam", "-t", "1")
    assert retarget.returncode == 0, retarget.stderr
    summary = summary_of(out)
    assert summary["done"] == ["a.png", "b.png"] and summary["skipped"] == []
    result = json.loads((out / "a.png" / "result_gradcam.json").read_text())
    assert result["targets"] == [[1]]

    # Another model is another request too (the file-content digest: test_cli_jobs_unit.py).
    remodel = run(cwd, "explain", "demo:cnn_shortcut", ".", "-m", "gradcam", "-t", "1")
    assert remodel.returncode == 0, remodel.stderr
    assert summary_of(out)["done"] == ["a.png", "b.png"]

    # A second method into the same folder: the report and summary show both methods.
    cam = run(cwd, "explain", "demo:cnn_shortcut", ".", "-m", "cam", "-t", "1")
    assert cam.returncode == 0, cam.stderr
    summary = summary_of(out)
    assert summary["methods"] == ["cam", "gradcam"]
    assert sorted((r["input"], r["method"]) for r in summary["results"]) == [
        ("a.png", "cam"),
        ("a.png", "gradcam"),
        ("b.png", "cam"),
        ("b.png", "gradcam"),
    ]
    assert all(r["targets"] == [[1]] for r in summary["results"])
    html = (out / "report.html").read_text()
    assert "cam; target" in html and "gradcam; target" in html


def test_whole_run_mistakes_are_one_clean_message_and_exit_code_2(cwd):
    typo = run(cwd, "explain", "demo:cnn", ".", "-m", "gradcm", "-o", "out")
    assert typo.returncode == 2
    lines = typo.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "gradcam" in lines[0]  # the suggestion
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert "Traceback" not in typo.stderr + typo.stdout
    assert not (cwd / "out").exists()  # no empty report

    device = run(cwd, "explain", "demo:cnn", "a.png", "-m", "cam", "--device", "cuda:7")
    assert device.returncode == 2 and "Traceback" not in device.stderr
    assert device.stderr.startswith("error: ") and "--device cpu" in device.stderr

    (cwd / "bad.pt").write_bytes(b"not a model")
    model = run(cwd, "explain", "bad.pt", "a.png", "-m", "cam", "--arch", "resnet18", "-o", "out")
    assert model.returncode == 2 and model.stderr.startswith("error: ") and "bad.pt" in model.stderr
    assert "Traceback" not in model.stderr and not (cwd / "out").exists()


def test_unsafe_file_names_are_printed_escaped(cwd):
    (cwd / "x[").mkdir()  # the path x[/red]... : rich markup, an escape sequence, a bell
    (cwd / "x[" / "red]\x1b[2J\x07.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = run(cwd, "explain", "demo:cnn", ".", "-m", "cam", "-o", "out")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "[/red]" in result.stderr and "\\x1b" in result.stderr  # shown, not interpreted
    summary = summary_of(cwd / "out")
    assert summary["done"] == ["a.png", "b.png"] and len(summary["failed"]) == 1


def test_compare_and_audit_with_relative_paths(cwd):
    compare = run(
        cwd, "compare", "demo:cnn", ".", "--methods", "cam,gradcam", "--metrics", "cost", "-o", "c"
    )
    assert compare.returncode == 0, compare.stderr
    assert (cwd / "c" / "report.html").is_file() and not (cwd / "c" / "c").exists()
    assert summary_of(cwd / "c")["done"] == ["a.png", "b.png"]
    audit = run(cwd, "audit", "demo:cnn", "a.png", "b.png", "-m", "cam", "--out", "au")
    assert audit.returncode == 0, audit.stderr
    assert (cwd / "au" / "report.html").is_file() and (cwd / "au" / "audit.json").is_file()


def test_ctrl_c_exits_130_cleanly_and_the_rerun_resumes(cwd):
    for i in range(2, 8):
        write_png(cwd / f"img_{i}.png", seed=i, size=32)
    args = [XAI, "explain", "demo:cnn", ".", "-m", "occlusion", "-O", "window=8", "-O"]
    args += ["stride=2", "-o", "out"]
    proc = subprocess.Popen(
        args, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    ledger = cwd / "out" / ".xai-run"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ledger.glob("*.done.json")):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    start = time.time()
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - start < 10, "Ctrl-C must stop the run promptly"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    finished = sorted(p.name.split("--")[0] for p in ledger.glob("*.done.json"))
    assert 1 <= len(finished) < 8
    for key in finished:
        assert np.load(cwd / "out" / key / "maps_occlusion.npy").shape == (1, 64, 64)
    assert not [p for p in (cwd / "out").rglob("*") if p.name.endswith(".xai-tmp")]

    rerun = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = summary_of(cwd / "out")
    assert summary["skipped"] == finished and len(summary["done"]) == 8 - len(finished)
