"""Capabilities are protocols: an adapter that is not an nn.Module wrapper gets every method
whose protocols it implements, with the same maps as the equivalent PyTorch module; one that
declares a capability without its protocol gets a typed error, not an AttributeError."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xai_core
from xai_core.core.adapters import (
    AttentionAccess,
    AttentionGradientResult,
    AttentionGradients,
    ClassifierHead,
    InputSpec,
    LayerAccess,
    LayerGradientResult,
    LayerGradients,
    LayerRecord,
    ModelAdapter,
    ParameterRandomization,
    protocol_gaps,
)
from xai_core.core.errors import (
    AdapterProtocolError,
    CapabilityError,
    LayerTypeError,
    UnknownLayerError,
)
from xai_core.core.registry import PluginWarning
from xai_core.core.tags import Capability
from xai_core.core.targets import Targets
from xai_core.torch.capture import record_attention

Hook = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def _grads(chosen: torch.Tensor, tensors: list[torch.Tensor]) -> Iterator[tuple]:
    """d chosen[:, k] / d tensors, one backward per target (what a framework's gradient pass
    gives; written here without xai_core.torch, as a third party would)."""
    for k in range(chosen.shape[1]):
        last = k == chosen.shape[1] - 1
        yield torch.autograd.grad(
            chosen[:, k].sum(), tensors, retain_graph=not last, allow_unused=True
        )


# -- a CNN computed with torch.nn.functional on its own weight tensors ------------------------


class FunctionalCNN(ModelAdapter):
    """conv 3->4, ReLU, conv 4->6, ReLU, global average pooling, linear 6->3: no nn.Module."""

    kind = "functional-cnn"
    capabilities = frozenset(
        {Capability.FORWARD, Capability.GRADIENTS, Capability.LAYERS, Capability.CLASSIFIER_WEIGHTS}
    )
    input_spec = InputSpec(rank=4, channels=3)
    LAYERS = ("conv1", "act1", "conv2", "act2", "fc")

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params

    def _run(self, x: torch.Tensor, tap: Hook | None = None) -> torch.Tensor:
        p = self.params
        tap = tap or (lambda name, out, inp: out)
        h = tap("conv1", F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1), x)
        h = tap("act1", F.relu(h), h)
        h = tap("conv2", F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1), h)
        h = tap("act2", F.relu(h), h)
        z = h.mean(dim=(2, 3))
        return tap("fc", F.linear(z, p["fc.weight"], p["fc.bias"]), z)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._run(inputs)

    # LayerAccess
    def layer_names(self) -> list[str]:
        return list(self.LAYERS)

    def layer_names_of(self, spec) -> list[str]:
        items = [spec] if isinstance(spec, str) else spec
        if not isinstance(items, list | tuple) or not items:
            raise LayerTypeError(f"a layer name or a list of names; got {spec!r}")
        for item in items:
            if item not in self.LAYERS:
                raise UnknownLayerError(f"no layer {item!r}")
        return list(items)

    def default_layer(self, inputs: torch.Tensor) -> str:
        return "act2"

    def extra_tokens(self) -> int | None:
        return None

    def record_layers(self, inputs, layers, *, inputs_of=()) -> LayerRecord:
        order, fed = [], []

        def tap(name, out, inp):
            if name in layers:
                order.append((name, out.detach()))
            if name in inputs_of:
                fed.append((name, inp.detach()))
            return out

        with torch.no_grad():
            scores = self._run(inputs, tap)
        return LayerRecord(scores, order, fed)

    # LayerGradients
    def layer_gradients(self, inputs, layers, targets: Targets) -> LayerGradientResult:
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

        def tap(name, out, inp):
            if name in outputs:
                outputs[name].append(out)
            return out

        with torch.enable_grad():
            scores = self._run(inputs.detach().requires_grad_(True), tap)
        chosen = targets.resolve(scores).select(scores)
        acts = {name: calls[-1] for name, calls in outputs.items()}
        grads = (dict(zip(acts, g, strict=True)) for g in _grads(chosen, list(acts.values())))
        return LayerGradientResult(
            scores.detach(),
            {n: a.detach() for n, a in acts.items()},
            {n: len(c) for n, c in outputs.items()},
            grads,
        )

    # ClassifierHead
    def linear_layers(self) -> list[str]:
        return ["fc"]

    def linear_weights(self, layer: str):
        return self.params[f"{layer}.weight"], self.params[f"{layer}.bias"]

    def norm_parameters(self, layer: str):
        return None

    # ParameterRandomization
    def parameter_layers(self, inputs: torch.Tensor) -> list[str]:
        return ["fc", "conv2", "conv1"]

    def randomizable_copy(self) -> FunctionalCNN:
        return FunctionalCNN({k: v.clone() for k, v in self.params.items()})

    def randomize_layers(self, layers: Sequence[str]) -> None:
        # The draws PyTorch's reset_parameters makes, on plain tensors.
        for name in layers:
            weight, bias = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(bias, -bound, bound)


def cnn_pair(seed: int = 0) -> tuple[nn.Module, FunctionalCNN]:
    torch.manual_seed(seed)
    module = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(4, 6, 3, padding=1),
            act2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 3),
        )
    ).eval()
    params = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return module, FunctionalCNN(params)


# -- a single-head attention model written by hand --------------------------------------------


def attention_params(seed: int = 0, dim: int = 8, classes: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (dim, 3, 4, 4),
        "embed.bias": (dim,),
        "cls": (1, 1, dim),
        "pos": (1, 5, dim),
        "qkv.weight": (3 * dim, dim),
        "qkv.bias": (3 * dim,),
        "proj.weight": (dim, dim),
        "proj.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}


def attend(p: dict[str, torch.Tensor], x: torch.Tensor, record: Callable) -> torch.Tensor:
    """4x4 px patches of an 8x8 input (4 tokens) after a class token, one single-head
    self-attention with a residual, the class token to the head."""
    t = F.conv2d(x, p["embed.weight"], p["embed.bias"], stride=4).flatten(2).transpose(1, 2)
    t = torch.cat([p["cls"].expand(x.shape[0], -1, -1), t], dim=1) + p["pos"]
    q, k, v = F.linear(t, p["qkv.weight"], p["qkv.bias"]).chunk(3, dim=-1)
    a = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1).unsqueeze(1)
    a = record(a)  # (N, 1 head, T, T): the tensor that multiplies the values
    t = t + F.linear((a[:, 0] @ v), p["proj.weight"], p["proj.bias"])
    return F.linear(t[:, 0], p["head.weight"], p["head.bias"])


class FunctionalViT(ModelAdapter):
    kind = "functional-vit"
    capabilities = frozenset({Capability.FORWARD, Capability.GRADIENTS, Capability.ATTENTION})
    input_spec = InputSpec(rank=4, channels=3)

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return attend(self.params, inputs, lambda a: a)

    def attention_layers(self) -> list[str]:
        return ["attn"]

    def windowed_attention(self) -> str | None:
        return None

    def extra_tokens(self) -> int | None:
        return 1

    def _calls(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        calls: list[tuple[str, torch.Tensor]] = []
        scores = attend(self.params, inputs, lambda a: calls.append(("attn", a)) or a)
        return scores, calls

    def attention_weights(self, inputs):
        with torch.no_grad():
            return self._calls(inputs)

    def attention_gradients(self, inputs, targets: Targets) -> AttentionGradientResult:
        with torch.enable_grad():
            scores, calls = self._calls(inputs.detach().requires_grad_(True))
        chosen = targets.resolve(scores).select(scores)
        grads = (list(g) for g in _grads(chosen, [w for _, w in calls]))
        return AttentionGradientResult(scores.detach(), [(n, w.detach()) for n, w in calls], grads)


class Attention(nn.Module):
    xai_attention = True  # the custom-module contract (docs/methods/attention.md)

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.p = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def record(a: torch.Tensor) -> torch.Tensor:
            record_attention(self, a)
            return a

        return attend(self.p, x, record)


class ModuleViT(nn.Module):
    """The same model as a PyTorch module (one attention module wrapping the whole net)."""

    num_prefix_tokens = 1

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        own = {k.replace(".", "_"): nn.Parameter(v.clone()) for k, v in params.items()}
        self.params = nn.ParameterDict(own)
        self.attn = Attention({k: self.params[k.replace(".", "_")] for k in params})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def same(a: xai_core.Explanation, b: xai_core.Explanation) -> None:
    torch.testing.assert_close(a.raw, b.raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert a.layers == b.layers


# -- the protocols are implemented --------------------------------------------------------------


def test_the_adapters_implement_the_protocols_they_declare():
    module, functional = cnn_pair()
    torch_adapter = xai_core.adapt(module)
    for adapter in (torch_adapter, functional):
        assert isinstance(adapter, LayerAccess) and isinstance(adapter, LayerGradients)
        assert isinstance(adapter, ClassifierHead)
        assert isinstance(adapter, ParameterRandomization)
        assert protocol_gaps(adapter) == {}
    vit = FunctionalViT(attention_params())
    assert isinstance(vit, AttentionAccess) and isinstance(vit, AttentionGradients)
    assert not isinstance(vit, LayerAccess) and protocol_gaps(vit) == {}
    assert not isinstance(functional, nn.Module) and not hasattr(functional, "module")
    assert torch_adapter.torch_module() is module  # only for engines that rewrite torch code


# -- the methods run on a third-party adapter, with the PyTorch module's maps ------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layer": "conv1"},
        {"layers": ["conv1", "act2"], "variant": "gradcam++"},
        {"variant": "guided", "relu": False},
    ],
)
def test_gradcam_on_a_functional_adapter_equals_the_module(images, options):
    module, functional = cnn_pair()
    ours = xai_core.explain(functional, images, method="gradcam", targets="all", **options)
    theirs = xai_core.explain(module, images, method="gradcam", targets="all", **options)
    same(ours, theirs)
    assert ours.details["calls"] == theirs.details["calls"]


@pytest.mark.parametrize("method", ["hirescam", "xgradcam", "layercam", "eigencam", "scorecam"])
def test_the_cam_family_on_a_functional_adapter_equals_the_module(images, method):
    module, functional = cnn_pair()
    ours = xai_core.explain(functional, images, method=method, targets="all",
                            layers=["conv1", "act2"])
    theirs = xai_core.explain(module, images, method=method, targets="all",
                              layers=["conv1", "act2"])
    same(ours, theirs)


def test_gradcam_names_a_bad_layer_of_a_functional_adapter(images):
    _, functional = cnn_pair()
    with pytest.raises(UnknownLayerError, match="nope"):
        xai_core.explain(functional, images, method="gradcam", layer="nope")


def test_cam_on_a_functional_adapter_equals_the_module(images):
    module, functional = cnn_pair()
    ours = xai_core.explain(functional, images, method="cam", targets=[[0, 2], [1, 0]])
    theirs = xai_core.explain(module, images, method="cam", targets=[[0, 2], [1, 0]])
    same(ours, theirs)
    assert ours.layers == ["act2"] and ours.details["head"] == theirs.details["head"] == "fc"
    # the layer before the ReLU: its ReLU is what is pooled (DenseNet's case)
    ours, theirs = (
        xai_core.explain(model, images, method="cam", layer="conv2", head="fc")
        for model in (functional, module)
    )
    same(ours, theirs)
    assert ours.details["relu"] is theirs.details["relu"] is True


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("attention", {}),
        ("attention", {"head": 0, "layer": "attn"}),
        ("rollout", {"discard_ratio": 0.2}),
        ("grad_rollout", {}),
    ],
)
def test_attention_methods_on_a_functional_adapter_equal_the_module(images, method, options):
    params = attention_params()
    ours = xai_core.explain(FunctionalViT(params), images, method=method, targets="all", **options)
    theirs = xai_core.explain(ModuleViT(params), images, method=method, targets="all", **options)
    torch.testing.assert_close(ours.raw, theirs.raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=1e-5, atol=1e-6)
    assert ours.details["extra_tokens"] == theirs.details["extra_tokens"] == 1
    assert ours.details["grid"] == (2, 2)


def test_randomization_metric_on_a_functional_adapter_equals_the_module(images):
    pytest.importorskip("xai_metrics")
    module, functional = cnn_pair()
    results = [
        xai_core.compare(
            model,
            images,
            methods=["gradcam"],
            metrics=["randomization"],
            metric_options={"randomization": {"stages": 3, "seed": 4}},
        )
        for model in (functional, module)
    ]
    ours, theirs = results
    key = ("gradcam", "randomization")
    assert not ours.errors and not theirs.errors
    torch.testing.assert_close(ours.values[key], theirs.values[key])
    assert ours.details[key]["layers"] == theirs.details[key]["layers"] == ["fc", "conv2", "conv1"]
    assert ours.details[key]["spearman"] == pytest.approx(theirs.details[key]["spearman"])


# -- declared without the protocol: a typed error, and not listed ------------------------------


class ForwardOnly(ModelAdapter):
    """Declares layers and classifier weights but implements neither protocol."""

    kind = "liar"
    capabilities = frozenset(
        {Capability.FORWARD, Capability.GRADIENTS, Capability.LAYERS, Capability.CLASSIFIER_WEIGHTS}
    )
    input_spec = InputSpec(rank=4, channels=3)

    def __init__(self) -> None:
        self.weight = torch.randn(3, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.mean(dim=(2, 3)) @ self.weight


def test_a_declared_capability_without_its_protocol_is_a_typed_error(images):
    adapter = ForwardOnly()
    for method in ("gradcam", "cam"):
        with pytest.raises(AdapterProtocolError, match="LayerAccess") as caught:
            xai_core.explain(adapter, images, method=method)
        assert "default_layer" in caught.value.missing["LayerAccess"]
        assert isinstance(caught.value, CapabilityError)  # not an AttributeError
    with pytest.raises(AdapterProtocolError, match=r"ClassifierHead.*linear_weights"):
        xai_core.explain(adapter, images, method="cam")
    assert xai_core.explain(adapter, images, method="occlusion", window=4).maps.shape[0] == 2


def runnable(adapter: ModelAdapter) -> set[str]:
    """Installed local and global methods whose requirements the adapter declares."""
    return {
        i.name for i in xai_core.list_explainers() if i.tags.requires <= adapter.capabilities
    }


def test_list_explainers_lists_exactly_what_the_adapter_can_run(images):
    _, functional = cnn_pair()
    vit = FunctionalViT(attention_params())
    cnn_methods = {i.name for i in xai_core.list_explainers(model=functional)}
    vit_methods = {i.name for i in xai_core.list_explainers(model=vit)}
    liar_methods = {i.name for i in xai_core.list_explainers(model=ForwardOnly())}
    assert {"gradcam", "cam", "occlusion"} <= cnn_methods == runnable(functional)
    assert {"attention", "rollout", "grad_rollout"} <= vit_methods == runnable(vit)
    assert "gradcam" not in vit_methods and "attention" not in cnn_methods
    # declared but not implemented: neither listed nor runnable, with the reason
    assert "gradcam" not in liar_methods and "cam" not in liar_methods
    assert "occlusion" in liar_methods
    registry = xai_core.get_registry()
    reason = registry.unsupported_reason(registry.get_explainer("gradcam"), ForwardOnly())
    assert reason is not None and "LayerAccess" in reason and "default_layer" in reason
    for name in cnn_methods & {"gradcam", "cam", "occlusion"}:  # each listed one runs
        xai_core.explain(functional, images, method=name)


def test_an_adapter_plugin_breaking_its_protocols_is_recorded(fresh_registry, images):
    class Model:
        pass

    class Plugin:
        @xai_core.hookimpl
        def adapt_model(self, model):
            return ForwardOnly() if isinstance(model, Model) else None

    fresh_registry.register_plugin(Plugin(), "liar-plugin")
    with pytest.warns(PluginWarning):
        adapter = xai_core.adapt(Model())
    assert isinstance(adapter, ForwardOnly)  # kept: its forward still serves occlusion
    failures = [f for f in fresh_registry.failures if f.plugin == "liar-plugin"]
    assert [f.stage for f in failures] == ["adapt_model"]
    assert "LayerAccess" in failures[0].error and "ClassifierHead" in failures[0].error
    with pytest.raises(AdapterProtocolError):
        xai_core.explain(Model(), images, method="gradcam")


def test_compare_skips_randomization_for_an_adapter_without_the_protocol(images):
    pytest.importorskip("xai_metrics")
    result = xai_core.compare(
        ForwardOnly(), images, methods=["occlusion"], metrics=["randomization"],
        options={"occlusion": {"window": 4}},
    )
    assert "needs a PyTorch model" in result.skipped_metrics["randomization"]


# -- layer-output edits (Ablation-CAM, Recipro-CAM) on the functional CNN ----------------------


class EditingFunctionalCNN(FunctionalCNN):
    """The functional CNN with ``LayerOutputEditing``: its tap returns the edited output, whose
    extra rows (variants of each sample) the rest of the computation simply carries."""

    capabilities = FunctionalCNN.capabilities | {Capability.LAYER_EDITS}

    def run_with_layer_output(self, inputs, layer, edit, *, variants=1):
        with torch.no_grad():
            return self._run(inputs, lambda name, out, inp: edit(out) if name == layer else out)


@pytest.mark.parametrize(("method", "options"), [
    ("ablationcam", {"relu": False}), ("reciprocam", {}), ("reciprocam", {"kernel": "gaussian"}),
])
def test_layer_edits_on_a_functional_adapter_equal_the_module(images, method, options):
    module, functional = cnn_pair()
    editing = EditingFunctionalCNN(functional.params)
    ours = xai_core.explain(editing, images, method=method, targets="all",
                            layers=["conv1", "act2"], **options)
    theirs = xai_core.explain(module, images, method=method, targets="all",
                              layers=["conv1", "act2"], **options)
    same(ours, theirs)
    assert method not in {i.name for i in xai_core.list_explainers(model=functional)}


def test_declaring_layer_edits_without_the_protocol_is_a_typed_error():
    _, functional = cnn_pair()
    functional.capabilities = FunctionalCNN.capabilities | {Capability.LAYER_EDITS}
    assert protocol_gaps(functional) == {"LayerOutputEditing": ["run_with_layer_output"]}
