"""Batch jobs over files: what ``xai explain`` and ``xai compare`` do, without the command line.

An explain job reads each input, explains it, and writes its outputs atomically into a folder of
its own; the input's completion record is written last, with the key of the request it answers
(model digest, method, plugin version, options, targets, preprocessing): a rerun after a crash,
a kill or Ctrl-C skips exactly the inputs that finished the same request and redoes the rest.
Any error of one input (unreadable file, a reader's or an explainer's exception) is recorded and
the job goes on; a mistake in the request itself (:data:`RUN_ERRORS`) stops it once. The report
and summary cover every method finished in the folder.
"""

from __future__ import annotations

import json
import pickle
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xai_core
from xai_core import demo
from xai_core.core.api import check_options, runnable
from xai_core.core.errors import (
    CapabilityError,
    DeviceError,
    LayerNotFoundError,
    LayerTypeError,
    OptionError,
    PluginError,
    TargetError,
    TargetTypeError,
    UnknownMethodError,
    UnknownOptionError,
)
from xai_core.core.executors import DEFAULT_ENGINE, Executor, Partial, parts
from xai_core.core.progress import ProgressFn, accepts_progress, within
from xai_core.core.types import ExplainerInfo
from xai_core.io.inputs import InputItem, MaskFolder, find_inputs, read_item
from xai_core.io.outputs import (
    RunLedger,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_text,
    content_digest,
    module_digest,
    request_key,
)
from xai_core.io.preprocess import Preprocess
from xai_core.report import HtmlReport, comparison_csv, comparison_json, comparison_markdown
from xai_core.report.html import input_section
from xai_core.report.overlay import (
    decision_facts,
    fact_lines,
    figure_png,
    on_display_grid,
    scale_map,
)


