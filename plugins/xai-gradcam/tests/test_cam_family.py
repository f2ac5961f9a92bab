"""HiResCAM, XGrad-CAM, LayerCAM, EigenCAM, Score-CAM and Ablation-CAM: against pytorch-grad-cam
1.5.7 on a torchvision ResNet-18, against hand-computed tiny cases, on a 3D CNN, and through the
conformance kit; Recipro-CAM (absent from pytorch-grad-cam) against a hand-computed case and a
loop of one masked forward pass per position."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_grad_cam as pgc  # grad-cam==1.5.7, a test-only dependency (the `test` extra)
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction
from torch import nn
from xai_gradcam import AblationCAM, EigenCAM, HiResCAM, LayerCAM, ReciproCAM, ScoreCAM, XGradCAM

import xai_core
from xai_core.core.errors import LayerTypeError
from xai_core.testing import parametrize_with_checks
from xai_core.torch.capture import hook_count

GRADIENT_METHODS = {"hirescam": "HiResCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}
CLASSES = [[3, 7], [1, 3]]  # two targets per sample, run by pytorch-grad-cam one at a time


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correlation of each map (flattened trailing axes) of ``a`` with the same map of ``b``."""
    a, b = a.flatten(2).double(), b.flatten(2).double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def resnet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64)
    return model, x


def reference_raw(
    model: nn.Module, x: torch.Tensor, method: str, layer: str = "layer3"
) -> torch.Tensor:
    """pytorch-grad-cam's maps before its ReLU, min-max and resize (its ``get_cam_image``),
    ``(N, K, h, w)`` for ``CLASSES`` at ``layer`` (``layer3``: 4 x 4 at 64 px)."""
    model = copy.deepcopy(model)
    cam = getattr(pgc, method)(model=model, target_layers=[getattr(model, layer)])
    cam.batch_size = 128  # Score-CAM's masked copies per forward pass (default 16)
    raw = []
    original = cam.get_cam_image
    cam.get_cam_image = lambda *a, **k: raw.append(original(*a, **k)) or raw[-1]
    try:
        for k in range(len(CLASSES[0])):
            cam(input_tensor=x, targets=[ClassifierOutputTarget(c[k]) for c in CLASSES])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.stack(raw, axis=1))


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_equals_pytorch_grad_cam_on_resnet18(resnet, name):
    model, x = resnet
    reference = reference_raw(model, x, GRADIENT_METHODS[name])
    exp = xai_core.explain(model, x, method=name, targets=CLASSES, layer="layer3", relu=False)
    ours = exp.raw[0]
    assert ours.shape == reference.shape == (2, 2, 4, 4)
    assert pearson(ours, reference).min() >= 0.999
    # XGrad-CAM: pytorch-grad-cam divides by sum(A) + 1e-7; sums here are far from 0
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    relu = xai_core.explain(model, x, method=name, targets=CLASSES, layer="layer3")
    torch.testing.assert_close(relu.raw[0], reference.clamp(min=0), rtol=1e-4, atol=1e-5)


def test_eigencam_equals_pytorch_grad_cam_on_resnet18(resnet):
    """pytorch-grad-cam's EigenCAM keeps the sign the SVD happens to return; its
    ``get_2d_projection_with_sign_correction`` fixes it as we do. Ours equals the latter, and
    the former up to sign."""
    model, x = resnet
    reference = reference_raw(model, x, "EigenCAM")  # (N, 2, h, w), same map for both targets
    exp = xai_core.explain(model, x, method="eigencam", targets=CLASSES, layer="layer3",
                           relu=False)
    assert pearson(exp.raw[0], reference).abs().min() >= 0.999
    with torch.no_grad():
        acts = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(
            model.conv1(x)))))))
    corrected = torch.from_numpy(get_2d_projection_with_sign_correction(acts.numpy()))
    torch.testing.assert_close(exp.raw[0], corrected[:, None].expand(-1, 2, -1, -1),
                               rtol=1e-4, atol=1e-4)


