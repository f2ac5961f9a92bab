"""Global explanations for xai-core: what a model looks at for each class, over a dataset.

Two explainers with scope ``global``:

* ``aggregate``: any local method's maps, min-max normalised per map (the core's convention) and
  upsampled to the input grid, averaged per class: the mean map and its spread (population
  standard deviation per pixel) over the images counted for the class.
* ``global-occlusion``: occlusion's raw maps (the drop of the class score when a box is hidden,
  Captum's convention) averaged per class: the mean drop of a class's score when each region is
  occluded, across the dataset, in score units.

How a global method fits the :class:`~xai_core.Explainer` protocol: ``explain(model, inputs,
targets, *, options)`` takes one batch like any explainer and returns the per-sample maps it
aggregates, so ``xai_core.explain`` works and the core's conformance suite applies to those maps
unchanged; the global result, the batch's per-class statistics, is a
:class:`~xai_core.workflows.datasets.ClassMaps`
in ``details["global"]``. Statistics add exactly with
``+``, so a dataset larger than memory is explained batch by batch and summed:
:func:`xai_core.workflows.datasets.explain_dataset` does that over a tensor, a folder of files or a
DataLoader. Each sample's map counts for the class it explains: ``targets=labels`` groups images
by label, ``None`` by the model's prediction, ``"all"`` counts every image for every class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

import xai_core
from xai_core import Attribution, Region, Scope, Tags, Targets
from xai_core.core.adapters import ModelAdapter
from xai_core.core.api import run_explainer, runnable
from xai_core.core.errors import OptionError, TargetError
from xai_core.core.explanation import normalize
from xai_core.core.options import PositiveInt
from xai_core.torch.ops import BlurSigma
from xai_core.workflows.datasets import ClassMaps, explain_dataset

__version__ = "0.1.0"
__all__ = ["Aggregate", "ClassMaps", "GlobalOcclusion", "explain_dataset", "per_class"]


def per_class(
    model: ModelAdapter,
    inputs: torch.Tensor,
    targets: Targets,
    local: str,
    options: dict[str, Any],
    *,
    normalized: bool,
) -> Attribution:
    """Explain ``inputs`` with the local method ``local`` and sum its maps per class.

    Returns an :class:`Attribution` with the ``(N, K, *spatial)`` maps on the input grid
    (normalised or raw) and their :class:`ClassMaps` in ``details["global"]``.
    """
    info, _ = runnable(
        local,
        model,
        scope=Scope.LOCAL,
        wrong_scope="aggregate a local one (e.g. 'gradcam').",
        options=dict(options),  # the local method's options, before any forward pass
    )
    with torch.no_grad():
        scores = model.forward(inputs)
    classes = targets.resolve(scores).indices
    if classes is None:
        raise TargetError(
            "Global explanations sum maps per class, so targets must be class indices (None, an "
            "int, one per sample, (N, K) or 'all'), not a callable."
        )
    # The local method explains exactly the classes fixed here, inside the same model session.
    spec: Any = classes
    if targets.region is not None:  # segmentation: the user's mask or box goes with the classes
        spec = Region(classes, mask=targets.region.mask, box=targets.region.box)
    exp = run_explainer(info, model, inputs, spec, dict(options))
    if len(exp.raw) > 1:
        raise OptionError("Aggregate one layer at a time: pass `layer`, not several `layers`.")
    maps = exp.full[:, :, 0]  # (N, K, *spatial) on the input grid
    spatial = maps.ndim - 2
    if normalized:
        maps = normalize(maps, spatial)
    summary = ClassMaps.of(maps.flatten(0, 1), classes.flatten(), scores.shape[1])
    details = {"global": summary, "local": local, "local_details": exp.details}
    return Attribution(maps=maps, scores=scores.detach(), layers=exp.layers, details=details)


class Aggregate:
    """Per-class mean and spread (std) of a local method's normalised maps over the data."""

    name = "aggregate"
    tags = Tags("global", "model-agnostic")  # what it needs is what `local` needs, checked then

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        local: str = "gradcam",
        local_options: dict[str, Any] | None = None,
    ) -> Attribution:
        """:param local: the local method whose maps are aggregated (any installed one).
        :param local_options: that method's options, e.g. ``{"layer": "features.denseblock4"}``.
        """
        if local_options is not None and not isinstance(local_options, dict):
            raise OptionError(f"local_options must be a dict; got {type(local_options).__name__}.")
        return per_class(model, inputs, targets, local, local_options or {}, normalized=True)


class GlobalOcclusion:
    """Global occlusion sensitivity: the mean drop of a class score when each region is hidden."""

    name = "global-occlusion"
    tags = Tags("global", "model-agnostic")

    def explain(
        self,
        model: ModelAdapter,
        inputs: torch.Tensor,
        targets: Targets,
        *,
        window: PositiveInt | Sequence[PositiveInt] | None = None,
        stride: PositiveInt | Sequence[PositiveInt] | None = None,
        baseline: float | Literal["zero", "blur", "mean"] = "zero",
        sigma: BlurSigma | Sequence[BlurSigma] = 5.0,
        chunk_size: PositiveInt | None = None,
    ) -> Attribution:
        """Occlusion's options, with its defaults (see docs/methods/occlusion.md); maps are raw
        score drops, so the class mean is the mean drop in the class's score."""
        options = {
            "window": window,
            "stride": stride,
            "baseline": baseline,
            "sigma": sigma,
            "chunk_size": chunk_size,
        }
        return per_class(model, inputs, targets, "occlusion", options, normalized=False)


@xai_core.hookimpl
def register_explainers(register: Callable[[type], None]) -> None:
    register(Aggregate)
    register(GlobalOcclusion)
