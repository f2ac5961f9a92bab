"""Batch jobs over files: what ``xai explain`` and ``xai compare`` do, without the command line.

An explain job reads each input, explains it, and writes its outputs atomically into a folder of
its own; the input's completion record is written last, so a rerun after a crash or a kill skips
exactly the inputs that finished and redoes the rest. An unreadable or corrupt input is reported
and skipped; the others complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xai_core
from xai_core.errors import XaiError
from xai_core.io.inputs import InputItem, MaskFolder, read_item
from xai_core.io.outputs import RunLedger, atomic_save_npy, atomic_write_bytes, atomic_write_text
from xai_core.io.preprocess import Preprocess
from xai_core.report import HtmlReport, overlay, to_png
from xai_core.report.html import input_section

Progress = Callable[[str, int, int], None]  # (message, done, total)


@dataclass
class JobSummary:
    """What a batch job did: finished, skipped because already done, and failed inputs."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None

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


def display_of(loaded: Any, spatial: tuple[int, ...]) -> np.ndarray:
    """The input's display image resized to the explained grid (maps live on that grid)."""
    from skimage.transform import resize

    display = np.asarray(loaded.display)
    target = spatial + display.shape[len(spatial) :]
    if display.shape[: len(spatial)] != spatial:
        display = resize(display, target, order=1, preserve_range=True, anti_aliasing=True)
        display = display.round().astype(np.uint8)
    return display


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
    progress: Progress | None = None,
) -> JobSummary:
    """Explain every input file with one method; see the module docstring for guarantees."""
    out = Path(out).absolute()  # the ledger takes output paths relative to `out` or absolute
    out.mkdir(parents=True, exist_ok=True)
    adapter = xai_core.adapt(model)
    device = torch.device(device) if device is not None else adapter.device
    ledger = RunLedger(out)
    summary = JobSummary()
    report = HtmlReport(title=f"xai-core: {method}")
    options = dict(options or {})
    for index, item in enumerate(items):
        if progress:
            progress(item.key, index, len(items))
        job_key = f"{item.key}--{method}"  # the same folder can hold several methods' runs
        if ledger.done(job_key):
            summary.skipped.append(item.key)
            _add_to_report(report, out, item.key, method)
            continue
        try:
            loaded = read_item(item, window=window)
            record, outputs = _explain_one(
                adapter, item, loaded, out, method, preprocess, targets, options, class_names,
                device,
            )
        except (XaiError, OSError, ValueError, RuntimeError) as exc:
            summary.failed[item.key] = f"{type(exc).__name__}: {exc}"
            ledger.mark_failed(job_key, exc)
            continue
        ledger.mark_done(job_key, record, outputs=outputs)
        summary.done.append(item.key)
        _add_to_report(report, out, item.key, method)
    if progress:
        progress("report", len(items), len(items))
    for key, error in summary.failed.items():
        report.add_note(f"{key}: failed: {error}", error=True)
    summary.report = report.write(out / "report.html")
    atomic_write_text(out / "summary.json", json.dumps(summary.as_dict(), indent=2))
    return summary


def _explain_one(
    adapter, item, loaded, out, method, preprocess, targets, options, class_names, device
):
    start = time.perf_counter()
    x = preprocess.to_tensor(loaded).to(device)
    if isinstance(targets, list):  # several classes for every sample (e.g. every slice)
        targets = [targets] * x.shape[0]
    exp = xai_core.explain(adapter, x, method=method, targets=targets, **options)
    folder = out / item.key
    folder.mkdir(parents=True, exist_ok=True)
    maps = exp.maps.detach().cpu().numpy()
    atomic_save_npy(folder / f"maps_{method}.npy", maps.astype(np.float32))
    heat, display = _display_pair(exp, loaded, x)
    middle = heat.shape[0] // 2 if heat.ndim == 3 else None  # a volume: show its middle slice
    png = overlay(display[middle], heat[middle]) if middle is not None else overlay(display, heat)
    atomic_write_bytes(folder / f"overlay_{method}.png", to_png(png))
    names = _names(exp.targets, class_names)
    caption = f"{method}; target: {names[0] if names else exp.targets[0].tolist()}"
    fragment = input_section(item.key, display, {method: heat}, caption=caption)
    atomic_write_text(folder / f"report_{method}.html", fragment)
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
        "options": {k: repr(v) for k, v in options.items()},
        "maps_shape": list(maps.shape),
    }
    atomic_write_text(folder / f"result_{method}.json", json.dumps(record, indent=2))
    names = (f"maps_{method}.npy", f"overlay_{method}.png", f"report_{method}.html")
    names += (f"result_{method}.json",)
    return record, [folder / name for name in names]


