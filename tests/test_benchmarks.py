"""The benchmark command (benchmarks/run.py) runs on its tiny configuration and prints every row.

Timings are never asserted: they depend on the machine. What is checked is that the command
still runs against the current plugins and peers, and that its tables keep their rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"

QUICK_ROWS = [
    *(
        f"occlusion/{model}/{window}/{k}"
        for model in ("resnet18", "densenet121")
        for window in ("w16s8", "w32s16")
        for k in ("k1", "k5")
    ),
    "occlusion-onnx/resnet18/w32s16/k1",
    "memory/occlusion/resnet18/w32s16",
    "memory/occlusion/densenet121/w32s16",
    "gradcam/densenet121/b2",
    "cam/resnet18/b2",
    "cam/densenet121/b2",
    "rollout/vit_b_16/b2",
    "occlusion3d/conv3d/k1",
    "occlusion3d/conv3d/k5",
    "gradcam3d/conv3d/b1",
    "integrated-gradients/resnet18/b2/k1",
    "integrated-gradients/resnet18/b2/k5",
    *(
        f"incremental/{case}/{mode}"
        for case in (
            "resnet18/96px/w16s8",
            "densenet121/96px/w16s16",
            "r3d_18/4x32x32px/w4x16x16s4x8x8",
        )
        for mode in ("exact", "approximate", "adaptive")
    ),
]
PEERS = [
    "captum Occlusion (default ppe=1)",
    "captum Occlusion (ppe=32)",
    "MONAI OcclusionSensitivity (n_batch=32)",
    "pytorch-grad-cam GradCAM",
    "captum LayerGradCam",
    "captum IntegratedGradients",
]


def bench(*args: str, env: dict[str, str] | None = None, script: Path = SCRIPT) -> str:
    """stdout of a benchmark script on its quick configuration, one thread; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(output: str) -> dict[str, list[list[str]]]:
    """Row id -> the cells of every table line with that id."""
    rows: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith("| row "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], []).append(cells)
    return rows


@pytest.mark.slow
def test_quick_benchmark_prints_every_row():
    output = bench()
    for heading in ("vs its bound", "vs peers", "Peak memory"):
        assert heading in output
    assert "threads 1" in output and "torch " in output
    rows = table_rows(output)
    assert set(QUICK_ROWS) <= set(rows), set(QUICK_ROWS) - set(rows)
    for peer in PEERS:  # a peer row holds a time or says why not: never missing
        assert peer in output
    assert "failed" not in output, output
    # Every target is printed next to its ratio.
    assert "<= 1.1x" in output and ">= 4x" in output and "<= 1.2x" in output


def test_list_and_only_select_cases():
    listed = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "gradcam/densenet121" in listed and "memory/occlusion/densenet121" in listed
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "no-such-case"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--list" in done.stderr


def test_runs_without_the_peers(tmp_path):
    """Without the [bench] extra every peer row says 'not installed' and the rest still runs."""
    for name in ("captum", "monai", "pytorch_grad_cam"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    output = bench("--only", "gradcam/densenet121,occlusion3d", env=env)
    rows = table_rows(output)
    peer_cells = [
        cells
        for lines in rows.values()
        for cells in lines
        if any(cells[3].startswith(peer) for peer in PEERS)
    ]
    assert len(peer_cells) == 4
    assert all(cells[5] == "not installed" for cells in peer_cells)
    assert "gradcam/densenet121/b2" in rows and "occlusion3d/conv3d/k1" in rows
    assert "not installed" in output and "captum not installed" in output


@pytest.mark.slow
def test_incremental_benchmark_runs_on_a_state_dict_and_an_xray(tmp_path):
    """benchmarks/incremental_occlusion.py, as run for the trained-model rows of
    docs/performance.md: a state dict with its own class count, the demo X-ray input."""
    import torchvision

    weights = tmp_path / "resnet18_xray.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), weights)
    out = tmp_path / "rows.json"
    stdout = bench(
        *("--only", "resnet18", "--input", "xray", "--weights", f"resnet18={weights}"),
        *("--json", str(out)),
        script=ROOT / "benchmarks" / "incremental_occlusion.py",
    )
    (row,) = json.loads(out.read_text())
    assert row["case"].startswith("resnet18/96px") and row["windows"] == 121
    for key in ("exact_ratio", "approximate_ratio", "adaptive_ratio"):
        assert row[key] > 0
    assert -1 <= row["approximate_rho"] <= 1 and -1 <= row["adaptive_rho"] <= 1
    assert "| resnet18/96px/w16s8 | 121 |" in stdout
