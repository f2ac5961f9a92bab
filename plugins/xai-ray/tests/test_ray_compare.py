"""compare(engine="ray"): the batches explained and scored on Ray actors, merged in batch order
into the table the local engine computes (the local Ray of conftest.py, 2 CPUs).

Timing (the ``cost`` metric and ``costs``) is measured where each batch ran and differs from run
to run: it is left out of the equality checks, and only checked to be there.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from PIL import Image
from xai_ray import RayExecutor

import xai_core
from xai_core.cli.app import main
from xai_core.core.errors import MissingDependencyError
from xai_core.demo import data, load_model, preprocess

TIMED = "cost"  # the metric that measures time
KWARGS = dict(
    methods=["gradcam", "saliency"],
    metrics=["deletion", "pointing_game", "randomization", "sparseness", TIMED],
    metric_options={"deletion": {"steps": 8}, "randomization": {"stages": 2}},
)


@pytest.fixture(scope="module")
def study():
    batch = data.make_xrays(8, seed=3, size=64)
    x, model = preprocess(batch.images), load_model("cnn")
    local = xai_core.compare(model, x, masks=batch.masks, batch_size=3, **KWARGS)
    return model, x, batch.masks, local


def _same_values(a, b, *, skip=(TIMED,)):
    assert a.values.keys() == b.values.keys()
    for key, value in a.values.items():
        if key[1] not in skip:  # bitwise, NaN where NaN
            torch.testing.assert_close(value, b.values[key], rtol=0, atol=0, equal_nan=True)


def _same_table(a, b):
    untimed = [r for r in a.rows() if r["metric"] != TIMED]
    other = [r for r in b.rows() if r["metric"] != TIMED]
    assert len(untimed) == len(other) > 0
    for row, twin in zip(untimed, other, strict=True):
        for field, value in row.items():
            if isinstance(value, float) and not math.isnan(value):
                assert value == pytest.approx(twin[field], abs=1e-6), (row, field)
            elif isinstance(value, float):
                assert math.isnan(twin[field]), (row, field)
            else:
                assert value == twin[field], (row, field)


def _verdict(result):
    """The verdict without the speed it shows (seconds per image)."""
    verdict = result.verdict().to_dict()
    for method in verdict["methods"]:
        assert method.pop("seconds_per_image") > 0
    return verdict


def test_compare_on_ray_is_the_local_comparison(ray_session, study):
    model, x, masks, local = study
    seen = []
    ray = xai_core.compare(
        model,
        x,
        masks=masks,
        batch_size=3,
        engine=RayExecutor(workers=2, in_flight=1),
        progress=lambda done, total, what: seen.append((done, total)),
        **KWARGS,
    )
    assert ray.methods == local.methods == ["gradcam", "saliency"]
    assert not ray.errors and not ray.skipped_methods
    _same_values(ray, local)
    _same_table(ray, local)
    for metric in local.metrics:
        assert ray.pair_tests(metric) == local.pair_tests(metric)
    assert _verdict(ray) == _verdict(local)
    assert torch.equal(ray.targets, local.targets)
    for method, exp in local.explanations.items():  # the maps of every batch, in order
        assert torch.equal(ray.explanations[method].maps, exp.maps), method
        assert torch.equal(ray.explanations[method].scores, exp.scores), method
    curves = ray.details[("gradcam", "deletion")]["curves"]
    assert curves.shape == (8, 9)
    assert torch.equal(curves, local.details[("gradcam", "deletion")]["curves"])
    # Timing is per worker: the seconds spent explaining, summed over the batches.
    for method in ray.methods:
        assert ray.costs[method].seconds > 0
        assert ray.costs[method].seconds_per_image == ray.costs[method].seconds / 8
        assert ray.values[(method, TIMED)].isfinite().all()
    # Progress comes from the driver, one call per merged batch (the steps on the workers
    # report nothing back).
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_compare_on_ray_from_the_command_line_is_the_local_table(
    ray_session, tmp_path, monkeypatch, capsys
):
    images = data.make_xrays(5, seed=4, size=64).images
    work = tmp_path / "work"
    work.mkdir()
    for i, image in enumerate(images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(work / f"x{i}.png")
    monkeypatch.chdir(work)  # relative inputs and --out, from the data's folder
    common = ["compare", "demo:cnn", ".", "--methods", "gradcam,saliency",
              "--metrics", "deletion,sparseness,cost", "--metric-option", "deletion.steps=4",
              "--budget", "0", "--batch-size", "2"]  # fmt: skip
    runs = {}
    # In this process, on the Ray of conftest.py (--workers 1: one actor to start).
    for name, extra in (("local", []), ("ray", ["--engine", "ray", "--workers", "1"])):
        with pytest.raises(SystemExit) as exited:
            main([*common, "--out", name, *extra])
        assert exited.value.code == 0, capsys.readouterr().err
        runs[name] = json.loads((work / name / "comparison.json").read_text())
        assert (work / name / "report.html").is_file()
    assert not (work / "ray" / "ray").exists()  # the relative --out, once

    def untimed(saved):  # everything but what measures time
        saved = {k: v for k, v in saved.items() if k not in ("costs", "estimate")}
        saved["results"] = [r for r in saved["results"] if r["metric"] != TIMED]
        saved["per_sample"] = {k: v for k, v in saved["per_sample"].items() if TIMED not in k}
        for method in saved["verdict"]["methods"]:
            assert method.pop("seconds_per_image") > 0
        return saved

    local, ray = untimed(runs["local"]), untimed(runs["ray"])
    assert len(local["per_sample"]["gradcam/deletion"]) == 5
    # Ray's workers run torch with one thread (Ray sets OMP_NUM_THREADS=1), this process maybe
    # with more: reductions add in another order, so floats agree to rounding, not bitwise.
    assert_same(ray, local)


def assert_same(a, b, path="") -> None:
    """``a == b``, floats within 1e-6 (relative) of each other."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) or (a != a and b != b), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_without_ray_compare_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    x = preprocess(data.make_xrays(2, seed=0, size=64).images)
    with pytest.raises(MissingDependencyError, match=r"pip install 'xai-core\[ray\]'"):
        xai_core.compare(load_model("cnn"), x, methods=["gradcam"], metrics=["sparseness"],
                         engine="ray", batch_size=1)  # fmt: skip
    image = tmp_path / "x.png"
    Image.fromarray((x[0, 0] * 255).clamp(0, 255).to(torch.uint8).numpy()).save(image)
    with pytest.raises(SystemExit) as exited:
        main(["compare", "demo:cnn", str(image), "--out", str(tmp_path / "o"), "--engine", "ray",
              "--workers", "1"])  # fmt: skip
    assert exited.value.code != 0
    assert "pip install 'xai-core[ray]'" in capsys.readouterr().err


def test_an_audit_stopped_here_resumes_on_ray_to_the_same_result(ray_session, tmp_path):
    # The saved sum does not depend on the engine: stopped on the local engine after 2 of 4
    # batches, resumed on Ray (only the last two batches go to the actors), the result is the
    # uninterrupted local audit, bitwise.
    demo = data.make_xrays(8, seed=6, size=64)
    xrays, model = (preprocess(demo.images), demo.labels), load_model("cnn")
    kwargs = dict(method="gradcam", batch_size=2, min_images=1)
    local = xai_core.audit(model, xrays, **kwargs)

    def stop(done, _total, _what):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        xai_core.audit(model, xrays, resume=tmp_path, progress=stop, **kwargs)
    resumed = xai_core.audit(
        model, xrays, resume=tmp_path, engine=RayExecutor(workers=1), **kwargs
    )
    assert resumed.resumed == 4 and resumed.images == 8
    for name in ("mean", "std", "share", "unexplained", "mean_image"):
        assert torch.equal(getattr(resumed, name), getattr(local, name)), name
    assert resumed.flags == local.flags