@dataclass
class JobSummary:
    """What a batch job did: finished, skipped because already done, and failed inputs."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    # the exception of each failed input, for advice in the caller's terms (CLI flags)
    errors: dict[str, BaseException] = field(default_factory=dict, repr=False)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "report": None if self.report is None else str(self.report),
        }


def middle_slice(volume: np.ndarray) -> np.ndarray:
    return volume[volume.shape[0] // 2]


# Errors that do not depend on the input: they would fail every input alike, so the run stops at
# the first one (exit code 2) instead of reporting the same failure for each file.
RUN_ERRORS = (
    UnknownMethodError,
    UnknownOptionError,
    CapabilityError,
    LayerNotFoundError,
    LayerTypeError,
    PluginError,
    TargetTypeError,
    TargetError,
    DeviceError,
)


def pick_device(spec: str | torch.device | None) -> torch.device:
    """The device a job runs on: ``spec``, or CUDA when available, else the CPU.

    A device this machine does not have is a :class:`DeviceError` saying what to pass instead,
    not torch's error from deep inside the first ``.to()``.
    """
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"Unknown device {str(spec)!r}; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError("CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"There is no {device}: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of them or --device cpu."
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("MPS is not available on this machine; use --device cpu.")
    elif device.type != "cpu":
        raise DeviceError(f"Device {str(spec)!r} is not supported here; use cpu, cuda or mps.")
    return device


def find_job_inputs(paths: Sequence[str | Path], out: str | Path) -> list[InputItem]:
    """:func:`find_inputs`, without anything inside the output folder ``out``.

    An output folder inside an input folder would otherwise have its own overlays explained as
    inputs on the next run.
    """
    out = Path(out).resolve()  # resolved on both sides: "../x/out" and "/abs/x/out" match
    return [
        item
        for item in find_inputs(paths)
        if not all(Path(p).resolve().is_relative_to(out) for p in item.paths)
    ]


def model_digest(model: Any) -> dict[str, Any]:
    """What identifies a model's weights, for resume keys: a file's (or folder's) sha256, or a
    digest of a module's parameters and buffers."""
    if isinstance(model, str | Path) and Path(model).exists():
        return {"sha256": content_digest(model)}
    if isinstance(model, torch.nn.Module):
        return module_digest(model)
    return {"object": type(model).__qualname__, "id": repr(model)[:200]}


def model_identity(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies a model loaded by :func:`~xai_core.io.models.load_model`, for resume
    keys: a demo model's name and the digest of the shipped manifest (which lists the sha256 of
    every weight file), or the model file's (folder's) sha256 with how it was built."""
    if info.get("kind") == "demo":
        manifest = demo.weights_dir() / "manifest.json"
        digest = content_digest(manifest) if manifest.is_file() else None
        return {"demo": info.get("name"), "manifest": digest}
    # How it was built (kind, architecture, classes...), not where it lies: a moved file with
    # the same bytes is the same model.
    identity = {
        k: v
        for k, v in info.items()
        if k not in ("path", "sidecar", "class_names") and isinstance(v, str | int | float | bool)
    }
    if info.get("path"):
        identity["sha256"] = content_digest(info["path"])
    if info.get("sidecar"):
        identity["sidecar"] = content_digest(info["sidecar"])
    return identity


def check_method(adapter: Any, method: str, options: dict[str, Any]) -> ExplainerInfo:
    """Whole-run checks before any input is read: the method exists, can run on this model and
    accepts these options. Raises the typed error once, instead of once per input."""
    return runnable(method, adapter, options=options)[0]


def explain_files(
    model: Any,
    items: Sequence[InputItem],
    out: Path,
    *,
    method: str,
    preprocess: Preprocess,
    targets: Any = None,
    options: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    window: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
    model_id: dict[str, Any] | None = None,
    engine: str | Executor = DEFAULT_ENGINE,
    batch_size: int = 1,
) -> JobSummary:
    """Explain every input file with one method; see the module docstring for guarantees.

    ``model_id`` identifies the model's weights in resume keys (the CLI passes the file's
    sha256, or a demo model's name and manifest digest); by default it is computed from
    ``model`` (:func:`model_digest`). ``engine`` runs the reading and explaining of each batch
    of ``batch_size`` inputs (:class:`ExplainStep`): ``"local"`` here, one after the other, or
    an executor such as ``"ray"`` on workers; the writing stays here (docs/scale.md).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size must be an int >= 1 (inputs per batch); got {batch_size!r}.")
    out = Path(out).absolute()  # once: every path below is absolute
    adapter = xai_core.adapt(model)
    device = torch.device(device) if device is not None else adapter.device
    options = dict(options or {})
    info = check_method(adapter, method, options)  # before anything is written
    request = {
        "model": model_id if model_id is not None else model_digest(model),
        "method": method,
        "plugin": info.distribution or info.plugin,
        "plugin_version": info.version,
        "core_version": xai_core.__version__,
        "options": options,
        "targets": targets,
        "preprocess": {f.name: getattr(preprocess, f.name) for f in fields(preprocess)},
        "window": window,
        "class_names": list(class_names) if class_names else None,
    }
    request_id = request_key(request)
    out.mkdir(parents=True, exist_ok=True)
    ledger = RunLedger(out)
    summary = JobSummary()
    step = ExplainStep(
        adapter=adapter,
        method=method,
        preprocess=preprocess,
        targets=targets,
        options=options,
        class_names=list(class_names) if class_names else None,
        device=device,
        window=window,
        total=len(items),
        cwd=Path.cwd(),  # a worker reads relative paths from the caller's folder
        runs_progress=accepts_progress(info.cls) and "progress" not in options,
        progress=progress,
    )
    # What is finished for this request is skipped here, before anything is sent to a worker.
    pending = []
    for index, item in enumerate(items):
        if ledger.done(f"{item.key}--{method}", request_id):  # counted with the next part
            summary.skipped.append(item.key)
        else:
            pending.append((index, item))

    def batches() -> Iterator[list[tuple[int, InputItem]]]:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for _, item in batch:
                # Another request's result for this input and method is removed first, so that
                # a redo that fails never leaves the earlier result standing as if it answered
                # this request.
                ledger.forget(f"{item.key}--{method}", remove_outputs=True)
            yield batch

    order = {item.key: index for index, item in enumerate(items)}
    skipped = sorted(order[key] for key in summary.skipped)
    sent = 0
    if pending:  # nothing to send: no executor started (a rerun of a finished job)
        for part in parts(engine, step, batches()):
            for result in part.value:
                _write_result(out, ledger, summary, method, request_id, result)
            sent += part.images
            if progress and part.value:  # inputs written, and those skipped before them
                last = max(result.index for result in part.value)
                progress(sent + bisect_right(skipped, last), len(items), method)
    summary.done.sort(key=order.__getitem__)  # input order, whatever order parts came in
    summary.failed = dict(sorted(summary.failed.items(), key=lambda kv: order[kv[0]]))
    if progress:
        progress(len(items), len(items), "report")
    summary.report = _write_folder_report(out, ledger, summary)
    return summary


