"""The kit's tiny models and inputs: a small CNN, a model with known evidence, an ONNX export."""

from __future__ import annotations

import functools
import io
import warnings

import torch
from torch import nn

from xai_core.testing.runner import SkipCheck

# Two evidence squares on a non-square image (rows, columns; stop excluded), for each sample:
# class 0 is read from a red square, class 1 from a green one. A map on a transposed or wrong
# grid, for the wrong class or with the wrong sign puts its mass in the wrong place.
EVIDENCE_SIZE = (32, 48)
EVIDENCE_BOXES = (
    {0: ((4, 14), (4, 16)), 1: ((18, 30), (30, 44))},
    {0: ((18, 28), (32, 44)), 1: ((2, 14), (6, 20))},
)


def tiny_cnn(dims: int = 2, channels: int = 3, classes: int = 4, seed: int = 0) -> nn.Module:
    """A small conv -> BatchNorm -> ReLU -> conv -> ReLU -> GAP -> linear network."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        conv(channels, 6, 3, padding=1),
        norm(6),
        nn.ReLU(),
        conv(6, 8, 3, padding=1),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so restoring them is tested
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def evidence_cnn() -> nn.Module:
    """conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> GAP -> linear, weights set by hand.

    Feature 0 fires on a bright red patch, feature 1 on a bright green one, nowhere else (a bias
    of -0.5 silences the dim background); class 0's logit is ``2 * mean(feature 0)``, class 1's
    ``mean(feature 1)``, class 2 a constant. So on :func:`evidence_inputs` class 0 is the top
    class, and the evidence of each class lies in its square only: every attribution method
    (gradients, Grad-CAM, CAM, occlusion) must put its highest values there.
    """
    model = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[0].weight[0, 0] = 1 / 9  # the red channel's 3x3 mean
        model[0].weight[1, 1] = 1 / 9  # the green channel's
        model[0].bias.fill_(-0.5)
        model[2].weight[:, :, 0, 0] = torch.eye(2)
        model[6].weight[:2] = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        model[6].bias[2] = 0.01
    return model.eval()


def evidence_inputs() -> torch.Tensor:
    """Two (3, 32, 48) images: a dim noisy background and the two squares of EVIDENCE_BOXES."""
    generator = torch.Generator().manual_seed(0)
    n, (h, w) = len(EVIDENCE_BOXES), EVIDENCE_SIZE
    x = 0.1 * torch.rand(n, 3, h, w, generator=generator)
    for i, boxes in enumerate(EVIDENCE_BOXES):
        for cls, ((r0, r1), (c0, c1)) in boxes.items():
            x[i, cls, r0:r1, c0:c1] = 1.0
    return x


def evidence_masks(cls: int) -> torch.Tensor:
    """(N, H, W) bool: where class ``cls``'s square is in each sample."""
    masks = torch.zeros(len(EVIDENCE_BOXES), *EVIDENCE_SIZE, dtype=torch.bool)
    for i, boxes in enumerate(EVIDENCE_BOXES):
        (r0, r1), (c0, c1) = boxes[cls]
        masks[i, r0:r1, c0:c1] = True
    return masks


@functools.cache
def _default_onnx() -> bytes:
    with torch.random.fork_rng(devices=[]):  # tiny_cnn seeds; the caller's RNG stays
        model = tiny_cnn()
    return onnx_bytes(model, torch.zeros(2, 3, 16, 16))


def onnx_bytes(model: nn.Module | None = None, example: torch.Tensor | None = None) -> bytes:
    """``model`` (default: :func:`tiny_cnn`) exported to ONNX with a dynamic batch axis, as
    bytes; :class:`SkipCheck` with the exporter's reason when it cannot be exported."""
    if model is None:
        return _default_onnx()
    buffer = io.BytesIO()
    try:
        import onnx  # noqa: F401  - the exporter needs it; say so instead of a deep ImportError
    except ImportError as exc:
        raise SkipCheck(f"ONNX export needs the onnx package ({exc}).") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes are not the tested plugin's
            torch.onnx.export(  # exports in eval mode and restores the model's training flags
                model,
                (example,),
                buffer,
                input_names=["x"],
                output_names=["scores"],
                dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}},
                dynamo=False,
            )
    except Exception as exc:  # any exporter failure means: this model cannot be tested on ONNX
        reason = f"the model could not be exported to ONNX: {type(exc).__name__}: {exc}"
        raise SkipCheck(reason) from exc
    return buffer.getvalue()
