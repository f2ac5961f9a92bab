"""eMPRT: the efficient model parameter randomisation test (Hedström, Weber, Lapuschkin and
Höhne, *Sanity Checks Revisited: An Exploration to Repair the Model Parameter Randomisation
Test*, XAI in Action workshop, NeurIPS 2023).

Instead of a similarity between the original map and maps of a cascade of randomised models
(``randomization``, Adebayo et al.), eMPRT explains once with **every** parameterised layer
re-initialised and reports the relative rise of the map's complexity::

    value = (H(e_random) - H(e)) / H(e)                             higher is better

with ``H`` the Shannon entropy of the normalised absolute map (the ``complexity`` metric). A
method whose map depends on what the model learnt turns to noise on a random model (its entropy
rises); one that shows the input's edges whatever the weights stays as it was (about 0).

The randomised model is a copy (``ParameterRandomization``, as the randomisation metric uses):
each layer is re-drawn after seeding torch's generator with ``seed`` (Quantus re-draws each
layer after ``torch.manual_seed(seed + 1)``, so ``seed=43`` is Quantus's default ``seed=42``);
the caller's random state is left as it was. NaN where the original map is all zero or its
entropy is 0 (a single pixel: no rise is relative to nothing).
"""

from __future__ import annotations

import math

import torch

from xai_core.core.adapters import ParameterRandomization
from xai_core.core.errors import CapabilityError, ModelError
from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need
from xai_metrics.common import integer, single_maps
from xai_metrics.complexity import entropy


class EfficientMPRT:
    """Relative rise of the map's entropy from the model to a fully randomised copy
    (Hedström et al. 2023)."""

    name = "emprt"
    direction = Direction.HIGHER
    needs = frozenset({Need.TORCH_MODEL})
    range = (-1.0, math.inf)  # (H_r - H) / H with H_r >= 0

    @staticmethod
    def work(shape: tuple[int, ...], options: dict) -> tuple[int, int]:
        """(images forwarded, re-explanations) for a batch of ``shape``: the cost estimate."""
        return shape[0], 1

    def compute(self, context: MetricContext, *, seed: int = 0) -> MetricResult:
        """:param seed: torch's seed before each layer's re-initialisation (``seed=43``
            re-draws the weights Quantus's ``EfficientMPRT(seed=42)`` draws).
        """
        seed = integer(seed, "seed", minimum=0)
        if not isinstance(context.model, ParameterRandomization):
            raise CapabilityError(
                "emprt needs a model it can copy and re-initialise (a PyTorch model, or an "
                "adapter implementing xai_core.core.adapters.ParameterRandomization)."
            )
        original = entropy(single_maps(context))
        randomised = context.model.randomizable_copy()  # the user's model is never touched
        layers = randomised.parameter_layers(context.inputs[:1])
        if not layers:
            raise ModelError("The model has no parameterised layer that runs on these inputs.")
        device = context.inputs.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for layer in layers:
                torch.manual_seed(seed)
                randomised.randomize_layers([layer])
        rerun = context.rerun(model=randomised)
        random = entropy(single_maps(context, rerun.maps))
        defined = original > 0
        rise = (random - original) / original.clamp_min(torch.finfo(original.dtype).tiny)
        return MetricResult(
            torch.where(defined, rise, math.nan),
            {
                "entropy": original.cpu(),
                "entropy_randomised": random.cpu(),
                "layers": list(layers),
            },
        )
