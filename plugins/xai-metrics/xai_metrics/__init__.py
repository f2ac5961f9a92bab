"""The built-in metrics of xai-core, registered through the ``register_metrics`` hook.

===========================  =========  ============================================  ========
name                         better     reference                                     needs
===========================  =========  ============================================  ========
``deletion``                 lower      Petsiuk et al. 2018 (RISE)
``insertion``                higher     Petsiuk et al. 2018 (RISE)
``pointing_game``            higher     Zhang et al. 2016                             masks
``energy_pointing_game``     higher     Wang et al. 2020 (Score-CAM)                  masks
``relevance_mass``           higher     Arras et al. 2022 (CLEVR-XAI)                 masks
``relevance_rank``           higher     Arras et al. 2022 (CLEVR-XAI)                 masks
``sparseness``               higher     Chalasani et al. 2020 (Gini index)
``complexity``               lower      Bhatt et al. 2020 (entropy)
``randomization``            lower      Adebayo et al. 2018                           torch
``emprt``                    higher     Hedström et al. 2023 (eMPRT)                  torch
``road``                     higher     Rong et al. 2022 (ROAD, LeRF - MoRF)
``max_sensitivity``          lower      Yeh et al. 2019
``local_lipschitz``          lower      Alvarez-Melis and Jaakkola 2018
``avg_drop``                 lower      Chattopadhyay et al. 2018 (Grad-CAM++)
``avg_increase``             higher     Chattopadhyay et al. 2018 (Grad-CAM++)
``stability``                higher     flip / rotation / intensity augmentation
``cost``                     lower      seconds per image measured by compare()
===========================  =========  ============================================  ========

Every metric returns one value per sample (NaN where undefined) and free-form ``details``;
definitions and conventions are in docs/methods/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable

import xai_core
from xai_metrics.complexity import Complexity, Sparseness
from xai_metrics.cost import Cost
from xai_metrics.mprt import EfficientMPRT
from xai_metrics.perturbation import AvgDrop, AvgIncrease, Deletion, Insertion
from xai_metrics.pointing import (
    EnergyPointingGame,
    PointingGame,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
)
from xai_metrics.road import Road
from xai_metrics.robustness import LocalLipschitz, MaxSensitivity
from xai_metrics.sanity import Randomization, Stability

__version__ = "0.1.0"

METRICS = (
    Deletion,
    Insertion,
    PointingGame,
    EnergyPointingGame,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
    Sparseness,
    Complexity,
    Randomization,
    AvgDrop,
    AvgIncrease,
    Stability,
    Cost,
    Road,
    MaxSensitivity,
    LocalLipschitz,
    EfficientMPRT,
)


@xai_core.hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


__all__ = [
    "METRICS",
    "AvgDrop",
    "AvgIncrease",
    "Complexity",
    "Cost",
    "Deletion",
    "EfficientMPRT",
    "EnergyPointingGame",
    "Insertion",
    "LocalLipschitz",
    "MaxSensitivity",
    "PointingGame",
    "Randomization",
    "RelevanceMassAccuracy",
    "RelevanceRankAccuracy",
    "Road",
    "Sparseness",
    "Stability",
]
