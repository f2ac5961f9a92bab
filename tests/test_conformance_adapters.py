"""The adapter kit: the core's adapters pass it; each kind of broken adapter is caught."""

from __future__ import annotations

from contextlib import contextmanager, suppress

import pytest
import torch

from xai_core import InputSpec, ModelAdapter, TorchAdapter
from xai_core.core.errors import ConformanceError
from xai_core.core.tags import Capability
from xai_core.onnx.adapter import OnnxAdapter
from xai_core.testing import (
    CAPABILITY_CHECKS,
    adapter_checks,
    check_adapter,
    parametrize_adapters,
    tiny_cnn,
)
from xai_core.testing.models import onnx_bytes


def test_the_torch_adapter_conforms():
    report = check_adapter(lambda: TorchAdapter(tiny_cnn()), picklable=True)
    assert report.names("skipped") == []


def test_the_onnx_adapter_conforms_and_pickles():
    report = check_adapter(lambda: OnnxAdapter(onnx_bytes(), providers=["CPUExecutionProvider"]))
    assert report["pickle"].status == "passed"  # claimed by its __getstate__
    # Gradients reach the input through the graph re-run in torch (xai_core/onnx/gradients.py).
    assert report["gradients"].status == "passed"
    assert "no PyTorch module" in report["session_restores"].message


class Linear(ModelAdapter):
    """A model that is no torch module: pooled channels times a matrix."""

    kind = "linear"
    capabilities = frozenset({Capability.FORWARD, Capability.GRADIENTS})
    input_spec = InputSpec(rank=4, channels=2, spatial=(6, 10))

    def __init__(self) -> None:
        self.weight = torch.tensor([[1.0, -1.0, 0.5], [0.25, 2.0, -1.0]])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.mean(dim=(2, 3)) @ self.weight


def test_an_adapter_of_another_framework_conforms_on_inputs_shaped_by_its_spec():
    report = check_adapter(Linear())
    assert report["gradients"].status == "passed"
    assert report["pickle"].status == "skipped"


class NoRestore(TorchAdapter):
    name = "no_restore"

    @contextmanager
    def session(self):
        self.module.eval()
        yield self


class Swallows(TorchAdapter):
    @contextmanager
    def session(self):
        with suppress(Exception):  # the fault: an explainer's error vanishes
            yield self


class Detached(Linear):
    def forward(self, inputs):
        return torch.from_numpy(super().forward(inputs).detach().numpy())


class DeviceObject(Linear):
    def describe(self):
        return {**super().describe(), "device": self.device}


class BatchDependent(Linear):
    def forward(self, inputs):
        out = super().forward(inputs)
        return out - out.mean(0)


class DropsOne(Linear):
    def forward(self, inputs):
        return super().forward(inputs)[:-1]


class NoForward(Linear):
    capabilities = frozenset({Capability.GRADIENTS})


class ClaimsLayers(Linear):
    """Declares layer access without the LayerAccess methods behind it."""

    capabilities = frozenset({Capability.FORWARD, Capability.LAYERS})


class ClaimsPickle(Linear):
    def __init__(self):
        super().__init__()
        self.transform = lambda x: x  # a lambda does not pickle

    def __getstate__(self):
        return self.__dict__


def torch_of(cls):
    def make():
        return cls(tiny_cnn())

    make.__name__ = cls.__name__
    return make


@pytest.mark.parametrize(
    ("make", "check", "fault"),
    [
        (torch_of(NoRestore), "session_restores", "model's requires_grad changed"),
        (torch_of(NoRestore), "session_restores_on_error", "model's requires_grad changed"),
        (torch_of(Swallows), "session_restores_on_error", "swallowed an exception"),
        (Detached, "gradients", "no autograd graph"),
        (DeviceObject, "describe", "not JSON-able"),
        (BatchDependent, "batch_consistency", "alone differ"),
        (DropsOne, "forward", r"shape \(2, 3\) for 3 inputs"),
        (NoForward, "protocol", "Capability.FORWARD"),
        (ClaimsLayers, "protocol", r"LayerAccess \(missing default_layer, .*layer_names"),
        (ClaimsPickle, "pickle", "claims to pickle but does not"),
    ],
    ids=lambda v: v.__name__ if callable(v) else v if " " not in v else "",
)
def test_each_broken_adapter_is_caught_by_its_check(make, check, fault):
    checks = {c.name: c for c in adapter_checks(make)}
    with pytest.raises(ConformanceError, match=fault):
        checks[check]()
    with pytest.raises(ConformanceError, match=f"- {check}: .*{fault}"):
        check_adapter(make)


def test_each_declared_capability_with_a_check_is_checked():
    """The one place where capability checks plug in: a declared capability runs its check."""
    names = {c.name: c for c in adapter_checks(Linear())}
    for capability, check in CAPABILITY_CHECKS.items():
        assert check in names
        assert (names[check].skip is None) == (capability in Linear.capabilities)


def onnx_adapter():
    return OnnxAdapter(onnx_bytes(), providers=["CPUExecutionProvider"])


@parametrize_adapters([(lambda: TorchAdapter(tiny_cnn()), {"picklable": True}), onnx_adapter])
def test_the_core_adapters_one_check_at_a_time(check):
    check()


class IgnoresEdits(TorchAdapter):
    """Declares layer edits but runs the plain model, copies and all."""

    def run_with_layer_output(self, inputs, layer, edit, *, variants=1):
        return self.forward(inputs).repeat_interleave(variants, 0)


class MixesCopies(TorchAdapter):
    """Edits the layer but orders the copies variant-major, not sample-major."""

    def run_with_layer_output(self, inputs, layer, edit, *, variants=1):
        scores = super().run_with_layer_output(inputs, layer, edit, variants=variants)
        return scores.view(inputs.shape[0], variants, -1).transpose(0, 1).flatten(0, 1)


@pytest.mark.parametrize(
    ("cls", "fault"), [(IgnoresEdits, "ignored the edit"), (MixesCopies, "two unchanged copies")]
)
def test_the_layer_edits_check_catches_a_broken_adapter(cls, fault):
    checks = {c.name: c for c in adapter_checks(lambda: cls(tiny_cnn()))}
    assert checks["layer_edits"].skip is None
    with pytest.raises(ConformanceError, match=fault):
        checks["layer_edits"]()