def _write_folder_report(out: Path, ledger: RunLedger, summary: JobSummary) -> Path:
    """report.html and summary.json over every finished result in the folder: each input with
    each method run into it (the last request of each), and this run's failures."""
    finished = [data for data in ledger.finished() if "input" in data.get("record", {})]
    finished.sort(key=lambda data: (data["record"]["input"], data["record"]["method"]))
    methods = sorted({data["record"]["method"] for data in finished})
    report = HtmlReport(title=f"xai-core: {', '.join(methods) or 'explain'}")
    results = []
    for data in finished:
        record = data["record"]
        key, method = record["input"], record["method"]
        report.add_fragment((out / key / f"report_{method}.html").read_text(encoding="utf-8"))
        results.append(
            {
                "input": key,
                "method": method,
                "request": data.get("request"),
                "targets": record.get("targets"),
                "plugin": record.get("plugin"),
                "version": record.get("version"),
                "completed": data.get("completed"),
            }
        )
    for method in methods:
        requests = {r["request"] for r in results if r["method"] == method}
        if len(requests) > 1:  # e.g. a rerun on some inputs with another target: say so
            report.add_note(
                f"The {method} results in this folder answer {len(requests)} different "
                f"requests (model, targets, options or preprocessing); summary.json lists each "
                f"result's request key."
            )
    for key, error in summary.failed.items():
        report.add_note(f"{key}: failed: {error}", error=True)
    path = report.write(out / "report.html")
    summary.report = path
    atomic_write_text(
        out / "summary.json",
        json.dumps({**summary.as_dict(), "methods": methods, "results": results}, indent=2),
    )
    return path


def _write_result(
    out: Path, ledger: RunLedger, summary: JobSummary, method: str, request_id: str, result
) -> None:
    """One input's outputs written atomically, then its completion record (the driver's part);
    a failure of the input (from the step, or of writing here) recorded, its files removed."""
    job_key = f"{result.key}--{method}"
    error = result.error
    if error is None:
        try:
            folder = out / result.key
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(folder / f"maps_{method}.npy", result.maps)
            atomic_write_bytes(folder / f"overlay_{method}.png", result.overlay)
            atomic_write_text(folder / f"report_{method}.html", result.fragment)
            atomic_write_text(folder / f"result_{method}.json", json.dumps(result.record, indent=2))
            record = {**result.record, "request": request_id}
            outputs = [folder / name for name in output_names(method)]
            ledger.mark_done(job_key, record, outputs=outputs, request=request_id)
        except Exception as exc:  # a full disk, say: this input failed, the batch goes on
            error = exc
    if error is None:
        summary.done.append(result.key)
        return
    summary.failed[result.key] = f"{type(error).__name__}: {error}"
    summary.errors[result.key] = error
    ledger.mark_failed(job_key, error)
    _remove_partial(out / result.key, method)


@dataclass
class ItemResult:
    """What explaining one input gives the driver to write: the maps, the overlay PNG, the
    report fragment and the record; or the input's ``error`` (a failure as data)."""

    index: int
    key: str
    record: dict[str, Any] | None = None
    maps: np.ndarray | None = None
    overlay: bytes = b""
    fragment: str = ""
    error: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A third-party exception that does not pickle must not fail the whole batch's return.
        state = dict(self.__dict__)
        if self.error is not None:
            try:
                pickle.loads(pickle.dumps(self.error))
            except Exception:
                state["error"] = RuntimeError(f"{type(self.error).__name__}: {self.error}")
        return state


