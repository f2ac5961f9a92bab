"""Cost: what an explanation took, measured by ``compare()`` on the same device in the same run."""

from __future__ import annotations

import math

import torch

from xai_core.core.metrics import Direction, MetricContext, MetricResult, Need


class Cost:
    """Wall-clock seconds per image (every sample gets the batch's mean); peak memory in details."""

    name = "cost"
    direction = Direction.LOWER
    needs: frozenset[Need] = frozenset()
    range = (0.0, math.inf)
    measured_once = True  # one timing of the batch, given to every sample: no interval, no test

    def compute(self, context: MetricContext) -> MetricResult:
        n = context.inputs.shape[0]
        # compare() times each method around the whole call; a direct caller falls back on the
        # time the core recorded in the explanation itself.
        seconds = float(context.measurements.get("seconds", context.explanation.seconds))
        per_image = seconds / n
        return MetricResult(
            torch.full((n,), per_image, device=context.inputs.device),
            {
                "seconds": seconds,
                "seconds_per_image": per_image,
                "peak_bytes": context.measurements.get("peak_bytes"),
            },
        )
