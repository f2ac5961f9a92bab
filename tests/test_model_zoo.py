"""The model-zoo matrix: every local method on 40+ architectures, built the ways users build them.

Every pair gives finite maps on the input grid or a typed not-applicable answer (see
``scripts/model_matrix.py``); Grad-CAM and CAM agree with a hand-written reference at the same
layer on every CNN; occlusion on ONNX exports agrees with occlusion on the PyTorch models; and
``docs/models.md`` is exactly the table the script writes from this run.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core import InputSpec
from xai_core.core.errors import InputError, ModelError, OptionError
from xai_core.torch.adapter import TorchAdapter
from xai_core.torch.capture import hook_count

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("model_matrix", ROOT / "scripts" / "model_matrix.py")
mm = importlib.util.module_from_spec(_spec)
sys.modules["model_matrix"] = mm  # dataclasses look their module up while it loads
_spec.loader.exec_module(mm)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::UserWarning",
    "ignore::torch.jit.TracerWarning",
)

# Outcomes of every architecture run so far, for the docs check at the end.
ROWS: dict[str, dict[str, mm.Outcome]] = {}
# Occlusion on these is compared with occlusion on their ONNX export.
ONNX = {
    "torchvision:resnet18",
    "timm:tf_efficientnet_b0",
    "timm:mobilenetv3_small_050",
    "timm:regnetx_002",
    "custom:functional GAP",
    "torchvision:vit (2 blocks)",
}


def scores_of(output):
    if isinstance(output, dict):
        return output["logits"]
    return getattr(output, "logits", output)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if float(b.std()) == 0.0:  # a constant reference (ReLU of an all-negative map)
        return 1.0 if torch.allclose(a, b, atol=1e-6) else 0.0
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def reference_gradcam(model, x, layer: str, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by hand: hook, autograd.grad, weights = mean gradient, ReLU of the sum."""
    module = dict(model.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        scores = scores_of(model(x.detach().requires_grad_(True)))
    finally:
        handle.remove()
    acts = seen[-1]
    (grads,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), acts)
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)
    return (weights * acts).sum(1).clamp(min=0).detach()


def reference_cam(model, x, e) -> torch.Tensor:
    """CAM by hand: the head's weight rows times the features fed into global pooling; with a
    layer norm between pooling and head, its gamma and the pooled vector's mean and deviation
    (see the CAM plugin's docstring)."""
    layer, head, targets = e.layers[0], e.details["head"], e.targets[:, 0]
    modules = dict(model.named_modules())
    seen = []
    handle = modules[layer].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    features = seen[-1].clamp(min=0) if e.details["relu"] else seen[-1]
    weights = modules[head].weight[targets]  # (N, C)
    if "norm" in e.details:
        norm = modules[e.details["norm"]]
        pooled = features.mean((2, 3))
        mu, sigma = pooled.mean(1), (pooled.var(1, unbiased=False) + norm.eps).sqrt()
        weights = weights * norm.weight / sigma[:, None]
        features = features - mu[:, None, None, None]
    return torch.einsum("nc,nc...->n...", weights, features).detach()