@dataclass
class ExplainStep:
    """One batch of ``(index, item)`` inputs read, preprocessed and explained, one by one: what
    an executor maps (:mod:`xai_core.core.executors`), here or in a worker. It writes nothing;
    each input's outputs come back as an :class:`ItemResult` inside a
    :class:`~xai_core.core.executors.Partial` (``images``: the inputs of the batch). A failure of
    one input is its result's ``error``; a whole-run mistake (:data:`RUN_ERRORS`) raises."""

    adapter: Any
    method: str
    preprocess: Preprocess
    targets: Any
    options: dict[str, Any]
    class_names: list[str] | None
    device: torch.device
    window: tuple[float, float] | None
    total: int
    cwd: Path
    runs_progress: bool
    progress: ProgressFn | None = None  # this process's callback: never sent to a worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "progress": None}

    def __call__(self, batch: Sequence[tuple[int, InputItem]]) -> Partial:
        results = []
        for index, item in batch:
            if self.progress:
                self.progress(index, self.total, item.key)
            try:
                results.append(self._explain(index, item))
            except RUN_ERRORS:
                raise  # the same for every input: stop once, with the typed error
            except Exception as exc:  # any failure of one input must not end the batch
                results.append(ItemResult(index, item.key, error=exc))
        return Partial(results, len(batch))

    def _explain(self, index: int, item: InputItem) -> ItemResult:
        paths = tuple(self.cwd / path for path in item.paths)  # absolute stays absolute
        loaded = read_item(replace(item, paths=paths), window=self.window)
        inner = within(self.progress, index, self.total, f"{self.method} of {item.key}")
        options = self.options
        if self.runs_progress and inner:
            options = {**options, "progress": inner}
        return _explain_one(
            self.adapter,
            index,
            item,
            loaded,
            self.method,
            self.preprocess,
            self.targets,
            options,
            self.class_names,
            self.device,
        )


def _explain_one(
    adapter, index, item, loaded, method, preprocess, targets, options, class_names, device
) -> ItemResult:
    start = time.perf_counter()
    x = preprocess.to_tensor(loaded).to(device)
    if isinstance(targets, list):  # several classes for every sample (e.g. every slice)
        targets = [targets] * x.shape[0]
    exp = xai_core.explain(adapter, x, method=method, targets=targets, **options)
    maps = exp.maps.detach().cpu().numpy()
    heat, display, sample = _display_pair(exp, loaded, x)
    scaled, scale = scale_map(heat, method)  # limits from the map as computed
    display, scaled = on_display_grid(display, scaled, heat.ndim)  # the input's own aspect
    middle = scaled.shape[0] // 2 if scaled.ndim == 3 else None  # a volume: show its middle slice
    names = _names(exp.targets, class_names)
    target = None if exp.targets is None else int(exp.targets[sample, 0])
    facts = decision_facts(exp.scores[sample].detach().cpu().numpy(), target, class_names or ())
    shown = (display, scaled) if middle is None else (display[middle], scaled[middle])
    lines = [item.key + ("" if middle is None else f", slice {middle + 1}/{scaled.shape[0]}")]
    png = figure_png(*shown, scale, method=method, lines=lines + fact_lines(facts))
    targets_shown = names[0] if names else [str(t) for t in exp.targets[0].tolist()]
    caption = f"{method}; target: {', '.join(targets_shown)}"  # plain text: "name", "a, b"
    fragment = input_section(item.key, loaded.display, {method: heat}, caption=caption, facts=facts)
    scores = exp.scores.detach().cpu()
    record = {
        "input": item.key,
        "sources": [str(p) for p in item.paths],
        "method": method,
        "plugin": exp.plugin,
        "version": exp.version,
        "targets": None if exp.targets is None else exp.targets.cpu().tolist(),
        "target_names": names,
        "scores": scores.tolist(),
        "layers": exp.layers,
        "seconds": time.perf_counter() - start,
        "options": {k: repr(v) for k, v in options.items() if k != "progress"},
        "maps_shape": list(maps.shape),
        "decision": facts,
        "colour_scale": {
            "signed": scale.signed,
            "low": scale.low,
            "high": scale.high,
            "label": scale.label(method),
        },
    }
    return ItemResult(index, item.key, record, maps.astype(np.float32), png, fragment)


def output_names(method: str) -> tuple[str, ...]:
    """The files one input's explanation by ``method`` writes into the input's folder."""
    return (
        f"maps_{method}.npy",
        f"overlay_{method}.png",
        f"report_{method}.html",
        f"result_{method}.json",
    )


def _remove_partial(folder: Path, method: str) -> None:
    """Remove what a failed input wrote for ``method`` (no record lists it), and the input's
    folder when nothing else is left in it."""
    for name in output_names(method):
        with suppress(OSError):
            (folder / name).unlink()
    with suppress(OSError):
        folder.rmdir()  # only when empty


def _names(targets: torch.Tensor | None, class_names: Sequence[str] | None) -> list | None:
    if targets is None or not class_names:
        return None
    return [
        [class_names[i] if i < len(class_names) else str(i) for i in row]
        for row in targets.cpu().tolist()
    ]


