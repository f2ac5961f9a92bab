"""The extension hooks: model loaders, input readers and executors added by a plugin.

xai-extension-demo (tests/data) is a real distribution, pip-installed into a folder like the other
test plugins; it adds ``toy:NAME`` models, ``.npyimg`` inputs and a ``chunked-threads`` executor
without touching xai_core/.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import xai_core
from xai_core.core.errors import (
    InputFileError,
    InputTooLargeError,
    ModelError,
    OptionError,
    UnknownMethodError,
)
from xai_core.core.executors import Partial
from xai_core.core.registry import PluginWarning, Registry
from xai_core.io import find_inputs, read_item
from xai_core.io.models import load_model
from xai_core.testing import tiny_cnn
from xai_core.workflows.audit import _AuditStep, audit
from xai_core.workflows.datasets import Batch, explain_dataset

from .conftest import build_copy, pip

XAI = str(Path(sys.executable).with_name("xai"))


@pytest.fixture(scope="session")
def demo_site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("extension")
    site = tmp / "site"
    pip(
        "install", "--no-deps", "--no-build-isolation", "--target", str(site),
        str(build_copy("xai-extension-demo", tmp)),
    )  # fmt: skip
    return site


@pytest.fixture
def demo(demo_site, site_registry) -> Registry:
    return site_registry(demo_site)


def save_npyimg(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the name
        np.save(f, array)
    return path


@pytest.fixture
def npy_folder(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        save_npyimg(folder / f"img{i}.npyimg", rng.random((40, 40), dtype=np.float32))
    (folder / "notes.txt").write_text("not an input")
    return folder


# -- load_model ------------------------------------------------------------------------------


def test_a_plugin_loads_its_own_specs_and_never_existing_files(demo, tmp_path, cnn):
    model, info = load_model("toy:tiny")
    assert isinstance(model, torch.nn.Module)
    assert info["kind"] == "extension_demo" and info["loader"] == "xai-extension-demo"
    assert info["class_names"] == ["toy0", "toy1", "toy2"]
    with pytest.raises(ModelError, match="Unknown toy model 'huge'"):  # it recognised the spec
        load_model("toy:huge")
    with pytest.raises(ModelError, match="No installed plugin loads nope: specs"):
        load_model("nope:thing")
    rows = {(r["name"], r["kind"], r["plugin"]) for r in demo.plugin_rows() if r["status"] == "ok"}
    added = {("extension_demo", "loader"), ("npyimg", "reader"), ("chunked-threads", "executor")}
    assert {(name, kind, "xai-extension-demo") for name, kind in added} <= rows  # xai plugins
    assert not {r for r in rows if r[2] == "xai-core"}  # the core's own are not plugin rows
    # A file that exists is the core's, even when named like a plugin's spec.
    path = tmp_path / "toy:tiny"
    torch.jit.save(torch.jit.script(cnn), str(path))
    model, info = load_model(str(path))
    assert info["kind"] == "torchscript"


class _Raising:
    """An in-process plugin whose loader and reader raise, and that tries to go first."""

    @xai_core.hookimpl(tryfirst=True)
    def load_model(self, spec, options):
        raise RuntimeError("loader exploded")

    @xai_core.hookimpl(tryfirst=True)
    def register_readers(self, register):
        class Greedy:  # asked only for files the core's readers do not claim
            name = "greedy"
            claims = staticmethod(lambda path: path.suffix in (".png", ".txt"))
            read = staticmethod(lambda path, options: None)

        class Bad:
            name = "bad"

            @staticmethod
            def claims(path):
                raise RuntimeError("claims exploded")

            @staticmethod
            def read(path, options):
                raise AssertionError("never read")

        class Impostor:  # a built-in reader's name cannot be taken over
            name = "image"
            claims = staticmethod(lambda path: True)
            read = staticmethod(lambda path, options: None)

        register(Greedy)
        register(Bad)
        register(Impostor)


def test_raising_loaders_and_readers_are_failures_and_built_ins_still_work(
    demo, tmp_path, cnn, npy_folder
):
    demo.register_plugin(_Raising(), "raising", distribution="xai-raising", version="1")
    with pytest.warns(PluginWarning):
        _, info = load_model("toy:tiny")  # the raising loader is skipped
        assert info["loader"] == "xai-extension-demo"
        torch.jit.save(torch.jit.script(cnn), str(tmp_path / "net.pt"))
        assert load_model(str(tmp_path / "net.pt"))[1]["kind"] == "torchscript"
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.uint8)).save(npy_folder / "plain.png")
        items = find_inputs([npy_folder])
    kinds = sorted(str(i.kind) for i in items)
    assert kinds == ["greedy", "image", "npyimg", "npyimg", "npyimg"]  # greedy: notes.txt
    failures = {(f.plugin, f.stage): f.error for f in demo.failures}
    assert failures[("raising", "load_model")] == "RuntimeError: loader exploded"
    assert failures[("raising", "claims")] == "RuntimeError: claims exploded"
    assert "the reader 'image' is provided by the built-in" in failures[("raising", "register")]
    rows = {r["name"]: r for r in demo.plugin_rows() if r["status"] == "error"}
    assert rows["raising"]["plugin"] == "xai-raising"


# -- readers ---------------------------------------------------------------------------------


def test_plugin_reader_finds_and_reads_its_files(demo, npy_folder):
    items = find_inputs([npy_folder])
    assert [i.key for i in items] == ["img0.npyimg", "img1.npyimg", "img2.npyimg"]
    loaded = read_item(items[0])
    assert loaded.array.shape == (1, 40, 40) and loaded.array.dtype == np.float32
    assert loaded.meta["kind"] == "npyimg" and loaded.meta["key"] == "img0.npyimg"
    expected = np.load(npy_folder / "img0.npyimg")
    np.testing.assert_array_equal(loaded.array[0], expected)


def test_plugin_readers_keep_the_size_limit_and_refuse_bad_files(demo, tmp_path):
    big = save_npyimg(tmp_path / "big.npyimg", np.zeros((3, 64, 64), np.float32))
    with pytest.raises(InputTooLargeError, match="input limit"):
        read_item(find_inputs([big])[0], max_input_bytes=1000)
    assert read_item(find_inputs([big])[0]).array.shape == (3, 64, 64)
    objects = save_npyimg(tmp_path / "objects.npyimg", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputFileError, match="numbers only"):
        read_item(find_inputs([objects])[0])
    junk = tmp_path / "junk.npyimg"
    junk.write_bytes(b"garbage")
    with pytest.raises(InputFileError, match=r"not a \.npy array"):
        read_item(find_inputs([junk])[0])
    (tmp_path / "nothing.xyz").touch()
    with pytest.raises(InputFileError, match="nor a kind an installed reader plugin reads"):
        find_inputs([tmp_path / "nothing.xyz"])


def test_xai_explain_runs_a_plugin_model_on_plugin_inputs(demo_site, npy_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(demo_site), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "out"
    done = subprocess.run(
        [XAI, "explain", "toy:tiny", str(npy_folder), "--method", "gradcam", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for i in range(3):
        maps = np.load(out / f"img{i}.npyimg" / "maps_gradcam.npy")
        assert maps.shape[-2:] == (32, 32) and np.isfinite(maps).all()
    summary = json.loads((out / "summary.json").read_text())
    assert not summary.get("failed")


# -- executors -------------------------------------------------------------------------------


def _dataset(n: int = 10):
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 16, 16, generator=generator)
    y = torch.arange(n) % 2
    return x, y


def test_audit_with_a_plugin_executor_equals_the_local_engine(demo):
    x, y = _dataset()
    model = tiny_cnn()
    kwargs = dict(method="gradcam", batch_size=3, min_images=1)
    local = audit(model, (x, y), **kwargs)
    seen = []
    threaded = audit(
        model,
        (x, y),
        engine="chunked-threads",
        progress=lambda done, total, _what: seen.append((done, total)),
        **kwargs,
    )
    assert seen == [(3, 10), (6, 10), (9, 10), (10, 10)]
    for name in ("mean", "std", "share", "unexplained", "mean_image"):
        assert torch.equal(getattr(local, name), getattr(threaded, name)), name  # bitwise
    assert local.flags == threaded.flags and local.counts == threaded.counts
    assert local.images == threaded.images == 10


def test_explain_dataset_with_a_plugin_executor_equals_the_local_engine(demo):
    x, y = _dataset()
    model = tiny_cnn()
    local = explain_dataset(model, (x, y), method="aggregate", local="gradcam", batch_size=4)
    threaded = explain_dataset(
        model, (x, y), method="aggregate", local="gradcam", batch_size=4, engine="chunked-threads"
    )
    assert torch.equal(local.sums, threaded.sums) and torch.equal(local.counts, threaded.counts)


class _Reversed:
    """An executor given as an object: steps in reverse order (sums agree up to rounding)."""

    name = "reversed"

    def map(self, step, batches):
        return (step(b) for b in reversed(list(batches)))

    def reduce(self, parts):
        parts = list(parts)
        return sum(parts[1:], parts[0]) if parts else None


def test_any_order_of_parts_gives_the_same_audit_within_rounding(fresh_registry):
    x, y = _dataset()
    model = tiny_cnn()
    local = audit(model, (x, y), method="gradcam", batch_size=3, min_images=1)
    other = audit(model, (x, y), method="gradcam", batch_size=3, min_images=1, engine=_Reversed())
    for name in ("mean", "std", "share"):
        torch.testing.assert_close(getattr(local, name), getattr(other, name), atol=1e-6, rtol=0)
    assert local.counts == other.counts


def test_audit_partial_sums_add_up_to_the_whole(fresh_registry):
    x, y = _dataset(8)
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    adapter = fresh_registry.adapt(tiny_cnn())
    step = _AuditStep(
        fresh_registry.get_explainer("gradcam"), adapter, {}, "label", "auto", None, 5.0, None
    )
    whole = step(Batch(x, y, masks))
    a, b = step(Batch(x[:5], y[:5], masks[:5])), step(Batch(x[5:], y[5:], masks[5:]))
    merged = a + b
    assert merged.images == whole.images == 8
    assert merged.value.without == whole.value.without
    for field in ("maps", "positive", "hits", "image", "off", "off_hits"):
        m, w = getattr(merged.value, field), getattr(whole.value, field)
        torch.testing.assert_close(m.sums, w.sums, atol=1e-9, rtol=1e-9)
        assert torch.equal(m.counts, w.counts)
    assert torch.equal(merged.value.masked, whole.value.masked)
    # The step pickles (a worker process runs a copy) and gives the same part.
    copy = pickle.loads(pickle.dumps(step))(Batch(x[:5], y[:5], masks[:5]))
    assert torch.equal(copy.value.positive.sums, a.value.positive.sums)
    before = a.value.maps.sums.clone()
    a += b  # what the local engine's reduce does: in place, the same sums as a + b
    assert a.images == 8 and a.value.without == merged.value.without
    assert torch.equal(a.value.maps.sums, merged.value.maps.sums)
    assert torch.equal(a.value.off_hits.sums, merged.value.off_hits.sums)
    assert not torch.equal(before, a.value.maps.sums)
    no_masks = step(Batch(x[:2], y[:2]))
    with pytest.raises(xai_core.core.errors.InputError, match="Masks were given for some batches"):
        _ = b + no_masks
    with pytest.raises(xai_core.core.errors.InputError, match="Masks were given for some batches"):
        b += no_masks


def test_unknown_and_malformed_engines_are_typed_errors(fresh_registry):
    x, y = _dataset(4)
    with pytest.raises(UnknownMethodError, match=r"executor 'rya'.*local"):
        audit(tiny_cnn(), (x, y), engine="rya")
    with pytest.raises(OptionError, match="engine must be"):
        audit(tiny_cnn(), (x, y), engine=42)
    assert fresh_registry.executor_names() == ["local", "ray"]  # the core's and xai-ray's

    class Local:  # the core's engine name cannot be taken over
        name = "local"
        map = reduce = staticmethod(lambda *args: None)

    class Plugin:
        @xai_core.hookimpl
        def register_executors(self, register):
            register(Local)

    fresh_registry.register_plugin(Plugin(), "takeover", distribution="takeover", version="1")
    with pytest.warns(PluginWarning):
        engine = fresh_registry.get_executor("local")
    assert type(engine).__module__ == "xai_core.core.executors"
    (failure,) = [f for f in fresh_registry.failures if f.plugin == "takeover"]
    assert "provided by the built-in xai-core" in failure.error


def test_partials_merge_with_plus():
    merged = Partial(torch.ones(2), 3) + Partial(torch.full((2,), 2.0), 4)
    assert merged.images == 7 and torch.equal(merged.value, torch.full((2,), 3.0))


# -- pickling: adapters and the registry, for executors in other processes ---------------------


def test_onnx_adapter_pickles_and_gives_the_same_outputs(tmp_path):
    import onnxruntime as ort

    from xai_core.onnx.adapter import OnnxAdapter

    model, x = tiny_cnn(), torch.rand(2, 3, 16, 16)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, x, buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    path = tmp_path / "net.onnx"
    path.write_bytes(buffer.getvalue())
    cpu = ["CPUExecutionProvider"]
    for source in (buffer.getvalue(), str(path), ort.InferenceSession(str(path), providers=cpu)):
        adapter = OnnxAdapter(source, providers=cpu)
        copy = pickle.loads(pickle.dumps(adapter))
        assert copy.session_ is not adapter.session_ and copy.provider == "CPUExecutionProvider"
        assert torch.equal(copy.forward(x), adapter.forward(x))


def test_torch_adapter_pickles(cnn, images):
    from xai_core.torch.adapter import TorchAdapter

    adapter = TorchAdapter(cnn)
    copy = pickle.loads(pickle.dumps(adapter))
    with torch.no_grad():
        assert torch.equal(copy.module(images), cnn(images))


def test_registry_is_rebuilt_from_its_snapshot(demo, monkeypatch):
    demo.register_plugin(_Raising(), "raising")
    snapshot = demo.snapshot()
    assert "extension_demo" in snapshot.plugins and snapshot.not_rebuilt == ("raising",)
    # The snapshot's lists replace the environment's in the process that rebuilds it.
    monkeypatch.setenv("XAI_CORE_BLOCK_PLUGINS", "extension_demo")
    rebuilt = pickle.loads(pickle.dumps(demo))
    assert isinstance(rebuilt, Registry) and rebuilt is not demo
    assert "chunked-threads" in rebuilt.executor_names()
    assert [name for name, _, _ in rebuilt.readers()] == ["nifti", "image", "dicom", "npyimg"]
    assert {i.name for i in rebuilt.list_explainers()} == {i.name for i in demo.list_explainers()}
    assert not {f.plugin for f in rebuilt.failures} & {"raising"}
