"""engine="ray": the same results as the local engine, on a local Ray with 2 CPUs.

One Ray session serves every module of these tests (conftest.py; starting Ray takes seconds);
each run starts its own actor pool. The data are the demo's chest X-rays, a few dozen 64-pixel
images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from xai_ray import RayExecutor
from xai_ray.executor import import_ray

import xai_core
from xai_core.core.errors import ExecutorError, MissingDependencyError, OptionError
from xai_core.core.executors import LocalExecutor, run
from xai_core.demo import data, load_model, onnx_path, preprocess
from xai_core.workflows.audit import _AuditStep, audit
from xai_core.workflows.datasets import DataStream, explain_dataset

XAI = str(Path(sys.executable).with_name("xai"))
ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "100"}  # over os.environ, as it is at the call
AUDIT_MAPS = ("mean", "std", "share", "unexplained", "mean_image")


@pytest.fixture(scope="module")
def xrays():
    batch = data.make_xrays(16, seed=0, size=64)
    return preprocess(batch.images), batch.labels


@pytest.fixture(scope="module")
def model():
    return load_model("cnn")


def test_the_local_ray_is_private_and_quiet(ray_session):
    ray = import_ray()
    assert ray.cluster_resources()["CPU"] == 2  # workers=2
    assert not ray_session.dashboard_url  # no dashboard
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    assert session.is_relative_to(Path(tempfile.gettempdir()) / f"xai-ray-{os.getuid()}")
    assert not list(ray_session.home.iterdir())  # no token saved in ~/.ray, nothing else


def test_audit_on_ray_is_bitwise_the_local_audit_and_reports_corrupt_files(
    ray_session, model, tmp_path
):
    x, _ = data.make_xrays(12, seed=1, size=64).images, None
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(x[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"cxr_{i:02d}.png")
    (folder / "cxr_05b.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")  # mid-run
    kwargs = dict(method="gradcam", batch_size=3, min_images=1, preprocess=None)
    local = audit(model, str(folder), **kwargs)
    seen = []
    distributed = audit(
        model,
        str(folder),
        engine="ray",  # by name: the plugin's executor, defaults
        progress=lambda done, total, _what: seen.append((done, total)),
        **kwargs,
    )
    for name in AUDIT_MAPS:
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    assert local.flags == distributed.flags and local.counts == distributed.counts
    assert distributed.images == 12 and list(distributed.failed) == ["cxr_05b.png"]
    assert distributed.failed == local.failed
    assert [d for d, _ in seen] == [3, 6, 9, 12]  # in batch order, one call per part


def test_explain_dataset_on_ray_is_bitwise_local_with_bounded_in_flight(ray_session, model, xrays):
    x, y = xrays
    local = explain_dataset(model, (x, y), method="aggregate", local="gradcam", batch_size=2)

    pulled = []  # batches the executor took from the stream, and parts back, at each part

    def batches():
        for start in range(0, x.shape[0], 2):
            pulled.append(start)
            yield x[start : start + 2], y[start : start + 2]

    parts = []
    executor = RayExecutor(workers=2, in_flight=1)
    distributed = explain_dataset(
        model,
        batches(),
        method="aggregate",
        local="gradcam",
        engine=executor,
        progress=lambda done, _total, _what: parts.append((done // 2, len(pulled))),
    )
    for name in ("sums", "squares", "counts"):
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    # Backpressure: never more than workers x in_flight batches out beyond those merged.
    assert len(parts) == 8 and all(taken - merged <= 2 for merged, taken in parts), parts


def test_an_onnx_model_on_ray_gives_the_local_audit(ray_session, xrays):
    # The ONNX adapter travels as the model's bytes and reopens its session in each actor.
    x, y = xrays
    kwargs = dict(
        method="occlusion", options={"window": 16, "stride": 16}, batch_size=4, min_images=1
    )
    local = audit(onnx_path(), (x[:8], y[:8]), **kwargs)
    distributed = audit(onnx_path(), (x[:8], y[:8]), engine=RayExecutor(workers=2), **kwargs)
    for name in AUDIT_MAPS:
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    assert local.flags == distributed.flags


class _CountedStep:
    """A step that notes in ``log`` each time a process unpickles it (receives the model)."""

    def __init__(self, step, log: Path):
        self.step, self.log = step, log

    def __call__(self, batch):
        return self.step(batch)

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_a_killed_worker_costs_only_its_batches_and_the_result_is_the_same(
    ray_session, model, xrays, tmp_path, kill_one_worker
):
    import_ray().cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _CountedStep
    x, y = xrays
    registry = xai_core.get_registry()
    step = _AuditStep(
        registry.get_explainer("gradcam"), registry.adapt(model), {}, "label", "auto", None,
        5.0, None,
    )  # fmt: skip
    stream = DataStream((x, y), batch_size=2)
    local = run(LocalExecutor(), step, stream)
    executor = kill_one_worker(workers=2, in_flight=2)
    log = tmp_path / "received"
    distributed = run(executor, _CountedStep(step, log), stream)
    # The model went to each actor once, and once more to the restarted one: not per batch.
    received = log.read_text().split()
    assert len(received) == 3 and received.count(str(executor.killed)) == 1, received
    with pytest.raises(ProcessLookupError):  # the process really died
        os.kill(executor.killed, 0)
    assert distributed.images == local.images == 16
    for name in ("maps", "positive", "hits", "image"):
        assert torch.equal(getattr(local.value, name).sums, getattr(distributed.value, name).sums)


def test_more_workers_than_the_cluster_holds_is_an_error_not_a_hang(ray_session, model, xrays):
    x, y = xrays
    with pytest.raises(OptionError, match="the Ray cluster has 2 CPUs and 0 GPUs"):
        audit(model, (x[:2], y[:2]), engine=RayExecutor(workers=3))
    with pytest.raises(OptionError, match=r"need 1 CPUs and 0\.5 GPUs"):
        audit(model, (x[:2], y[:2]), engine=RayExecutor(workers=1, gpus_per_worker=0.5))


def test_a_worker_that_dies_beyond_its_retries_is_a_typed_error(
    ray_session, model, xrays, kill_one_worker
):
    x, y = xrays
    registry = xai_core.get_registry()
    step = _AuditStep(
        registry.get_explainer("gradcam"), registry.adapt(model), {}, "label", "auto", None,
        5.0, None,
    )  # fmt: skip
    executor = kill_one_worker(workers=2, in_flight=2, max_retries=0)
    with pytest.raises(ExecutorError, match=r"max_retries=0"):
        run(executor, step, DataStream((x, y), batch_size=2))


def test_a_failing_step_raises_its_own_typed_error(ray_session, model, xrays):
    x, _ = xrays
    with pytest.raises(OptionError, match="needs labels") as raised:
        audit(model, x[:4], group_by="label", batch_size=2, engine=RayExecutor(workers=1))
    assert type(raised.value) is OptionError  # the step's own, not Ray's wrapper
    assert str(raised.value).startswith("group_by='label' needs labels")


def test_the_command_line_audits_on_ray_from_another_folder(ray_session, tmp_path):
    images = data.make_xrays(6, seed=2, size=64).images
    work = tmp_path / "work"
    work.mkdir()
    for i, image in enumerate(images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(work / f"x{i}.png")
    args = [XAI, "audit", "demo:cnn", ".", "-m", "gradcam", "--out", "au", "--engine", "ray"]
    # It joins this module's Ray (--address, with the token this process holds in its env).
    address = ray_session.address_info["gcs_address"]
    env = {**os.environ, **ENV}
    ran = subprocess.run(
        [*args, "--workers", "1", "--address", address],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    saved = json.loads((work / "au" / "audit.json").read_text())
    assert saved["images"] == 6
    assert (work / "au" / "audit.json").is_file() and (work / "au" / "report.html").is_file()
    assert not (work / "au" / "au").exists()
    wrong = subprocess.run(
        [XAI, "audit", "demo:cnn", ".", "--out", "au", "--workers", "2"],  # local takes none
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert wrong.returncode != 0 and "--engine local does not take --workers" in wrong.stderr


def test_options_are_checked_before_anything_starts():
    for bad in (dict(workers=0), dict(workers=True), dict(gpus_per_worker=-1.0),
                dict(in_flight=0), dict(address=""), dict(max_retries=-1)):  # fmt: skip
        with pytest.raises(OptionError):
            RayExecutor(**bad)


def test_without_the_engine_nothing_imports_ray():
    code = (
        "import sys, torch\n"
        "import xai_core\n"
        "from xai_core.testing import tiny_cnn\n"
        "x = torch.rand(4, 3, 16, 16); y = torch.tensor([0, 1, 0, 1])\n"
        "xai_core.audit(tiny_cnn(), (x, y), batch_size=2, min_images=1)\n"
        "assert 'ray' in xai_core.get_registry().executor_names()\n"
        "print('ray' in sys.modules)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "False"


def test_without_ray_the_engine_says_what_to_install(monkeypatch, xrays, model):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    x, y = xrays
    with pytest.raises(MissingDependencyError, match=r"pip install 'xai-core\[ray\]'"):
        audit(model, (x[:2], y[:2]), engine="ray")
    with pytest.raises(MissingDependencyError, match=r"ray==2\.60\.0"):
        RayExecutor(workers=2)