def _display_pair(exp, loaded, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(raw map on the explained grid, display image as read, the sample whose decision is
    shown) for one input.

    2D: an (H, W) map. A volume, explained whole or slice by slice: a (D, H, W) map with the
    display stack. Several targets or layers: the first is shown (all are in the .npy file).
    """
    heat = exp.maps.detach().to("cpu", torch.float32).numpy()
    spatial = tuple(x.shape[2:])
    per_sample = heat.reshape(x.shape[0], -1, *spatial)[:, 0]  # (N, *spatial)
    display = np.asarray(loaded.display)
    if x.ndim == 5 or x.shape[0] == 1:  # one volume, or one image
        return per_sample[0], display, 0
    return per_sample, display, x.shape[0] // 2  # slices of a volume as a batch


@dataclass
class CompareSummary(JobSummary):
    comparison: Any = None
    table_markdown: str = ""


def compare_files(
    model: Any,
    items: Sequence[InputItem],
    out: Path,
    *,
    preprocess: Preprocess,
    targets: Any = None,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    masks: Path | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    metric_options: dict[str, dict[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    window: tuple[float, float] | None = None,
    progress: ProgressFn | None = None,
    budget: float | None = None,
    notice: Callable[[str], None] | None = None,
    engine: str | Executor = DEFAULT_ENGINE,
    batch_size: int | None = None,
) -> CompareSummary:
    """Compare methods on all readable inputs; write tables and an HTML report.

    ``progress``, ``budget``, ``notice`` (the cost estimate, before the work), ``engine`` and
    ``batch_size`` (all inputs in one batch by default) are those of :func:`xai_core.compare`."""
    out = Path(out).absolute()  # once: every path below is absolute
    summary = CompareSummary()
    adapter = xai_core.adapt(model)
    device = torch.device(device) if device is not None else adapter.device
    registry = xai_core.get_registry()
    for name in methods or ():  # whole-run mistakes first, once, before any input is read
        check_options(registry.get_explainer(name), (options or {}).get(name, {}))
    loaded, tensors = {}, {}
    for item in items:
        try:
            loaded[item.key] = read_item(item, window=window)
            tensors[item.key] = preprocess.to_tensor(loaded[item.key])
        except Exception as exc:  # any failure of one input must not end the batch
            summary.failed[item.key] = f"{type(exc).__name__}: {exc}"
            summary.errors[item.key] = exc
    if not tensors:
        raise xai_core.errors.InputError(
            "None of the inputs could be read; nothing to compare."
        )
    shapes = {tuple(t.shape[1:]) for t in tensors.values()}
    if len(shapes) > 1:
        raise xai_core.core.errors.InputError(
            f"The inputs have different sizes after preprocessing ({sorted(shapes)}); pass --size "
            f"so they can be compared as one batch."
        )
    keys = list(tensors)
    x = torch.cat([tensors[k] for k in keys]).to(device)
    mask_tensor = (
        None if masks is None else MaskFolder(masks, items).read(keys, x, required=True).to(device)
    )

    result = xai_core.compare(
        adapter,
        x,
        targets=targets,
        methods=methods,
        metrics=metrics,
        masks=mask_tensor,
        options=options,
        metric_options=metric_options,
        progress=progress,
        budget=budget,
        notice=notice,
        engine=engine,
        batch_size=batch_size,
    )
    summary.comparison = result
    summary.table_markdown = comparison_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", summary.table_markdown)
    atomic_write_text(out / "comparison.csv", comparison_csv(result))
    atomic_write_text(out / "comparison.json", comparison_json(result))
    report = HtmlReport(title="xai-core: comparison")
    report.add_comparison(result)
    report.add_heading("Inputs")
    names = tuple(class_names or ())
    for i, key in enumerate(keys):
        # Raw maps (signed ones keep their sign) on the model's grid; shown at the input's aspect.
        heat = {
            m: e.full[i, 0, 0].detach().to("cpu", torch.float32).numpy()
            for m, e in result.explanations.items()
        }
        target = int(result.targets[i])
        scores = next(iter(result.explanations.values())).scores[i] if heat else None
        facts = decision_facts(None if scores is None else scores.cpu().numpy(), target, names)
        truth = None if mask_tensor is None else {"mask": mask_tensor[i].float().cpu().numpy()}
        report.add_input(key, np.asarray(loaded[key].display), heat, facts=facts, masks=truth)
    for key, error in summary.failed.items():
        report.add_note(f"{key}: failed: {error}", error=True)
    summary.report = report.write(out / "report.html")
    summary.done = keys
    atomic_write_text(out / "summary.json", json.dumps(summary.as_dict(), indent=2))
    return summary
