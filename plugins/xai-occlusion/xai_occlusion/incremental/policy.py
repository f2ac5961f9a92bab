"""The policy: whether a call runs on the engine (``"auto"``: a traceable PyTorch CNN, large
enough inputs, scores reproduced, enough work saved) or falls back to plain occlusion, and why."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from xai_core.core.adapters import torch_module_of
from xai_core.core.targets import check_finite_scores
from xai_core.torch.adapter import scores_of
from xai_occlusion.incremental.cost import relative
from xai_occlusion.incremental.engine import Engine
from xai_occlusion.incremental.operators import _CONV
from xai_occlusion.incremental.options import Unsupported
from xai_occlusion.incremental.trace import trace

log = logging.getLogger("xai_core")

# "auto" uses the engine only for convolutional models on inputs of at least this many spatial
# positions (below, the engine's per-op overhead outweighs what it saves, and the model is not
# even traced), and only when its estimated cost is at most AUTO_COST of plain occlusion.
AUTO_MIN_POSITIONS = 1024
AUTO_COST = 0.8


def prepare(
    model: Any,
    inputs: torch.Tensor,
    fill: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    window: tuple[int, ...],
    mode: str,
    settings: Mapping[str, float],
    scores: torch.Tensor,
) -> tuple[Engine | None, dict[str, Any]]:
    """An :class:`Engine` for this call, or ``None`` (plain occlusion) with the reason.

    ``mode`` is ``"off"``, ``"auto"``, ``"exact"`` or ``"approximate"``. In ``"auto"`` the engine
    is used when the model traces, reproduces its scores and is estimated to save at least
    ``1 - AUTO_COST`` of the work; a model that does not qualify is explained by plain occlusion
    and the reason logged. Asked for explicitly, a fallback is a warning.
    """
    info: dict[str, Any] = {"mode": "off"}
    if mode == "off":
        return None, info
    # Occlusion resolves its targets (which refuses these) first; the engine never plans on NaN.
    check_finite_scores(scores)
    # The engine rewrites PyTorch code (torch.fx): it needs the module itself, not a protocol.
    module = torch_module_of(model)

    def fallback(reason: str) -> tuple[None, dict[str, Any]]:
        message = f"occlusion: incremental inference is off ({reason}); using plain occlusion."
        if mode == "auto":
            log.info(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        return None, {"mode": "off", "reason": reason}

    if not isinstance(module, nn.Module) or getattr(model, "kind", None) != "torch":
        return fallback("not a PyTorch module")
    if mode == "auto":
        if math.prod(inputs.shape[2:]) < AUTO_MIN_POSITIONS:
            reason = f"inputs of fewer than {AUTO_MIN_POSITIONS} positions"
            log.debug("occlusion: plain (%s)", reason)
            return None, {"mode": "off", "reason": reason}
        if not any(isinstance(m, tuple(_CONV)) for m in module.modules()):
            log.debug("occlusion: plain (no convolution in the model)")
            return None, {"mode": "off", "reason": "no convolution in the model"}
    # First corner of every window, (positions, rank), in the row-major order of window indices.
    starts = torch.stack(
        torch.meshgrid(*[box.long().argmax(1) for box in boxes], indexing="ij"), -1
    ).reshape(-1, len(boxes))
    approximate = mode == "approximate"
    try:
        gm = trace(module)
        engine = Engine(
            gm,
            inputs,
            fill,
            starts,
            window,
            cap=float(settings["threshold"]) if approximate else None,
        )
    except Unsupported as error:
        return fallback(str(error))
    except Exception as error:  # an op the planner's reference pass could not run
        return fallback(f"the traced graph could not be planned ({type(error).__name__}: {error})")
    try:
        traced = scores_of(engine.scores_value)
    except Exception as error:
        return fallback(f"the traced graph's output has no scores ({error})")
    if traced.shape != scores.shape or not torch.allclose(
        traced, scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max().clamp(min=1))
    ):
        return fallback("the traced graph does not reproduce the model's scores")
    cost = relative(engine.cost)
    if mode == "auto" and (cost > AUTO_COST or not engine.regions):
        log.info("occlusion: plain (incremental inference would save little: cost %.2f)", cost)
        return None, {"mode": "off", "reason": f"estimated cost {cost:.2f} of plain occlusion"}
    return engine, {
        "mode": "approximate" if approximate else "exact",
        "estimated_cost": round(cost, 4),
        **({"approximation": dict(settings)} if approximate else {}),
    }
