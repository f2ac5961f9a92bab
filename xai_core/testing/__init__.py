"""The conformance kit: check that an explainer, a metric or a model adapter keeps the protocol.

Modelled on scikit-learn's ``check_estimator`` / ``parametrize_with_checks``: each check is a
named function; which checks run follows from what is tested (an explainer's tags, a metric's
needs, an adapter's capabilities); a check that cannot apply is skipped with its reason; an
``expected_failures`` mapping ``{"check": "why"}`` marks known failures (and a listed check that
passes is reported, strictly).

Run every check and get a report, or one error listing each failure::

    from xai_core.testing import check_adapter, check_explainer, check_metric
    check_explainer(MyExplainer)                      # on the kit's tiny models
    check_explainer(MyViTMethod, model=my_vit, inputs=x, options={"layer": 3})
    check_metric(MyMetric)
    check_adapter(lambda: MyAdapter(my_model))

Or one pytest test per (subject, check), with ``subject-check`` ids::

    @parametrize_with_checks([MyExplainer], expected_failures={"onnx": "needs torch"})
    def test_conformance(check):
        check()

(``parametrize_metrics`` and ``parametrize_adapters`` likewise.) The modules: ``runner`` (checks,
reports, expected failures, pytest marks), ``explainers``, ``metrics``, ``adapters`` (the three
kits), ``models`` (the tiny models, the evidence CNN, ONNX export), ``state`` (model and global
random state snapshots).

See docs/writing-a-plugin.md ("Test it with the conformance kit").
"""

from xai_core.testing.adapters import (
    CAPABILITY_CHECKS,
    adapter_checks,
    check_adapter,
    parametrize_adapters,
)
from xai_core.testing.explainers import (
    check_explainer,
    explainer_checks,
    parametrize_with_checks,
)
from xai_core.testing.metrics import check_metric, metric_checks, parametrize_metrics
from xai_core.testing.models import evidence_cnn, evidence_inputs, evidence_masks, tiny_cnn
from xai_core.testing.runner import Check, CheckResult, Report, SkipCheck, run_checks

__all__ = [
    "CAPABILITY_CHECKS",
    "Check",
    "CheckResult",
    "Report",
    "SkipCheck",
    "adapter_checks",
    "check_adapter",
    "check_explainer",
    "check_metric",
    "evidence_cnn",
    "evidence_inputs",
    "evidence_masks",
    "explainer_checks",
    "metric_checks",
    "parametrize_adapters",
    "parametrize_metrics",
    "parametrize_with_checks",
    "run_checks",
    "tiny_cnn",
]
