"""`xai explain --engine ray`: inputs read and explained on Ray workers, outputs written by the
caller, the same files as the local engine's; resume; a killed worker. On conftest.py's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xai_core.cli.jobs import explain_files, find_job_inputs
from xai_core.demo import data, load_model
from xai_core.io.preprocess import Preprocess

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "100"}
TIMING = ("seconds",)  # the only record fields that may differ between two runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory holding images/: five demo X-rays (64 px) and a corrupt PNG."""
    work = tmp_path_factory.mktemp("work")
    folder = work / "images"
    folder.mkdir()
    for i, image in enumerate(data.make_xrays(5, seed=3, size=64).images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"cxr_{i}.png")
    (folder / "cxr_2b.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")  # mid-run
    return work


def xai(work: Path, *args: str) -> subprocess.CompletedProcess:
    ran = subprocess.run(
        [XAI, "explain", "demo:cnn", "images", "-m", "gradcam", *args],
        cwd=work, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 1, ran.stderr  # 1: the corrupt file failed, the rest finished
    return ran


def files(out: Path) -> dict[str, Path]:
    """The outputs under ``out`` (not the ledger), by path relative to it."""
    return {
        str(p.relative_to(out)): p
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".xai-run" not in p.parts
    }


def assert_same_outputs(local: Path, distributed: Path) -> None:
    mine, theirs = files(local), files(distributed)
    assert mine.keys() == theirs.keys()
    for name, path in mine.items():
        if name.endswith(".npy"):
            assert np.array_equal(np.load(path), np.load(theirs[name])), name
        elif name.endswith(".json") and name != "summary.json":
            a, b = json.loads(path.read_text()), json.loads(theirs[name].read_text())
            assert {k: v for k, v in a.items() if k not in TIMING} == {
                k: v for k, v in b.items() if k not in TIMING
            }, name
        elif name.endswith((".png", "report_gradcam.html")):
            assert path.read_bytes() == theirs[name].read_bytes(), name
    a, b = (json.loads((out / "summary.json").read_text()) for out in (local, distributed))
    assert (a["done"], a["skipped"], a["failed"]) == (b["done"], b["skipped"], b["failed"])


def test_explain_on_ray_writes_the_local_outputs_and_resumes(ray_session, work):
    address = ray_session.address_info["gcs_address"]  # joined with this process's token
    ray = ["--engine", "ray", "--workers", "2", "--address", address]
    xai(work, "--out", "local")
    # The options reach the Ray executor, connected to this cluster (2 CPUs): not run locally.
    too_many = subprocess.run(
        [XAI, "explain", "demo:cnn", "images", "-m", "gradcam", "-o", "x", *ray, "--workers", "3"],
        cwd=work, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert too_many.returncode == 2 and "the Ray cluster has 2 CPUs" in too_many.stderr
    first = xai(work, "--out", "on-ray", *ray)
    assert "5 explained, 0 already done, 1 failed" in first.stderr
    assert_same_outputs(work / "local", work / "on-ray")
    summary = json.loads((work / "on-ray" / "summary.json").read_text())
    assert summary["done"] == [f"cxr_{i}.png" for i in range(5)]  # in input order
    assert list(summary["failed"]) == ["cxr_2b.png"]
    assert not (work / "on-ray" / "cxr_2b.png").exists()  # nothing half written

    maps = work / "on-ray" / "cxr_0.png" / "maps_gradcam.npy"
    written = maps.stat().st_mtime_ns
    again = xai(work, "--out", "on-ray", *ray)  # the same request: every finished input skipped
    assert "0 explained, 5 already done, 1 failed" in again.stderr
    assert maps.stat().st_mtime_ns == written

    retarget = xai(work, "--out", "on-ray", "-t", "1", *ray)  # another request: redone
    assert "5 explained, 0 already done, 1 failed" in retarget.stderr
    result = json.loads((work / "on-ray" / "cxr_0.png" / "result_gradcam.json").read_text())
    assert result["targets"] == [[1]]


def test_a_killed_worker_costs_only_its_inputs(ray_session, work, kill_one_worker, tmp_path):
    # In this process, so that the executor can kill one of its actors mid-run.
    items = find_job_inputs([work / "images"], tmp_path)
    kwargs = dict(method="gradcam", preprocess=Preprocess(size=(64, 64), channels=1))
    model = load_model("cnn")
    local = explain_files(model, items, tmp_path / "local", **kwargs)
    seen = []
    executor = kill_one_worker(workers=2, in_flight=2)
    distributed = explain_files(
        model,
        items,
        tmp_path / "ray",
        engine=executor,
        progress=lambda done, total, what: seen.append((done, total)),
        **kwargs,
    )
    with pytest.raises(ProcessLookupError):  # the worker really died
        os.kill(executor.killed, 0)
    assert distributed.done == local.done and distributed.failed == local.failed
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")
    # Progress: input counts out of all six as the parts came back, never backwards.
    counts = [done for done, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 6 and {t for _, t in seen} == {6}