# A hand-computed case with gradients that vary over positions:
#   A = conv(x) = (x, -x),  y_c = sum_k W[c, k] mean_ij A_k(i,j)^2 / 2,  so g_k = W[c, k] A_k / 4.
# x = [[1, -2], [3, 2]] (sum 4, sum of squares 18), class 0, W[0] = (2, 1): g = (x/2, -x/4).
#   HiResCAM:  sum_k g_k A_k = x^2/2 + x^2/4 = 3x^2/4
#   LayerCAM:  ReLU(x/2) x + ReLU(-x/4)(-x) = x^2/2 where x > 0, x^2/4 where x < 0
#   XGrad-CAM: alpha = (sum x^2/2 / sum x, sum x^2/4 / sum -x) = (9/4, -9/8): map = 27x/8
#   EigenCAM:  centred rows (x - 1)(1, -1), first direction (1, -1)/sqrt 2: projection
#              sqrt2 (x - 1) = sqrt2 [[0, -3], [2, 1]]; |min| > |max|, so flipped
X = torch.tensor([[[[1.0, -2.0], [3.0, 2.0]]]])
S2 = math.sqrt(2)
HAND = {
    "hirescam": [[0.75, 3.0], [6.75, 3.0]],
    "layercam": [[0.5, 1.0], [4.5, 2.0]],
    "xgradcam": [[27 / 8, -27 / 4], [81 / 8, 27 / 4]],
    "eigencam": [[0.0, 3 * S2], [-2 * S2, -S2]],
}


class SquareHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.pow(2).mean(dim=(2, 3)) / 2)


