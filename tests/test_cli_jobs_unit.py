"""Batch jobs in process: any failure of one input is recorded and the batch goes on; a
whole-run mistake stops it once; devices are checked; resume keys follow the request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import xai_core.cli.jobs as jobs
from xai_core.core.errors import DeviceError, OptionError, TargetError, UnknownMethodError
from xai_core.io.inputs import find_inputs
from xai_core.io.preprocess import Preprocess
from xai_core.testing import tiny_cnn

from .files import write_png

PRE = Preprocess(size=(16, 16), channels=3)


@pytest.fixture
def inputs(tmp_path) -> list:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_png(folder / name, seed=ord(name[0]), size=24)
    return find_inputs([folder])


@pytest.mark.parametrize("error", [TypeError("bad"), AttributeError("no attr"), KeyError("k")])
def test_any_exception_of_one_input_is_recorded_and_the_batch_goes_on(
    inputs, tmp_path, monkeypatch, error
):
    read = jobs.read_item

    def flaky(item, **kwargs):
        if item.key == "b.png":
            raise error
        return read(item, **kwargs)

    monkeypatch.setattr(jobs, "read_item", flaky)
    out = tmp_path / "out"
    summary = jobs.explain_files(tiny_cnn(), inputs, out, method="cam", preprocess=PRE)
    assert summary.done == ["a.png", "c.png"] and summary.exit_code == 1
    assert summary.failed["b.png"].startswith(type(error).__name__)
    written = json.loads((out / "summary.json").read_text())
    assert written["failed"] == summary.failed and (out / "report.html").is_file()
    assert "b.png: failed" in (out / "report.html").read_text()


def test_keyboard_interrupt_is_never_swallowed(inputs, tmp_path, monkeypatch):
    def interrupted(item, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "read_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jobs.explain_files(tiny_cnn(), inputs, tmp_path / "out", method="cam", preprocess=PRE)


def test_whole_run_mistakes_stop_once_without_writing(inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnknownMethodError):
        jobs.explain_files(tiny_cnn(), inputs, out, method="gradcm", preprocess=PRE)
    assert not out.exists()
    with pytest.raises(TargetError):  # class 9 of a 4-class model: the same for every input
        jobs.explain_files(tiny_cnn(), inputs, out, method="cam", preprocess=PRE, targets=9)
    assert not (out / "report.html").exists()


def test_a_changed_request_redoes_and_a_failed_redo_leaves_no_old_result(inputs, tmp_path):
    out = tmp_path / "out"
    first = jobs.explain_files(tiny_cnn(), inputs[:1], out, method="cam", preprocess=PRE)
    assert first.done == ["a.png"]
    same = jobs.explain_files(tiny_cnn(), inputs[:1], out, method="cam", preprocess=PRE)
    assert same.skipped == ["a.png"]
    other = jobs.explain_files(tiny_cnn(seed=1), inputs[:1], out, method="cam", preprocess=PRE)
    assert other.done == ["a.png"]  # other weights, same architecture
    bigger = Preprocess(size=(24, 24), channels=3)
    assert jobs.explain_files(
        tiny_cnn(seed=1), inputs[:1], out, method="cam", preprocess=bigger
    ).done == ["a.png"]
    (inputs[0].paths[0]).write_bytes(b"broken now")
    failed = jobs.explain_files(tiny_cnn(), inputs[:1], out, method="cam", preprocess=PRE)
    assert list(failed.failed) == ["a.png"]
    assert not (out / "a.png" / "maps_cam.npy").exists()  # the other request's result is gone
    assert json.loads((out / "summary.json").read_text())["results"] == []


def test_output_folder_inside_the_inputs_is_not_an_input(inputs, tmp_path):
    folder = inputs[0].paths[0].parent
    out = folder / "xai-out"
    jobs.explain_files(tiny_cnn(), inputs, out, method="cam", preprocess=PRE)
    assert [i.key for i in jobs.find_job_inputs([folder], out)] == ["a.png", "b.png", "c.png"]
    assert len(find_inputs([folder])) > 3  # the overlays would have been found


def test_model_identity_of_demo_models_and_files(tmp_path):
    assert jobs.model_identity({"kind": "demo", "name": "cnn"}) != jobs.model_identity(
        {"kind": "demo", "name": "cnn_shortcut"}
    )
    path = tmp_path / "w.pt"
    path.write_bytes(b"one")
    first = jobs.model_identity({"kind": "torchvision", "path": str(path), "arch": "resnet18"})
    path.write_bytes(b"two")
    assert first != jobs.model_identity(
        {"kind": "torchvision", "path": str(path), "arch": "resnet18"}
    )


def test_pick_device():
    assert jobs.pick_device("cpu") == torch.device("cpu")
    assert jobs.pick_device(None).type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="cpu, cuda"):
        jobs.pick_device("gpu0")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceError, match="--device cpu"):
        jobs.pick_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
            jobs.pick_device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            jobs.pick_device("mps")


def test_compare_records_any_failure_of_one_input(inputs, tmp_path, monkeypatch):
    read = jobs.read_item

    def flaky(item, **kwargs):
        if item.key == "a.png":
            raise AttributeError("'NoneType' object has no attribute 'pixel_array'")
        return read(item, **kwargs)

    monkeypatch.setattr(jobs, "read_item", flaky)
    out = tmp_path / "out"
    summary = jobs.compare_files(
        tiny_cnn(), inputs, out, preprocess=PRE, methods=["cam"], metrics=["cost"]
    )
    assert summary.done == ["b.png", "c.png"] and "AttributeError" in summary.failed["a.png"]
    assert summary.exit_code == 1 and (out / "report.html").is_file()
    # what `xai compare` prints opens with the verdict (cost alone is shown, not ranked)
    assert summary.table_markdown.startswith("### Verdict")
    assert "No ranked metric" in summary.table_markdown


def test_unexpected_errors_are_short_with_the_traceback_in_a_file(monkeypatch, capsys):
    from xai_core.cli import app as cli

    def boom(self):
        raise RuntimeError("something broke")

    monkeypatch.setattr(type(cli.get_registry()), "plugin_rows", boom)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli._run(["plugins"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "error: unexpected RuntimeError: something broke"
    log = Path(lines[1].split()[1])
    assert "Traceback" in log.read_text() and "Traceback" not in "\n".join(lines)
    log.unlink()
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli._run(["plugins"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_folder_holding_several_requests_of_one_method_says_so(inputs, tmp_path):
    out = tmp_path / "out"
    jobs.explain_files(tiny_cnn(), inputs[:2], out, method="cam", preprocess=PRE)
    assert "different requests" not in (out / "report.html").read_text()
    jobs.explain_files(tiny_cnn(), inputs[:1], out, method="cam", preprocess=PRE, targets=1)
    results = json.loads((out / "summary.json").read_text())["results"]
    assert [r["input"] for r in results] == ["a.png", "b.png"] and results[0]["targets"] == [[1]]
    assert len({r["request"] for r in results}) == 2
    assert "cam results in this folder answer 2 different requests" in (
        out / "report.html"
    ).read_text()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "gradcam", "-O", "windw=3"], "error: The method 'gradcam' has no option 'windw'"),
        (["-m", "cam", "nowhere.png"], "error: Cannot read nowhere.png: no such file or folder"),
        (["-m", "cam", "--size", "a,b"], "error: Invalid value: --size must be integers"),
        (["-m", "cam", "--workers", "2"], "error: --engine local does not take --workers"),
    ],
)
def test_request_mistakes_are_one_clean_error_and_exit_code_2(
    args, expected, tmp_path, monkeypatch, capsys
):
    from xai_core.cli import app as cli

    monkeypatch.chdir(tmp_path)
    write_png(tmp_path / "a.png", seed=0, size=24)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    inputs = [a for a in args if a.endswith(".png")] or ["a.png"]
    options = [a for a in args if not a.endswith(".png")]
    assert cli._run(["explain", "demo:cnn", *inputs, *options, "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and "Traceback" not in err
    assert err.count("error:") == 1 and not (tmp_path / "out").exists()


def test_bare_xai_shows_the_help_and_no_error(capsys):
    from xai_core.cli import app as cli

    cli._run([])
    captured = capsys.readouterr()
    assert "explain" in captured.out + captured.err and "error:" not in captured.err


def test_ledger_with_a_relative_root_and_request_keys(tmp_path, monkeypatch):
    from xai_core.io.outputs import RunLedger, atomic_write_text, request_key

    monkeypatch.chdir(tmp_path)
    ledger = RunLedger("out")  # relative: made absolute once
    output = Path("out/a.png/x.txt")  # named from the working directory, as jobs used to
    atomic_write_text(output, "x")
    key = request_key({"targets": 1})
    assert key == request_key({"targets": 1}) != request_key({"targets": 2})
    ledger.mark_done("a.png--cam", {"input": "a.png"}, outputs=[output.absolute()], request=key)
    assert ledger.done("a.png--cam", key) and ledger.done("a.png--cam")
    assert not ledger.done("a.png--cam", request_key({"targets": 2}))
    assert [r["key"] for r in ledger.finished()] == ["a.png--cam"]
    ledger.forget("a.png--cam", remove_outputs=True)
    assert not output.exists() and ledger.finished() == []


def test_debug_flag_shows_the_traceback_of_a_known_error(tmp_path, monkeypatch, capsys):
    from xai_core.cli import app as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli._run(["--debug", "explain", "demo:cnn", "nowhere.png", "-m", "cam"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: Cannot read nowhere.png" in err
    assert cli._run(["explain", "demo:cnn", "nowhere.png", "-m", "cam"]) == 2
    assert "Traceback" not in capsys.readouterr().err  # --debug does not stick


def test_an_input_failing_midway_leaves_no_partial_outputs(inputs, tmp_path, monkeypatch):
    def broken_overlay(*args, **kwargs):  # fails after the maps were written
        raise ValueError("cannot draw")

    monkeypatch.setattr(jobs, "figure_png", broken_overlay)
    out = tmp_path / "out"
    summary = jobs.explain_files(tiny_cnn(), inputs[:1], out, method="cam", preprocess=PRE)
    assert summary.failed == {"a.png": "ValueError: cannot draw"}
    assert not (out / "a.png").exists()


class _PickledReversed:
    """An executor that sends the step and each batch through pickle (as to a worker) and
    yields the parts in reverse order (the protocol allows any order)."""

    name = "pickled-reversed"

    def map(self, step, batches):
        import pickle

        remote = pickle.loads(pickle.dumps(step))  # progress, a lambda here, stays behind
        assert remote.progress is None
        parts = [pickle.loads(pickle.dumps(remote(pickle.loads(pickle.dumps(b))))) for b in batches]
        yield from reversed(parts)

    def reduce(self, parts):
        raise AssertionError("explain_files writes each part; it never reduces")


def test_explain_on_another_executor_writes_the_same_files_in_input_order(
    inputs, tmp_path, monkeypatch
):
    read = jobs.read_item

    def flaky(item, **kwargs):
        if item.key == "b.png":
            raise OSError("unreadable")
        return read(item, **kwargs)

    monkeypatch.setattr(jobs, "read_item", flaky)
    local = jobs.explain_files(tiny_cnn(), inputs, tmp_path / "local", method="cam", preprocess=PRE)
    seen = []
    other = jobs.explain_files(
        tiny_cnn(), inputs, tmp_path / "other", method="cam", preprocess=PRE,
        engine=_PickledReversed(), batch_size=2, progress=lambda *a: seen.append(a[:2]),
    )  # fmt: skip
    assert other.done == local.done == ["a.png", "c.png"] and other.failed == local.failed
    for key in other.done:
        a, b = (np.load(tmp_path / o / key / "maps_cam.npy") for o in ("local", "other"))
        assert np.array_equal(a, b)
    assert (3, 3) in seen  # parts counted as they came back
    again = jobs.explain_files(
        tiny_cnn(), inputs, tmp_path / "other", method="cam", preprocess=PRE,
        engine=_PickledReversed(), batch_size=2,
    )  # fmt: skip
    assert again.skipped == ["a.png", "c.png"] and list(again.failed) == ["b.png"]
    with pytest.raises(OptionError, match="batch_size"):
        jobs.explain_files(tiny_cnn(), inputs, tmp_path / "x", method="cam", preprocess=PRE,
                           batch_size=0)  # fmt: skip


def test_progress_counts_inputs_in_order_with_finished_ones_between(inputs, tmp_path):
    out = tmp_path / "out"
    jobs.explain_files(tiny_cnn(), inputs[2:], out, method="cam", preprocess=PRE)  # c.png done
    seen = []
    summary = jobs.explain_files(
        tiny_cnn(), inputs, out, method="cam", preprocess=PRE,
        progress=lambda done, total, what: seen.append((done, total)),
    )  # fmt: skip
    assert summary.skipped == ["c.png"] and summary.done == ["a.png", "b.png"]
    counts = [done for done, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 3 and {t for _, t in seen} == {3}
