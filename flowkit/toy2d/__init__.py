"""Reverse-KL fitting of 2D densities: targets with known ``log Z``, flows, fit, metrics, plots.

``fit(build_flow("planar", 16), "two-modes")`` fits the seed's 16 normflows Planar flows by
reverse KL; :func:`evaluate` then reports the exact reverse KL, forward KL, the effective
sample size and the ``log Z`` estimate. Pictures live in :mod:`flowkit.toy2d.plots`
(matplotlib is imported there, on use).
"""

from flowkit.toy2d.fit import PRESETS, REFINE, FitResult, fit, refine_spec
from flowkit.toy2d.flows import FLOW_KINDS, build_flow, extend_flow, is_invertible
from flowkit.toy2d.metrics import Metrics, evaluate, format_metrics
from flowkit.toy2d.targets import Target2D, get_target, grid_log_z, list_targets, register_target

__all__ = [
    "FLOW_KINDS",
    "FitResult",
    "Metrics",
    "PRESETS",
    "REFINE",
    "Target2D",
    "build_flow",
    "evaluate",
    "extend_flow",
    "fit",
    "format_metrics",
    "get_target",
    "grid_log_z",
    "is_invertible",
    "list_targets",
    "refine_spec",
    "register_target",
]
