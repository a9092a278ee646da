"""Reverse-KL fitting of 2D densities: targets and their ``log Z``, flows, a fit in stages, metrics, plots.

``fit(nfm)`` fits a normflows ``NormalizingFlow`` to its own target ``p`` (or to any target:
a registered name, a :class:`Target2D`, a normflows target, any ``z -> log p~(z)``);
:func:`evaluate` then reports the exact reverse KL, forward KL, the effective sample size and
the ``log Z`` estimate. Presets are typed records (:class:`Preset`); pictures live in
:mod:`flowkit.toy2d.plots` (matplotlib is imported there, on use).
"""

from flowkit.toy2d.fit import FitResult, fit
from flowkit.toy2d.flows import FLOW_KINDS, build_flow, extend_flow, is_invertible, model_log_prob, model_sample
from flowkit.toy2d.metrics import Metrics, evaluate, format_metrics
from flowkit.toy2d.presets import PRESETS, Preset, Refine, Restarts, Stage
from flowkit.toy2d.targets import (
    LogProbTarget,
    LogZ,
    Target2D,
    as_target,
    find_box,
    get_target,
    grid_log_z,
    list_targets,
    register_target,
)

__all__ = [
    "FLOW_KINDS",
    "FitResult",
    "LogProbTarget",
    "LogZ",
    "Metrics",
    "PRESETS",
    "Preset",
    "Refine",
    "Restarts",
    "Stage",
    "Target2D",
    "as_target",
    "build_flow",
    "evaluate",
    "extend_flow",
    "find_box",
    "fit",
    "format_metrics",
    "get_target",
    "grid_log_z",
    "is_invertible",
    "list_targets",
    "model_log_prob",
    "model_sample",
    "register_target",
]