def snapshot(model: nn.Module) -> tuple:
    """Everything an explanation must leave as it found it: parameters and buffers, training
    flags, requires_grad, grads, hooks, and plain settings (timm's ``fused_attn``, say)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [(n, m.training) for n, m in model.named_modules()]
    params = [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    plain = (bool, int, float, str, type(None))
    settings = [
        (n, sorted((k, v) for k, v in vars(m).items() if isinstance(v, plain)))
        for n, m in model.named_modules()
    ]
    return tensors, flags, params, hook_count(model), settings


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["scores"],
        dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}},
        dynamo=False,
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", mm.ZOO, ids=mm.arch_id)
def test_every_method_gives_a_map_or_says_why_not(arch, tmp_path):
    model, x = mm.build(arch)
    before = snapshot(model)
    row = ROWS[mm.arch_id(arch)] = mm.run_row(model, x)
    failed = {c: o.reason for c, o in row.items() if o.status == "failed"}
    assert not failed, f"{mm.arch_id(arch)}: {failed}"
    after = snapshot(model)
    assert after[1:] == before[1:], "mode, grads, hooks or module settings changed"
    for name, tensor in before[0].items():
        assert torch.equal(after[0][name], tensor), f"{name} changed"
    assert row["occlusion"].status == "ok"  # model-agnostic: runs on everything

    if arch.family.endswith("CNN") and not isinstance(model, torch.jit.ScriptModule):
        gradcam = row["gradcam"].explanation
        assert gradcam is not None, row["gradcam"].reason
        expected = reference_gradcam(model, x, gradcam.layers[0], gradcam.targets[:, 0])
        assert pearson(gradcam.raw[0][:, 0], expected) >= 0.99
    if row["cam"].status == "ok":  # every CNN, and the hybrids CAM runs on
        e = row["cam"].explanation
        assert pearson(e.raw[0][:, 0], reference_cam(model, x, e)) >= 0.99

    if mm.arch_id(arch) in ONNX:
        path = export_onnx(model, x, tmp_path / "model.onnx")
        options = mm.occlusion_options(tuple(x.shape[2:]))
        on_onnx = xai_core.explain(path, x.contiguous(), method="occlusion", **options).maps
        on_torch = row["occlusion"].explanation.maps
        scale = float(on_torch.abs().max()) or 1.0
        torch.testing.assert_close(on_onnx / scale, on_torch / scale, atol=1e-4, rtol=0)


def test_zoo_has_enough_architectures():
    assert len(mm.ZOO) >= 30
    assert {a.source for a in mm.ZOO} >= {"timm", "transformers", "torchvision", "custom"}
    assert len({mm.arch_id(a) for a in mm.ZOO}) == len(mm.ZOO)


@pytest.mark.slow
def test_docs_models_page_is_what_the_script_writes():
    """Runs last in this file: reuses the rows above, runs the architectures not run yet."""
    for arch in mm.ZOO:
        if mm.arch_id(arch) not in ROWS:
            ROWS[mm.arch_id(arch)] = mm.run_arch(arch)[2]
    expected = mm.render(ROWS, mm.ZOO)
    assert mm.DOCS.read_text() == expected, "run `python scripts/model_matrix.py` and commit"


# -- the adapter: no model rejected for how it is built ------------------------------------------


def test_conv2d_subclass_is_a_2d_model():
    """EfficientNet-Lite ports subclass nn.Conv2d; the exact-type lookup raised KeyError."""
    adapter = xai_core.adapt(mm.LiteNet())
    assert (adapter.input_spec.rank, adapter.input_spec.channels) == (4, 3)
    e = xai_core.explain(mm.LiteNet(), torch.randn(2, 3, 32, 32), method="gradcam")
    assert e.maps.shape == (2, 32, 32)


def test_duck_typed_convolution_gives_the_rank():
    class Conv(nn.Module):  # not an nn.Conv*: a research repo's own convolution
        def __init__(self):
            super().__init__()
            self.in_channels = 2
            self.weight = nn.Parameter(torch.randn(4, 2, 3, 3, 3))

        def forward(self, x):
            return F.conv3d(x, self.weight).mean((2, 3, 4))

    spec = xai_core.adapt(Conv()).input_spec
    assert (spec.rank, spec.channels) == (5, 2)


class SideFirst(nn.Module):
    """Its first registered convolution is not the one that reads the input."""

    def __init__(self):
        super().__init__()
        self.refine = nn.Conv2d(8, 8, 1)  # registered first, runs second
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.refine(self.stem(x)).mean((2, 3)))


def test_input_spec_states_what_the_model_takes():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(InputError, match="8 input channels"):
        xai_core.explain(SideFirst(), x, method="occlusion")
    spec = InputSpec(rank=4, channels=3)
    e = xai_core.explain(SideFirst(), x, method="occlusion", input_spec=spec)
    assert e.maps.shape == (1, 16, 16)
    adapter = TorchAdapter(SideFirst(), input_spec=spec)
    assert adapter.input_spec == InputSpec(4, 3, dtype=torch.float32)  # dtype still read
    with pytest.raises(OptionError, match="InputSpec"):
        TorchAdapter(SideFirst(), input_spec=(4, 3))


def test_an_adapter_crash_is_not_reported_as_a_wrong_model_type(fresh_registry, monkeypatch):
    def broken(self, module, *, input_spec=None):
        raise KeyError("Conv2dSame")

    monkeypatch.setattr(TorchAdapter, "__init__", broken)
    with pytest.raises(ModelError) as info:
        xai_core.adapt(mm.LiteNet())
    assert "KeyError" in str(info.value) and "torch.nn.Module" not in str(info.value)


def test_same_padding_conv_matches_tensorflow_shapes():
    """The zoo's own Conv2dSame is a faithful 'same' convolution (ceil(size / stride))."""
    conv = mm.Conv2dSame(3, 4, 3, stride=2)
    assert conv(torch.randn(1, 3, 15, 15)).shape[-1] == math.ceil(15 / 2)
