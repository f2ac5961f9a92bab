"""audit(resume=DIR) and `xai audit --out DIR`: a rerun skips the finished batches and gives the
audit of an uninterrupted run, bitwise; a changed option or input redoes the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from xai_core import audit
from xai_core.cli.app import main
from xai_core.core.errors import OptionError
from xai_core.demo import data, load_model, preprocess
from xai_core.io.outputs import TEMP_SUFFIX
from xai_core.workflows.audit import RESUME_KEY

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "100"}
MAPS = ("mean", "std", "share", "unexplained", "mean_image")
KWARGS = dict(method="gradcam", batch_size=2, min_images=1)
# Slow enough (about 0.2 s a batch) to be stopped mid-run, fast enough for CI.
SLOW = ["-m", "occlusion", "-O", "window=8", "-O", "stride=4", "--batch-size", "1"]


@pytest.fixture(scope="module")
def model():
    return load_model("cnn")


@pytest.fixture(scope="module")
def xrays():
    batch = data.make_xrays(12, seed=3, size=64)
    return preprocess(batch.images), batch.labels


@pytest.fixture(scope="module")
def uninterrupted(model, xrays):
    return audit(model, xrays, **KWARGS)


def _same(a, b):
    for name in MAPS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.flags == b.flags and a.counts == b.counts and a.images == b.images


def _stop_after(images):
    def progress(done, _total, _what):
        if done >= images:
            raise KeyboardInterrupt

    return progress


def test_an_interrupted_audit_resumes_to_the_same_result(model, xrays, uninterrupted, tmp_path):
    with pytest.raises(KeyboardInterrupt):  # saved when stopped, whatever checkpoint_every
        audit(model, xrays, resume=tmp_path, checkpoint_every=1e6, progress=_stop_after(6),
              **KWARGS)  # fmt: skip
    seen = []
    resumed = audit(model, xrays, resume=tmp_path, progress=lambda *a: seen.append(a), **KWARGS)
    assert resumed.resumed == 6 and seen[0] == (6, 12, "gradcam: images (done before)")
    assert [done for done, _, _ in seen[1:]] == [8, 10, 12]  # only the batches after them
    _same(resumed, uninterrupted)
    again = audit(model, xrays, resume=tmp_path, **KWARGS)
    assert again.resumed == 12 and again.to_dict()["resumed"] == 12
    _same(again, uninterrupted)
    # Only the sum the ledger names is kept, and no temporary file.
    record = json.loads((tmp_path / ".xai-run" / f"{RESUME_KEY}.done.json").read_text())
    kept = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("audit-sums-*")]
    assert kept == list(record["outputs"]) and len(kept) == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_what_changes_the_sums_redoes_them_and_what_does_not_reuses_them(
    model, xrays, uninterrupted, tmp_path
):
    audit(model, xrays, resume=tmp_path, **KWARGS)
    # Thresholds applied after the sums: every batch reused, flags recomputed.
    stricter = audit(model, xrays, resume=tmp_path, min_share=0.5, **KWARGS)
    assert stricter.resumed == 12
    _same(stricter, audit(model, xrays, min_share=0.5, **KWARGS))
    # An option of the sums: everything redone.
    lift = audit(model, xrays, resume=tmp_path, min_lift=4.0, **KWARGS)
    assert lift.resumed == 0
    _same(lift, audit(model, xrays, min_lift=4.0, **KWARGS))
    # Other pixels in the first batch: the saved sum is not these data's.
    x, y = xrays
    changed = x.clone()
    changed[0] += 0.01
    redone = audit(model, (changed, y), resume=tmp_path, min_lift=4.0, **KWARGS)
    assert redone.resumed == 0
    _same(redone, audit(model, (changed, y), min_lift=4.0, **KWARGS))
    # Another model (the same architecture, other weights).
    other = load_model("cnn")
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    assert audit(other, (changed, y), resume=tmp_path, min_lift=4.0, **KWARGS).resumed == 0


def test_a_damaged_saved_sum_is_redone_not_trusted(model, xrays, uninterrupted, tmp_path):
    audit(model, xrays, resume=tmp_path, **KWARGS)
    (saved,) = (tmp_path / ".xai-run").glob("audit-sums-*.pt")
    saved.write_bytes(saved.read_bytes()[:100])  # truncated by something else than us
    result = audit(model, xrays, resume=tmp_path, **KWARGS)
    assert result.resumed == 0
    _same(result, uninterrupted)
    (saved,) = (tmp_path / ".xai-run").glob("audit-sums-*.pt")
    size = saved.stat().st_size
    saved.write_bytes(b"\0" * size)  # the size the ledger recorded, and garbage
    result = audit(model, xrays, resume=tmp_path, **KWARGS)
    assert result.resumed == 0
    _same(result, uninterrupted)


def test_resume_needs_data_it_can_read_again(model, xrays, tmp_path):
    x, y = xrays
    once = iter([(x[:2], y[:2]), (x[2:4], y[2:4])])
    with pytest.raises(OptionError, match="one-shot iterator"):
        audit(model, once, resume=tmp_path, **KWARGS)
    with pytest.raises(OptionError, match="checkpoint_every"):
        audit(model, xrays, resume=tmp_path, checkpoint_every=-1, **KWARGS)


# -- the command line: killed runs --------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    images = data.make_xrays(16, seed=5, size=64).images
    (root / "imgs").mkdir()
    for i, image in enumerate(images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "imgs" / f"x{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def reference(folder):
    out = folder / "reference"
    with pytest.raises(SystemExit) as exited:
        main(["audit", "demo:cnn", str(folder / "imgs"), "--out", str(out), *SLOW])
    assert exited.value.code == 0
    return _untimed(out)


def _untimed(out: Path) -> dict:
    saved = json.loads((out / "audit.json").read_text())
    assert saved["images"] == 16
    return {k: v for k, v in saved.items() if k not in ("seconds", "resumed")}


def _saved_batches(out: Path) -> int:
    try:
        record = json.loads((out / ".xai-run" / f"{RESUME_KEY}.done.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(record["record"]["batches"])


def _start_and_stop(folder: Path, out: str, sig: int, after: int) -> subprocess.Popen:
    """`xai audit` in a subprocess, sent ``sig`` once ``after`` batches are saved."""
    run = subprocess.Popen(
        [XAI, "audit", "demo:cnn", "imgs", "--out", out, "--checkpoint-every", "0", *SLOW],
        cwd=folder, env={**os.environ, **ENV},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while _saved_batches(folder / out) < after and run.poll() is None:
        assert time.monotonic() < deadline, "no batch was saved"
        time.sleep(0.02)
    run.send_signal(sig)
    run.wait(timeout=120)
    return run


def test_a_command_interrupted_then_killed_resumes_to_the_same_audit(
    folder, reference, monkeypatch
):
    # The installed `xai`, from the data's parent folder with relative paths: Ctrl-C (SIGINT)
    # saves what was merged and exits with 130, then a second run resumes and is SIGKILLed.
    run = _start_and_stop(folder, "au", signal.SIGINT, after=2)
    assert run.returncode == 130, run.stderr.read()
    assert not (folder / "au" / "audit.json").exists()  # nothing half written
    first = _saved_batches(folder / "au")
    assert 2 <= first < 16
    run = _start_and_stop(folder, "au", signal.SIGKILL, after=first + 2)
    assert run.returncode == -signal.SIGKILL, run.stderr.read()
    assert not (folder / "au" / "audit.json").exists()
    second = _saved_batches(folder / "au")
    assert first + 2 <= second < 16
    # The rerun: from another working directory, the same folder through another relative path.
    monkeypatch.chdir(folder / "imgs")
    with pytest.raises(SystemExit) as exited:
        main(["audit", "demo:cnn", ".", "--out", "../au", *SLOW])
    assert exited.value.code == 0
    assert json.loads((folder / "au" / "audit.json").read_text())["resumed"] == second
    assert _untimed(folder / "au") == reference
    assert not [p for p in (folder / "au").rglob("*") if p.name.endswith(TEMP_SUFFIX)]