def tiny() -> nn.Module:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    head = SquareHead()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
        head.fc.weight.copy_(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    return nn.Sequential(conv, head)


@pytest.mark.parametrize("name", list(HAND))
def test_hand_computed(name):
    hand = torch.tensor(HAND[name])[None, None]
    signed = xai_core.explain(tiny(), X, method=name, targets=0, layer="0", relu=False)
    torch.testing.assert_close(signed.raw[0], hand)
    exp = xai_core.explain(tiny(), X, method=name, targets=0, layer="0")
    torch.testing.assert_close(exp.raw[0], hand.clamp(min=0))


def test_xgradcam_channel_summing_to_zero_gets_no_weight():
    """Where sum_ij A_k = 0 the weight is 0, not sum(g A) / 1e-7 as in pytorch-grad-cam."""
    x = torch.tensor([[[[1.0, -1.0], [2.0, -2.0]]]])
    exp = xai_core.explain(tiny(), x, method="xgradcam", targets=0, layer="0", relu=False)
    assert torch.equal(exp.raw[0], torch.zeros(1, 1, 2, 2))


class Net3D(nn.Module):
    """conv -> ReLU -> conv -> squared GAP -> linear: gradients that vary over positions."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.a = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU())
            self.b = nn.Conv3d(4, 5, 3, padding=1)
            self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).relu().pow(2).mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def net3d():
    model = Net3D().eval()
    x = torch.randn(2, 2, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    acts, grads = {}, {}
    with torch.enable_grad():
        a = model.a(x).detach().requires_grad_(True)
        b = model.b(a)
        scores = model.fc(b.relu().pow(2).mean(dim=(2, 3, 4)))
        for c in range(3):
            ga, gb = torch.autograd.grad(scores[:, c].sum(), (a, b), retain_graph=True)
            grads[c] = {"a": ga, "b": gb}
    acts = {"a": a.detach(), "b": b.detach()}
    return model, x, acts, grads


@pytest.mark.parametrize("name", [*GRADIENT_METHODS, "eigencam"])
def test_3d_several_targets_and_layers(net3d, name):
    """pytorch-grad-cam's per-layer formulas are rank-agnostic: applied to gradients from
    autograd, they give the 3D reference for several targets at two layers."""
    model, x, acts, grads = net3d
    targets = [[2, 0], [1, 2]]
    exp = xai_core.explain(model, x, method=name, targets=targets, layers=["a", "b"], relu=False)
    assert exp.maps.shape == (2, 2, 2, 4, 5, 3)  # (N, K, L, *input grid)
    for layer, ours in zip(["a", "b"], exp.raw, strict=True):
        if name == "eigencam":
            ref = get_2d_projection_with_sign_correction(acts[layer].numpy())
            reference = torch.from_numpy(ref)[:, None].expand(-1, 2, -1, -1, -1)
        else:
            cam = getattr(pgc, GRADIENT_METHODS[name])(model=nn.Linear(1, 1), target_layers=[])
            reference = torch.stack([
                torch.stack([
                    torch.from_numpy(cam.get_cam_image(
                        None, None, None, acts[layer][n : n + 1].numpy(),
                        grads[c][layer][n : n + 1].numpy(), False,
                    ))[0]
                    for c in row
                ])
                for n, row in enumerate(targets)
            ])
        assert ours.shape == (2, 2, *acts[layer].shape[2:])
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_scorecam_equals_pytorch_grad_cam_on_resnet18(resnet):
    """At ``layer1`` (64 channels, 16 x 16): the reference runs every masked copy for every
    target, so ``layer3``'s 256 channels would cost ~20 s on one core."""
    model, x = resnet
    reference = reference_raw(model, x, "ScoreCAM", layer="layer1")
    exp = xai_core.explain(model, x, method="scorecam", targets=CLASSES, layer="layer1",
                           relu=False, batch_size=128)
    assert pearson(exp.raw[0], reference).min() >= 0.999
    torch.testing.assert_close(exp.raw[0], reference, rtol=1e-4, atol=1e-5)


# Score-CAM by hand on tiny(): the layer's grid is the input's, so H_k is A_k min-max normalised:
#   H_0 = (x + 2)/5 = [[.6, 0], [1, .8]],  H_1 = (3 - x)/5 = [[.4, 1], [0, .2]].
#   Both channels of conv(X H) have squares (X H)^2, so y_c = (W[c,0] + W[c,1]) mean((X H)^2)/2:
#   mask 0: X H = [[.6, 0], [3, 1.6]], mean square / 2 = 1.49  -> y = (4.47, 5.96)
#   mask 1: X H = [[.4, -2], [0, .4]], mean square / 2 = 0.54  -> y = (1.62, 2.16)
#   class 0, softmax: alpha = softmax(4.47, 1.62); map = (alpha_0 - alpha_1) x = tanh(1.425) x
#   probability:      alpha_k = p_0(mask k) = sigmoid(y_0 - y_1) = (sigmoid(-1.49), sigmoid(-.54))
def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize(
    ("weights", "factor"),
    [("softmax", math.tanh(1.425)), ("probability", sigmoid(-1.49) - sigmoid(-0.54))],
)
def test_scorecam_hand_computed(weights, factor):
    exp = xai_core.explain(tiny(), X, method="scorecam", targets=0, layer="0", relu=False,
                           weights=weights)
    torch.testing.assert_close(exp.raw[0], factor * X)


def scorecam_loop(model: nn.Module, x: torch.Tensor, acts: torch.Tensor, classes) -> torch.Tensor:
    """Score-CAM one sample, one channel at a time (the definition, unbatched)."""
    maps = []
    for n, row in enumerate(classes):
        scores = []
        for a in acts[n]:
            up = nn.functional.interpolate(a[None, None], size=x.shape[2:], mode="trilinear",
                                           align_corners=True)[0, 0]
            mask = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                scores.append(model(x[n : n + 1] * mask)[0, row])
        alpha = torch.stack(scores).softmax(dim=0)  # (C, K)
        maps.append(torch.einsum("ck,c...->k...", alpha, acts[n]))
    return torch.stack(maps)


def test_scorecam_3d_several_targets_layers_and_batch_sizes(net3d):
    model, x, acts, _ = net3d
    targets = [[2, 0], [1, 2]]
    exp = xai_core.explain(model, x, method="scorecam", targets=targets, layers=["a", "b"],
                           relu=False, batch_size=3)  # 3 does not divide 2 x 4 or 2 x 5 rows
    for layer, ours in zip(["a", "b"], exp.raw, strict=True):
        torch.testing.assert_close(ours, scorecam_loop(model, x, acts[layer], targets))
    increase = xai_core.explain(model, x, method="scorecam", targets=targets, layers=["a", "b"],
                                relu=False, weights="increase")
    probability = xai_core.explain(model, x, method="scorecam", targets=targets,
                                   layers=["a", "b"], relu=False, weights="probability")
    with torch.no_grad():
        base = model(torch.zeros_like(x)).softmax(dim=1).gather(1, torch.tensor(targets))
    for layer, inc, prob in zip(["a", "b"], increase.raw, probability.raw, strict=True):
        # alpha_k - p_c(X_b): the map moves by -p_c(X_b) sum_k A_k
        shift = base[(...,) + (None,) * 3] * acts[layer].sum(dim=1, keepdim=True)
        torch.testing.assert_close(inc, prob - shift)
    whole = xai_core.explain(model, x, method="scorecam", targets=targets, layers=["a", "b"],
                             relu=False, batch_size=64)
    for a, b in zip(exp.raw, whole.raw, strict=True):
        torch.testing.assert_close(a, b)


# -- Ablation-CAM and Recipro-CAM ---------------------------------------------------------------


def test_ablationcam_equals_pytorch_grad_cam_on_resnet18(resnet):
    """At ``layer1`` (64 channels, post-ReLU, so pytorch-grad-cam's AblationLayer also sets the
    channel to 0) on 32 px: its loop runs the whole model for every channel of every target."""
    model, x = resnet
    x = x[..., :32, :32]
    reference = reference_raw(model, x, "AblationCAM", layer="layer1")
    exp = xai_core.explain(model, x, method="ablationcam", targets=CLASSES, layer="layer1",
                           relu=False, batch_size=50)  # 50 does not divide 64 copies
    assert exp.raw[0].shape == (2, 2, 8, 8)
    assert pearson(exp.raw[0], reference).min() >= 0.999
    # (y - y_k) / y cancels: float32 noise of other batch sizes shows at ~1e-4 of the map
    scale = float(reference.abs().max())
    torch.testing.assert_close(exp.raw[0], reference, rtol=1e-4, atol=1e-4 * scale)


# Ablation-CAM by hand on tiny(): y_c = (W[c,0] + W[c,1]) mean(x^2)/2 with mean(x^2)/2 = 2.25.
#   class 0: y = 3 x 2.25; channel 0 ablated: 1 x 2.25, channel 1 ablated: 2 x 2.25
#   w = (2/3, 1/3): map = 2/3 x + 1/3 (-x) = x/3
def test_ablationcam_hand_computed():
    exp = xai_core.explain(tiny(), X, method="ablationcam", targets=0, layer="0", relu=False)
    torch.testing.assert_close(exp.raw[0], X / 3)
    relu = xai_core.explain(tiny(), X, method="ablationcam", targets=0, layer="0")
    torch.testing.assert_close(relu.raw[0], (X / 3).clamp(min=0))


def test_ablationcam_target_scoring_exactly_zero_gets_no_weight():
    """W[1] = (1, -1): y_1 = 0 for every input; the relative drop is undefined, the weights are
    0 (pytorch-grad-cam divides by 0)."""
    model = tiny()
    with torch.no_grad():
        model[1].fc.weight[1] = torch.tensor([1.0, -1.0])
    exp = xai_core.explain(model, X, method="ablationcam", targets=1, layer="0", relu=False)
    assert torch.equal(exp.raw[0], torch.zeros(1, 1, 2, 2))


# Recipro-CAM by hand on tiny(), "point": only position p kept, A = (x_p, -x_p) there, so
#   y_c = (W[c,0] + W[c,1]) x_p^2 / 8 and p_0 = sigmoid(y_0 - y_1) = sigmoid(-x_p^2 / 8).
def test_reciprocam_hand_computed():
    exp = xai_core.explain(tiny(), X, method="reciprocam", targets=0, layer="0")
    torch.testing.assert_close(exp.raw[0], torch.sigmoid(-X.pow(2) / 8))


def gaussian_mask(grid: tuple[int, ...], p: tuple[int, ...]) -> torch.Tensor:
    """The authors' neighbourhood mask, written out: 1/4, 1/2, 1/4 per axis around ``p``,
    clipped at the grid's border."""
    mask = torch.zeros(grid)
    for offset in np.ndindex(*(3,) * len(grid)):
        q = tuple(pi + o - 1 for pi, o in zip(p, offset, strict=True))
        if all(0 <= qi < g for qi, g in zip(q, grid, strict=True)):
            mask[q] = math.prod((0.25, 0.5, 0.25)[o] for o in offset)
    return mask


def reciprocam_loop(model: nn.Module, layer: nn.Module, x: torch.Tensor, acts: torch.Tensor,
                    classes, kernel: str) -> torch.Tensor:
    """Recipro-CAM by definition: one forward pass of one sample per position, the layer's
    output replaced by a masked copy, the target's softmax probability read off."""
    grid = tuple(acts.shape[2:])
    maps = torch.zeros(len(classes), len(classes[0]), *grid)
    for n, row in enumerate(classes):
        for p in np.ndindex(*grid):
            if kernel == "point":
                mask = torch.zeros(grid)
                mask[p] = 1.0
            else:
                mask = gaussian_mask(grid, p)
            handle = layer.register_forward_hook(lambda m, i, o, mask=mask: o * mask)
            try:
                with torch.no_grad():
                    probs = model(x[n : n + 1]).softmax(dim=1)[0]
            finally:
                handle.remove()
            maps[(n, slice(None), *p)] = probs[row]
    return maps


@pytest.mark.parametrize("kernel", ["point", "gaussian"])
def test_reciprocam_3d_several_targets_and_layers_against_loop(net3d, kernel):
    model, x, acts, _ = net3d
    targets = [[2, 0], [1, 2]]
    exp = xai_core.explain(model, x, method="reciprocam", targets=targets, layers=["a", "b"],
                           kernel=kernel, batch_size=7)  # 7 does not divide 2 x 60 copies
    assert exp.maps.shape == (2, 2, 2, 4, 5, 3)
    for name, ours in zip(["a", "b"], exp.raw, strict=True):
        layer = getattr(model, name)
        torch.testing.assert_close(ours, reciprocam_loop(model, layer, x, acts[name], targets,
                                                         kernel))


def ablation_loop(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes) -> torch.Tensor:
    """Ablation-CAM by definition: one forward pass of one sample per channel."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        scores = model(x)
    handle.remove()
    acts, maps = seen[0], []
    for n, row in enumerate(classes):
        y = scores[n, row]
        weights = []
        for k in range(acts.shape[1]):
            keep = torch.ones(acts.shape[1], *([1] * (acts.ndim - 2)))
            keep[k] = 0
            handle = layer.register_forward_hook(lambda m, i, o, keep=keep: o * keep)
            with torch.no_grad():
                weights.append((y - model(x[n : n + 1])[0, row]) / y)
            handle.remove()
        maps.append(torch.einsum("ck,c...->k...", torch.stack(weights), acts[n]))
    return torch.stack(maps)


def test_ablationcam_3d_several_targets_and_layers_against_loop(net3d):
    model, x, _, _ = net3d
    targets = [[2, 0], [1, 2]]
    exp = xai_core.explain(model, x, method="ablationcam", targets=targets, layers=["a", "b"],
                           relu=False, batch_size=3)
    for name, ours in zip(["a", "b"], exp.raw, strict=True):
        torch.testing.assert_close(ours, ablation_loop(model, getattr(model, name), x, targets))


class BatchBound(nn.Module):
    """A model whose code after ``mid`` depends on the batch it was given: the batch size read
    at the top and an early tensor concatenated late. Edited copies of ``mid``'s output cannot
    simply go on through the rest with more rows than the input had."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.mid = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(7 * 16, 3)
        self.stem_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        early = self.stem(x)
        self.stem_rows += n
        late = torch.cat([early, self.mid(early)], dim=1)  # (n, 7, 4, 4)
        return self.fc(late.reshape(n, -1))


def test_layer_edits_fall_back_to_repeated_inputs_and_leave_no_trace():
    model = BatchBound().eval()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    targets = [[0, 2], [1, 0]]
    for kernel in ("point", "gaussian"):
        exp = xai_core.explain(model, x, method="reciprocam", targets=targets, layer="mid",
                               kernel=kernel)
        torch.testing.assert_close(exp.raw[0], reciprocam_loop(model, model.mid, x,
                                                               torch.zeros(2, 4, 4, 4),
                                                               targets, kernel))
    exp = xai_core.explain(model, x, method="ablationcam", targets=targets, layer="mid",
                           relu=False)
    torch.testing.assert_close(exp.raw[0], ablation_loop(model, model.mid, x, targets))
    assert hook_count(model) == 0 and not model.training


def test_layers_before_the_edited_one_run_once_per_sample(net3d):
    """On a model that lets it, the copies are made after the layer: ``a`` sees each sample
    once per forward pass (60 positions, 32 copies per pass: 2 passes per sample), never the
    copies."""
    model, x, _, _ = net3d
    rows = []
    handle = model.a.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        xai_core.explain(model, x, method="reciprocam", targets=0, layer="b", batch_size=32)
    finally:
        handle.remove()
    assert rows == [2] + [1] * 4  # the recording pass, then 2 x 2 edited passes


class Residual(nn.Module):
    """``stem(x) + mid(stem(x))``: the tensor added after ``mid`` comes from before it."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.mid = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(3, 4)
        self.stem_rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = self.stem(x)
        self.stem_rows.append(x.shape[0])
        return self.fc((early + self.mid(early)).mean(dim=(2, 3)))


def test_a_residual_after_the_layer_broadcasts_over_the_copies():
    model = Residual().eval()
    x = torch.randn(2, 1, 5, 4, generator=torch.Generator().manual_seed(3))
    targets = [[0, 3], [2, 1]]
    exp = xai_core.explain(model, x, method="reciprocam", targets=targets, layer="mid",
                           kernel="gaussian")
    assert model.stem_rows[:3] == [2, 1, 1]  # recorded once, then one pass per sample
    model.stem_rows.clear()
    torch.testing.assert_close(exp.raw[0], reciprocam_loop(model, model.mid, x,
                                                           torch.zeros(2, 3, 5, 4),
                                                           targets, "gaussian"))
    exp = xai_core.explain(model, x, method="ablationcam", targets=targets, layer="mid",
                           relu=False)
    torch.testing.assert_close(exp.raw[0], ablation_loop(model, model.mid, x, targets))


def test_layer_edits_on_an_onnx_export_equal_the_module():
    """The ONNX adapter re-runs the graph's tail in torch on the edited copies; the residual
    from before ``mid`` is a feed of the tail, repeated per copy."""
    from xai_core.onnx.adapter import OnnxAdapter
    from xai_core.testing.models import onnx_bytes

    model = Residual().eval()
    x = torch.randn(2, 1, 5, 4, generator=torch.Generator().manual_seed(3))
    onnx = OnnxAdapter(onnx_bytes(model, x), providers=["CPUExecutionProvider"])
    layer = next(n for n in onnx.layer_names() if n.startswith("/mid/") and "Relu" in n)
    targets = [[0, 3], [2, 1]]
    cases = (("ablationcam", {"relu": False}), ("reciprocam", {"kernel": "gaussian"}))
    for method, options in cases:
        ours = xai_core.explain(onnx, x, method=method, targets=targets, layer=layer, **options)
        torch_ = xai_core.explain(model, x, method=method, targets=targets, layer="mid", **options)
        torch.testing.assert_close(ours.raw[0], torch_.raw[0], rtol=1e-4, atol=1e-5)


def test_reciprocam_on_vit_tokens_masks_patches_and_keeps_the_class_token():
    """Tokens ``(N, 1 + 16, C)``: each copy keeps the class token and one patch token."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                  patch_size=8, depth=2, embed_dim=16, num_heads=2,
                                  num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    exp = xai_core.explain(model, x, method="reciprocam", targets=[[2, 0], [1, 1]],
                           layer="blocks.1.norm1")
    assert exp.raw[0].shape == (2, 2, 4, 4)
    reference = torch.zeros(2, 2, 4, 4)
    layer = model.blocks[1].norm1
    for n, row in enumerate([[2, 0], [1, 1]]):
        for p in range(16):
            keep = torch.zeros(17, 1)
            keep[0] = keep[1 + p] = 1.0
            handle = layer.register_forward_hook(lambda m, i, o, keep=keep: o * keep)
            with torch.no_grad():
                probs = model(x[n : n + 1]).softmax(dim=1)[0]
            handle.remove()
            reference[n, :, p // 4, p % 4] = probs[row]
    torch.testing.assert_close(exp.raw[0], reference)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["ablationcam", "reciprocam"])
def test_editing_a_layer_called_twice_is_refused(method):
    model = Twice().eval()
    with pytest.raises(LayerTypeError, match="more than once"):
        xai_core.explain(model, torch.randn(1, 3, 4, 4), method=method, targets=0, layer="conv")
    assert hook_count(model) == 0


# The kit's evidence CNN has logits of at most 0.06 (means over a 32 x 48 map): masked copies
# move them by a few hundredths, so softmax weights and class probabilities are near uniform
# over the two channels and both squares get almost the same mass (0.133 vs 0.133). Weights that
# subtract the baseline's probability ("increase") are class-discriminative there and pass.
SCORECAM_FLAT = "near-uniform weights where masking moves the logits by ~0.01 (docs)"
# Recipro-CAM's map is a probability: on that CNN every position scores ~1/3 (3 classes, logits
# <= 0.06) and the evidence square is higher by ~1e-4 (0.33233 vs 0.33222), right in sign but
# under the kit's 5 % of the map's height. Its ranking of positions is what counts (docs).
RECIPROCAM_OFFSET = "a probability map: 1/3 everywhere plus ~1e-4 where the evidence is (docs)"


@parametrize_with_checks(
    [
        HiResCAM,
        XGradCAM,
        LayerCAM,
        (LayerCAM, {"options": {"relu": False}}),
        (ScoreCAM, {"expected_failures": {"targets_honoured": SCORECAM_FLAT}}),
        (
            ScoreCAM,
            {
                "options": {"weights": "probability", "batch_size": 5},
                "expected_failures": {"targets_honoured": SCORECAM_FLAT},
            },
        ),
        (ScoreCAM, {"options": {"weights": "increase"}}),
        AblationCAM,
        (AblationCAM, {"options": {"relu": False, "batch_size": 5}}),
        (ReciproCAM, {"expected_failures": {"sign": RECIPROCAM_OFFSET}}),
        (
            ReciproCAM,
            {
                "options": {"kernel": "gaussian", "batch_size": 5},
                "expected_failures": {"sign": RECIPROCAM_OFFSET},
            },
        ),
        (
            EigenCAM,
            {"expected_failures": {
                "targets_honoured": "EigenCAM is class-agnostic: one map for every target",
                # the first principal component is the layer's dominant pattern, which on the
                # kit's model may be another class's evidence than the one asked for
                "sign": "EigenCAM is class-agnostic: it need not point at class 0's evidence",
            }},
        ),
    ]
)
def test_conforms(check):
    check()
