"""Model builders: each returns an :class:`ImageFlow`."""

from __future__ import annotations

from collections.abc import Sequence

from flowkit.models.glow import glow
from flowkit.models.image_flow import ImageFlow, standard_normal_log_prob
from flowkit.models.tutorial import TUTORIAL_KINDS, tutorial_flow

__all__ = [
    "ImageFlow",
    "MODEL_NAMES",
    "TUTORIAL_KINDS",
    "build_model",
    "glow",
    "standard_normal_log_prob",
    "tutorial_flow",
]

MODEL_NAMES = ("glow",) + TUTORIAL_KINDS


def build_model(name: str, image_shape: Sequence[int], num_levels: int, **kwargs) -> ImageFlow:
    """Build a model by name: ``"glow"`` (``glow(image_shape, num_levels=..., **kwargs)``) or one
    of the tutorial's ``"simple"``, ``"vardeq"``, ``"multiscale"`` (which take no options).

    Example:
        >>> build_model("glow", (1, 8, 8), 17, levels=1, steps_per_level=1, hidden_channels=4).image_shape
        (1, 8, 8)
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name: expected one of {MODEL_NAMES}, got {name!r}")
    if name == "glow":
        return glow(image_shape, num_levels=num_levels, **kwargs)
    if kwargs:
        raise ValueError(
            f"kwargs: the tutorial model {name!r} takes no options, got {sorted(kwargs)}; "
            "only 'glow' accepts levels, steps_per_level, hidden_channels, ..."
        )
    return tutorial_flow(name, image_shape, num_levels)
