"""The options of incremental inference, validated (``incremental``, ``approximation``), and
:class:`Unsupported`, the engine's way of saying a model cannot run incrementally."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from xai_core.core.errors import OptionError, did_you_mean

MODES = ("auto", "exact", "approximate")
# Projective-field threshold, coarse grid step (1: every window, no refinement) and the share of
# the other windows refined. Refinement is off by default: interpolated drops keep the high
# regions but scramble the ranks of the low ones (see docs/methods/occlusion.md).
APPROXIMATION = {"threshold": 0.3, "coarse": 1, "refine": 0.25}


class Unsupported(Exception):
    """The model cannot run incrementally at all; plain occlusion is used instead."""


def incremental_mode(value: object) -> str:
    """The ``incremental`` option as ``"auto"``, ``"exact"``, ``"approximate"`` or ``"off"``."""
    if value is False:
        return "off"
    if value is True:
        return "exact"
    if isinstance(value, str) and value in MODES:
        return value
    hint = did_you_mean(value, MODES) if isinstance(value, str) else ""
    raise OptionError(
        f"incremental must be one of {MODES} or False (plain occlusion); got {value!r}.{hint}"
    )


def approximation_settings(value: object) -> dict[str, float]:
    """The ``approximation`` option, validated, with defaults filled in."""
    if value is None:
        return dict(APPROXIMATION)
    if not isinstance(value, Mapping):
        raise OptionError(
            f"approximation must be a dict with keys {tuple(APPROXIMATION)}; got {value!r}."
        )
    settings = dict(APPROXIMATION)
    for key, v in value.items():
        if key not in APPROXIMATION:
            raise OptionError(
                f"approximation has no setting {key!r}; it has {tuple(APPROXIMATION)}."
                f"{did_you_mean(str(key), APPROXIMATION)}"
            )
        real = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if key == "threshold" and not (real and 0 < v <= 1):
            raise OptionError(f"approximation['threshold'] must be in (0, 1]; got {v!r}.")
        if key == "coarse" and not (isinstance(v, numbers.Integral) and real and v >= 1):
            raise OptionError(f"approximation['coarse'] must be an int >= 1; got {v!r}.")
        if key == "refine" and not (real and 0 <= v <= 1):
            raise OptionError(f"approximation['refine'] must be in [0, 1]; got {v!r}.")
        settings[key] = v
    return settings
