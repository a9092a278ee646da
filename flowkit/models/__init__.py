"""Model builders: each returns an :class:`ImageFlow`."""

from flowkit.models.image_flow import ImageFlow, standard_normal_log_prob
from flowkit.models.tutorial import TUTORIAL_KINDS, tutorial_flow

__all__ = ["ImageFlow", "TUTORIAL_KINDS", "standard_normal_log_prob", "tutorial_flow"]
