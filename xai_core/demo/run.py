"""``xai demo``: every method and metric on the embedded synthetic medical data, one report.

Six studies, each a :func:`xai_core.compare` call on models that ship with the package:

1. the chest-X-ray CNN (GAP + linear head): CAM, Grad-CAM, occlusion, scored against the known
   lesion masks (pointing games) and by every other metric;
2. the chest-X-ray vision transformer: attention maps, rollouts, Grad-CAM, occlusion;
3. the same CNN exported to ONNX: CAM, Grad-CAM and occlusion on the graph onnxruntime runs;
4. the 3D CT CNN on small volumes: CAM, Grad-CAM, occlusion in 3D;
5. the shortcut study: a CNN trained where a corner marker went with the disease. Its maps are
   scored against the marker instead of the lesion: a high share of attribution on the marker is
   the tool exposing a model that learned the wrong thing; the clean CNN is the control.

Nothing is downloaded; the data is generated from fixed seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xai_core
from xai_core.demo import data, load_model, onnx_path
from xai_core.io.outputs import atomic_write_bytes, atomic_write_text
from xai_core.report import HtmlReport, comparison_json, comparison_markdown
from xai_core.report.overlay import decision_facts, fact_lines, figure_png, scale_map
from xai_core.report.verdict import verdict_overview_html
from xai_core.workflows.compare import Comparison

SEED = 2026
# Windows about the size of the lesions, overlapping by half: 225 boxes per 64x64 image, 343 per
# 32^3 volume. Strides equal to the window put the grid's edges through many lesions (the pointing
# game on 40 new patients fell from 1.0 to 0.65 in 2D, from 0.9 to 0.2 in 3D).
OCCLUSION_2D = {"window": 8, "stride": 4}
OCCLUSION_3D = {"window": 6, "stride": 4}
# RISE's default 4000 masks, re-run by every metric that re-explains (randomisation, stability,
# max-sensitivity / Lipschitz, eMPRT), were three quarters of the demo's time. With 1000, two
# draws of masks give maps correlated at 0.96-0.98 on the demo CNN's X-rays with a lesion (0.99
# with 4000); on normal X-rays neither setting gives a stable map (0.5), there is no evidence.
RISE = {"masks": 1000}
METRIC_OPTIONS = {
    "randomization": {"stages": 3},
    "deletion": {"steps": 16},
    "insertion": {"steps": 16},
    # each sample is one re-explanation of the batch (shared by the two metrics)
    "max_sensitivity": {"samples": 2},
    "local_lipschitz": {"samples": 2},
    "road": {"percentages": (20, 50, 80)},
}
SUMMARY_METRICS = (
    "pointing_game",
    "energy_pointing_game",
    "deletion",
    "insertion",
    "randomization",
)


@dataclass
class Study:
    title: str
    note: str
    comparison: Comparison
    display: np.ndarray  # (N, H, W) or (N, D, H, W) uint8
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # panel name -> (N, ...) masks
    class_names: tuple[str, ...] = ()
    # In the report's opening verdicts; not the marker studies, whose "best" map is the one that
    # points at the shortcut: a finding about the model, read with the study's note.
    overview: bool = True
    labels: np.ndarray | None = None  # (N,) the true class of each sample, when known


@dataclass
class DemoResult:
    studies: list[Study]
    report: Path
    seconds: float

    def summary_table(self):
        """A rich table: one row per (study, method), the headline metrics' means."""
        from rich.markup import escape  # the terminal table only
        from rich.table import Table

        table = Table(title=f"xai demo ({self.seconds:.0f} s); report: {escape(str(self.report))}")
        table.add_column("study", overflow="fold")
        table.add_column("method", no_wrap=True, min_width=12)
        for metric in SUMMARY_METRICS:
            arrow = "↑" if metric in ("pointing_game", "energy_pointing_game", "insertion") else "↓"
            table.add_column(f"{metric} {arrow}", justify="right")
        table.add_column("s / image", justify="right")
        for study in self.studies:
            result = study.comparison
            for method in result.methods:
                cells = []
                for metric in SUMMARY_METRICS:
                    if metric in result.metrics:
                        mean = result.aggregate(method, metric).mean
                        cells.append("n/a" if np.isnan(mean) else f"{mean:.3f}")
                    else:
                        cells.append("")
                cost = result.costs[method].seconds_per_image
                table.add_row(study.title, method, *cells, f"{cost:.3f}")
        return table


