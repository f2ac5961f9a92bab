"""Streams of files on Ray: the workers read them, and a dataset larger than the object store.

The Ray tests share conftest.py's local Ray (2 CPUs, a 96 MiB object store).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import OBJECT_STORE
from PIL import Image
from xai_ray import RayExecutor
from xai_ray.executor import import_ray

from xai_core.core.errors import InputError
from xai_core.demo import data, load_model
from xai_core.io.preprocess import Preprocess
from xai_core.testing import tiny_cnn
from xai_core.workflows import datasets
from xai_core.workflows.audit import audit
from xai_core.workflows.datasets import DataStream, explain_dataset

XAI = str(Path(sys.executable).with_name("xai"))
AUDIT_MAPS = ("mean", "std", "share", "unexplained", "mean_image")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Ten 64-px demo X-rays with two corrupt files among them, a NIfTI volume of four
    slices (four images, one file), and masks for some."""
    root = tmp_path_factory.mktemp("files")
    images, masks = root / "images", root / "masks"
    images.mkdir(), masks.mkdir()
    for i, image in enumerate(data.make_xrays(10, seed=4, size=64).images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"cxr_{i:02d}.png")
        if i % 3 == 0:
            region = np.zeros((64, 64), np.uint8)
            region[10 + i : 30 + i, 20:40] = 255
            Image.fromarray(region).save(masks / f"cxr_{i:02d}.png")
    for name in ("cxr_03b.png", "cxr_07b.png"):  # two batches lose an image
        (images / name).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    volume = np.random.default_rng(0).random((64, 64, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(images / "cxr_05v.nii.gz"))
    return images, masks


SLICES = Preprocess(slice_axis=0)  # a volume as a batch of its slices; images as they are


def test_a_read_plan_makes_the_batches_of_one_pass_whatever_the_chunks(folders):
    images, masks = folders
    kwargs = dict(batch_size=3, masks=str(masks), preprocess=SLICES)
    stream = DataStream(str(images), **kwargs)
    one_pass = list(stream)  # read here, through the plan, one chunk per batch
    plan = DataStream(str(images), **kwargs).read_plan(chunk_size=2)
    read = [chunk() for chunk in plan.chunks]  # as workers would, in any order
    specs = [s for index, (meta, _) in enumerate(read) for s in plan.add(index, meta)]
    batches = [s.build(*(read[c][1] for c in s.chunks)) for s in specs + plan.finish()]
    assert [b.keys for b in batches] == [b.keys for b in one_pass]
    # whole files in each batch: around the corrupt files, and the volume's four slices
    assert [len(b) for b in batches] == [3, 3, 4, 3, 1], [b.keys for b in batches]
    for mine, theirs in zip(batches, one_pass, strict=True):
        assert torch.equal(mine.inputs, theirs.inputs) and torch.equal(mine.masks, theirs.masks)
    assert list(plan.failed) == list(stream.failed) == ["cxr_03b.png", "cxr_07b.png"]
    assert one_pass[0].masks[0].any() and not one_pass[0].masks[1].any()

    odd = images.parent / "odd"
    odd.mkdir()
    Image.new("L", (64, 64)).save(odd / "a.png")
    Image.new("L", (32, 64)).save(odd / "b.png")
    with pytest.raises(InputError, match=r"b\.png is \(1, 64, 32\) after preprocessing"):
        list(DataStream(str(odd), batch_size=4))


def test_the_workers_read_the_files_and_the_audit_is_bitwise_local(
    ray_session, folders, monkeypatch
):
    images, masks = folders
    model = load_model("cnn")
    kwargs = dict(method="gradcam", batch_size=3, min_images=1, masks=str(masks), preprocess=SLICES)
    local = audit(model, str(images), **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a file was read by the driver")

    # Only this process's reader is replaced: the actors import their own.
    monkeypatch.setattr(datasets, "read_item", refuse)
    with pytest.raises(AssertionError, match="read by the driver"):
        list(DataStream(str(images)))
    seen = []
    distributed = audit(
        model,
        str(images),
        engine=RayExecutor(workers=2),
        progress=lambda done, _total, _what: seen.append(done),
        **kwargs,
    )
    for name in AUDIT_MAPS:
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    assert local.flags == distributed.flags and local.settings["masks"]
    assert distributed.failed == local.failed and list(local.failed) == [
        "cxr_03b.png",
        "cxr_07b.png",
    ]
    assert distributed.images == 14 and seen == [3, 6, 10, 13, 14]


class _Counted(list):
    """The chunks of a read plan, counting those the executor has taken to be read."""

    taken = 0

    def __iter__(self):
        for chunk in super().__iter__():
            self.taken += 1
            yield chunk


def test_a_dataset_larger_than_the_object_store_streams_through_it(
    ray_session, tmp_path, monkeypatch
):
    capacity = import_ray().cluster_resources()["object_store_memory"]
    assert capacity <= OBJECT_STORE
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    count = 160  # 3 x 256 x 256 float32 each once decoded: 126 MB in all
    for i in range(count):
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im_{i:03d}.png", compress_level=0)
    assert count * 3 * 256 * 256 * 4 > capacity
    model = tiny_cnn()
    kwargs = dict(method="aggregate", local="gradcam", batch_size=4, preprocess=Preprocess())
    local = explain_dataset(model, str(folder), **kwargs)

    plans = []
    read_plan = DataStream.read_plan

    def counted(self, chunk_size=None):
        plan = read_plan(self, chunk_size)
        plan.chunks = _Counted(plan.chunks)
        plans.append(plan)
        return plan

    monkeypatch.setattr(DataStream, "read_plan", counted)
    out = []  # (batches merged, chunks taken to be read) as each part comes back
    distributed = explain_dataset(
        model,
        str(folder),
        engine=RayExecutor(workers=2, in_flight=2),
        progress=lambda done, *_: out.append((done // 4, plans[0].chunks.taken)),
        **kwargs,
    )
    for name in ("sums", "squares", "counts"):
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    assert int(distributed.counts.sum()) == count and len(out) == count // 4
    # Bounded: 2 workers x 2 in flight chunks being read ahead, as many batches out, so at most
    # 8 batches of 3 MB are decoded at any time, a quarter of the store, of 40 in the dataset.
    assert max(taken - merged for merged, taken in out) <= 8, out


def test_the_command_line_reports_throughput_from_ray(ray_session, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(data.make_xrays(12, seed=6, size=32).images[:, 0]):
        pixels = (image * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"x{i:02d}.png")
    address = ray_session.address_info["gcs_address"]  # joins this module's Ray
    ran = subprocess.run(
        [XAI, "audit", "demo:cnn", "images", "-m", "gradcam", "--batch-size", "2", "--out", "au",
         "--engine", "ray", "--workers", "1", "--address", address],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("audit (gradcam): ")]
    assert [line.split(" ")[2] for line in lines] == [f"{n}/12" for n in range(2, 13, 2)]
    assert all("images/s, " in line for line in lines[1:]), lines  # a rate once two are back
    assert all(" left" in line for line in lines[:-1]) and "\x1b" not in ran.stderr


def test_a_worker_killed_while_reading_files_changes_nothing(
    ray_session, folders, kill_one_worker
):
    images, masks = folders
    model = load_model("cnn")
    kwargs = dict(
        method="gradcam", batch_size=3, min_images=1, masks=str(masks), preprocess=SLICES
    )
    local = audit(model, str(images), **kwargs)
    executor = kill_one_worker(workers=2, in_flight=2)
    distributed = audit(model, str(images), engine=executor, **kwargs)
    with pytest.raises(ProcessLookupError):  # the process really died, mid-run
        os.kill(executor.killed, 0)
    for name in AUDIT_MAPS:
        assert torch.equal(getattr(local, name), getattr(distributed, name)), name
    assert distributed.failed == local.failed and distributed.images == local.images == 14