def _names(targets: torch.Tensor | None, class_names: Sequence[str] | None) -> list | None:
    if targets is None or not class_names:
        return None
    return [
        [class_names[i] if i < len(class_names) else str(i) for i in row]
        for row in targets.cpu().tolist()
    ]


def _display_pair(exp, loaded, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(normalised heat, display image) on the explained grid, for one input.

    2D: (H, W) each. A volume, explained whole or slice by slice: (D, H, W) heat and a matching
    display stack. Several targets or layers: the first is shown (all are in the .npy file).
    """
    heat = exp.normalized().detach().cpu().numpy()
    spatial = tuple(x.shape[2:])
    per_sample = heat.reshape(x.shape[0], -1, *spatial)[:, 0]  # (N, *spatial)
    if x.ndim == 5:  # one volume
        heat = per_sample[0]
        display = display_of(loaded, spatial)
    elif x.shape[0] > 1:  # slices of a volume as a batch
        heat = per_sample
        display = display_of(loaded, (x.shape[0], *spatial))
    else:
        heat = per_sample[0]
        display = display_of(loaded, spatial)
    return heat, display


def _add_to_report(report: HtmlReport, out: Path, key: str, method: str) -> None:
    """Add a finished input from its saved fragment (also inputs finished in earlier runs)."""
    report.add_fragment((out / key / f"report_{method}.html").read_text())


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
    progress: Progress | None = None,
) -> CompareSummary:
    """Compare methods on all readable inputs as one batch; write tables and an HTML report."""
    from xai_core.report import comparison_csv, comparison_json, comparison_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = CompareSummary()
    adapter = xai_core.adapt(model)
    device = torch.device(device) if device is not None else adapter.device
    loaded, tensors = {}, {}
    for item in items:
        try:
            loaded[item.key] = read_item(item, window=window)
            tensors[item.key] = preprocess.to_tensor(loaded[item.key])
        except (XaiError, OSError, ValueError) as exc:
            summary.failed[item.key] = f"{type(exc).__name__}: {exc}"
    if not tensors:
        raise xai_core.errors.InputError("None of the inputs could be read; nothing to compare.")
    shapes = {tuple(t.shape[1:]) for t in tensors.values()}
    if len(shapes) > 1:
        raise xai_core.errors.InputError(
            f"The inputs have different sizes after preprocessing ({sorted(shapes)}); pass --size "
            f"so they can be compared as one batch."
        )
    keys = list(tensors)
    x = torch.cat([tensors[k] for k in keys]).to(device)
    mask_tensor = (
        None if masks is None else MaskFolder(masks, items).read(keys, x, required=True).to(device)
    )

    def step(message: str) -> None:
        if progress:
            progress(message, 0, 0)

    result = xai_core.compare(
        adapter,
        x,
        targets=targets,
        methods=methods,
        metrics=metrics,
        masks=mask_tensor,
        options=options,
        metric_options=metric_options,
        progress=step,
    )
    summary.comparison = result
    summary.table_markdown = comparison_markdown(result)
    atomic_write_text(out / "comparison.md", summary.table_markdown)
    atomic_write_text(out / "comparison.csv", comparison_csv(result))
    atomic_write_text(out / "comparison.json", comparison_json(result))
    report = HtmlReport(title="xai-core: comparison")
    report.add_comparison(result)
    report.add_heading("Inputs")
    for i, key in enumerate(keys):
        spatial = tuple(x.shape[2:])
        display = display_of(loaded[key], spatial)
        heat = {m: e.normalized()[i].detach().cpu().numpy() for m, e in result.explanations.items()}
        target = int(result.targets[i])
        name = class_names[target] if class_names and target < len(class_names) else target
        report.add_input(key, display, heat, caption=f"target: {name}")
    for key, error in summary.failed.items():
        report.add_note(f"{key}: failed: {error}", error=True)
    summary.report = report.write(out / "report.html")
    summary.done = keys
    atomic_write_text(out / "summary.json", json.dumps(summary.as_dict(), indent=2))
    return summary