def _display(images: torch.Tensor) -> np.ndarray:
    return (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def run_demo(
    out: str | Path = "xai-demo", progress: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the six studies, write ``report.html``, the tables and ``overlays/*.png`` (each map
    with its colour bar and the model's decision) into ``out``."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    torch.manual_seed(SEED)  # metrics with random parts (randomisation) repeat exactly

    xrays = data.make_xrays(6, seed=SEED)
    x = data.preprocess(xrays.images)
    lesion = xrays.masks
    names = data.XRAY_CLASSES
    studies = []

    def study(
        title,
        note,
        model,
        inputs,
        masks,
        *,
        methods=None,
        options=None,
        truth,
        display,
        classes=names,
        metrics=None,
        overview=True,
        labels=None,
    ):
        say(title)
        result = xai_core.compare(
            model,
            inputs,
            targets=None,
            methods=methods,
            metrics=metrics,
            masks=masks,
            # the studies share their settings; compare() refuses options for absent methods
            options={k: v for k, v in (options or {}).items() if methods is None or k in methods},
            metric_options=_metric_options(metrics),
            progress=lambda done, total, what: say(f"{title}: {what}"),
        )
        labels = None if labels is None else labels.numpy()
        studies.append(
            Study(title, note, result, display, truth, classes, overview=overview, labels=labels)
        )

    # The three X-ray studies explain the same images, with the same lesions and settings.
    xray = {
        "options": {"occlusion": OCCLUSION_2D, "rise": RISE},
        "truth": {"lesion (ground truth)": lesion.numpy()},
        "display": _display(xrays.images),
        "labels": xrays.labels,
    }
    study(
        "X-ray CNN",
        "A small CNN with a global-average-pooling + linear head, trained on clean "
        "synthetic chest X-rays. Pointing games use the known lesion masks (normal patients have "
        "none: n/a).",
        load_model("cnn"),
        x,
        lesion,
        **xray,
    )
    study(
        "X-ray ViT",
        "A small vision transformer (8-pixel patches, class token) on the same images. "
        "Grad-CAM reads the patch tokens entering the last attention layer (its default on "
        "transformers).",
        load_model("vit"),
        x,
        lesion,
        **xray,
    )
    study(
        "X-ray CNN (ONNX)",
        "The same CNN exported to ONNX and run by onnxruntime. CAM and Grad-CAM read the graph "
        "itself (layers captured as extra outputs, gradients through the graph's tail), so "
        "their maps match the PyTorch CNN's above; occlusion needs only the forward pass.",
        str(onnx_path()),
        x,
        lesion,
        methods=["cam", "gradcam", "occlusion"],
        **xray,
    )
    volumes = data.make_volumes(4, seed=SEED)
    study(
        "CT 3D CNN",
        "A 3D CNN on small synthetic CT volumes; use the slider to move through the slices.",
        load_model("cnn3d"),
        data.preprocess(volumes.images),
        volumes.masks,
        options={"occlusion": OCCLUSION_3D, "rise": RISE},
        truth={"lesion (ground truth)": volumes.masks.numpy()},
        display=_display(volumes.images),
        classes=data.CT_CLASSES,
        labels=volumes.labels,
    )
    shortcut = data.make_xrays(6, seed=SEED + 1, shortcut=True, marker="all")
    markers = shortcut.markers
    xs = data.preprocess(shortcut.images)
    pointing = ["pointing_game", "energy_pointing_game"]
    for name, title in (("cnn_shortcut", "Shortcut CNN"), ("cnn", "Clean CNN (control)")):
        study(
            f"{title} vs marker",
            "Every image carries the burned-in corner marker. Here the "
            "pointing games are scored against the MARKER, not the lesion: a high share of "
            "attribution on the marker means the model decides from the marker (the "
            "husky-vs-wolf 'snow' problem). The shortcut CNN was trained where the marker went "
            "with disease; the clean CNN is the control.",
            load_model(name),
            xs,
            markers,
            methods=["cam", "gradcam", "occlusion"],
            metrics=pointing,
            overview=False,
            options={"occlusion": OCCLUSION_2D},
            truth={"marker": markers.numpy(), "lesion": shortcut.masks.numpy()},
            display=_display(shortcut.images),
            labels=shortcut.labels,
        )
    say("writing the report")
    report = _write_report(studies, out)
    return DemoResult(studies, report, time.perf_counter() - start)


def _metric_options(metrics: list[str] | None) -> dict[str, dict[str, Any]]:
    installed = set(xai_core.get_registry().metrics())
    wanted = installed if metrics is None else set(metrics) & installed
    return {name: opts for name, opts in METRIC_OPTIONS.items() if name in wanted}


def _write_report(studies: list[Study], out: Path) -> Path:
    report = HtmlReport(title="xai-core demo: what do these models look at?")
    report.add_note(
        "Synthetic, deterministic chest X-rays and CT volumes with known lesions, generated by "
        "xai_core.demo.data; models trained by scripts/train_demo.py and shipped with xai-core."
    )
    # What to trust, study by study, before any table or image.
    overview = [(s.title, s.comparison) for s in studies if s.overview]
    report.add_fragment(verdict_overview_html(overview))
    tables = []
    for index, study in enumerate(studies):
        result = study.comparison
        report.add_heading(study.title)
        report.add_note(study.note)
        report.add_comparison(result)
        for i in range(study.display.shape[0]):
            target = int(result.targets[i])
            truth = None if study.labels is None else int(study.labels[i])
            # Raw maps (occlusion keeps its sign); the first explanation's scores are the model's.
            maps = {
                method: exp.full[i, 0, 0].detach().to("cpu", torch.float32).numpy()
                for method, exp in result.explanations.items()
            }
            scores = next(iter(result.explanations.values())).scores[i].cpu().numpy()
            facts = decision_facts(scores, target, study.class_names, truth)
            name = f"{study.title}: sample {i}"
            report.add_input(
                name,
                study.display[i],
                maps,
                facts=facts,
                masks={panel: masks[i].astype(np.float32) for panel, masks in study.truth.items()},
            )
            _write_overlays(
                out / "overlays", f"study{index + 1}_sample{i}", name, study, i, maps, facts
            )
        stem = f"study{index + 1}"
        atomic_write_text(out / f"{stem}.md", f"## {study.title}\n\n{comparison_markdown(result)}")
        atomic_write_text(out / f"{stem}.json", comparison_json(result))
        tables.append(f"## {study.title}\n\n{study.note}\n\n{comparison_markdown(result)}")
    atomic_write_text(out / "summary.md", "\n".join(tables))
    return report.write(out / "report.html")


def _write_overlays(
    folder: Path,
    stem: str,
    name: str,
    study: Study,
    i: int,
    maps: dict[str, np.ndarray],
    facts: dict[str, str],
) -> None:
    """Each map of sample ``i`` as ``folder/<stem>_<method>.png``, with its colour bar and the
    model's decision (a volume: its middle slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = study.display[i]
    for method, raw in maps.items():
        heat, scale = scale_map(raw, method)
        lines = [name]
        if heat.ndim == 3:
            middle = heat.shape[0] // 2
            image_2d, heat = image[middle], heat[middle]
            lines = [f"{name}, slice {middle + 1}/{raw.shape[0]}"]
        else:
            image_2d = image
        png = figure_png(image_2d, heat, scale, method=method, lines=lines + fact_lines(facts))
        atomic_write_bytes(folder / f"{stem}_{method}.png", png)
