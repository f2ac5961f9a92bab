"""How the kit chooses, runs and reports checks: tags, skips with reasons, expected failures."""

from __future__ import annotations

import pytest
import torch

from xai_core import Tags
from xai_core.core.errors import ConformanceError, InputError
from xai_core.testing import (
    check_explainer,
    explainer_checks,
    parametrize_with_checks,
    tiny_cnn,
)
from xai_core.testing import models as kit_models

from .test_conformance_faults import SignFlipped
from .test_conformance_suite import Good, Noisy


class Specific(Good):
    name = "specific"
    tags = Tags("local", "model-specific", requires={"gradients"})


class AgnosticWithGradients(Good):
    name = "agnostic_with_gradients"
    tags = Tags("local", "model-agnostic", requires={"gradients"})


class Attending(Good):
    name = "attending"
    tags = Tags("local", "model-specific", requires={"attention"})


def skips(cls, **kwargs) -> dict[str, str]:
    return {c.name: c.skip for c in explainer_checks(cls, **kwargs) if c.skip is not None}


def test_checks_follow_the_tags():
    assert skips(Good) == {"global_summary": "a local method: it has no dataset summary to merge"}
    assert "onnx" not in skips(Good)  # model-agnostic, forward only: also run on ONNX
    assert "model-specific" in skips(Specific)["onnx"]
    assert "needs gradients" in skips(AgnosticWithGradients)["onnx"]


def test_a_global_method_gets_the_summary_check():
    from xai_global import GlobalOcclusion

    checks = {c.name: c for c in explainer_checks(GlobalOcclusion, options={"window": 4})}
    assert checks["global_summary"].skip is None
    checks["global_summary"]()


def test_attention_methods_skip_the_known_answer_checks_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    reasons = skips(Attending, model=model, inputs=torch.randn(2, 3, 8, 8))
    assert {"targets_honoured", "sign", "grid"} <= set(reasons)
    assert "without attention" in reasons["sign"]
    assert "non-square inputs=" in reasons["grid"]


def test_a_model_that_cannot_be_exported_skips_the_onnx_check_with_the_exporters_reason(
    monkeypatch,
):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(kit_models.torch.onnx, "export", refuse)
    report = check_explainer(Good, model=tiny_cnn())
    assert report["onnx"].status == "skipped"
    assert "could not be exported to ONNX: RuntimeError: Unsupported" in report["onnx"].message


def test_an_expected_failure_is_reported_as_xfail_and_does_not_raise():
    report = check_explainer(SignFlipped, expected_failures={"sign": "inverted on purpose"})
    assert report["sign"].status == "xfail"
    assert report["sign"].message == "inverted on purpose"
    assert report.ok


def test_an_expected_failure_that_passes_is_an_error_strictly():
    with pytest.raises(ConformanceError, match="- sign: listed as an expected failure"):
        check_explainer(Good, expected_failures={"sign": "we thought it was inverted"})


def test_an_expected_failure_naming_no_check_is_an_error():
    with pytest.raises(ConformanceError, match="names no check: \\['sgin'\\]"):
        check_explainer(Good, expected_failures={"sgin": "typo"})


def test_the_report_lists_every_check_with_its_status():
    report = check_explainer(Good)
    assert [r.name for r in report.results] == [c.name for c in explainer_checks(Good)]
    assert report.names("skipped") == ["global_summary"]
    assert "skipped global_summary: a local method" in str(report)


def test_parametrize_with_checks_gives_ids_skip_and_strict_xfail_marks():
    mark = parametrize_with_checks(
        [Good, (Noisy, {"options": {"scale": 2.0}})],
        expected_failures=lambda cls: {"stateless": "noisy"} if cls is Noisy else {},
    )
    assert mark.args[0] == "check"
    params = {p.id: p for p in mark.args[1]}
    assert "good-result" in params
    assert "noisy(scale=2.0)-stateless" in params
    (skip,) = params["good-global_summary"].marks
    assert skip.name == "skip" and "local method" in skip.kwargs["reason"]
    (xfail,) = params["noisy(scale=2.0)-stateless"].marks
    assert xfail.name == "xfail" and xfail.kwargs == {"reason": "noisy", "strict": True}
    assert not params["good-stateless"].marks


def test_parametrize_with_checks_refuses_an_expected_failure_naming_no_check():
    with pytest.raises(ConformanceError, match="names no check"):
        parametrize_with_checks([(Good, {"expected_failures": {"nope": "?"}})])


# The parametrized form in use: a skip and a strict xfail, as pytest reports them.
@parametrize_with_checks([(SignFlipped, {"expected_failures": {"sign": "inverted on purpose"}})])
def test_the_parametrized_form_runs(check):
    check()


def test_the_guides_sobel_example_holds():
    """docs/writing-a-plugin.md tests its Sobel plugin with one expected failure."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "data" / "xai-sobel" / "xai_sobel" / "__init__.py"
    spec = importlib.util.spec_from_file_location("xai_sobel_guide", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    guide = (Path(__file__).parents[1] / "docs" / "writing-a-plugin.md").read_text()
    assert 'SAME_MAP = {"targets_honoured": ' in guide
    report = check_explainer(
        module.Sobel, expected_failures={"targets_honoured": "the same map for every class"}
    )
    assert report["targets_honoured"].status == "xfail"
    assert report.names("failed") == [] and report.names("skipped") == ["global_summary"]


class VolumesOnly(Good):
    name = "volumes_only"

    def explain(self, model, inputs, targets, *, scale: float = 1.0):
        if inputs.ndim != 5:
            raise InputError("volumes_only explains 3D volumes only")
        return super().explain(model, inputs, targets, scale=scale)


def test_a_method_refusing_the_2d_evidence_cnn_skips_the_known_answer_checks_with_why():
    report = check_explainer(VolumesOnly, model=tiny_cnn(dims=3, channels=1))
    for name in ("targets_honoured", "sign", "grid"):
        assert report[name].status == "skipped"
        assert "refused the kit's 2D evidence CNN (InputError: volumes_only" in report[name].message
    assert report["result"].status == "passed"
