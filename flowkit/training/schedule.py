"""The per-step learning-rate schedule (linear warm-up, decay per epoch) and the moving
average of the weights that a run evaluates (``TrainConfig.warmup_steps``, ``lr_decay``,
``ema_decay``).  Both advance once per optimisation step and are stored in checkpoints."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage", "lr_factor", "make_scheduler"]


def lr_factor(step: int, warmup_steps: int, lr_decay: float, steps_per_epoch: int) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of ``lr``:
    ``min(1, (step + 1) / warmup_steps) * lr_decay ** (step // steps_per_epoch)``.

    Example:
        >>> lr_factor(0, 4, 0.5, 10), lr_factor(3, 4, 0.5, 10), lr_factor(10, 4, 0.5, 10)
        (0.25, 1.0, 0.5)
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * lr_decay ** (step // max(steps_per_epoch, 1))


def make_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, lr_decay: float, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped after every optimisation step, following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, lr_decay, steps_per_epoch)
    )


class WeightAverage:
    """An exponential moving average of a model's parameters (buffers are copied), in a copy
    of the model that is used for evaluation.

    ``update(model)`` after every step: ``avg = d * avg + (1 - d) * param`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update, so the first averages
    follow the weights closely instead of clinging to the initialisation.

    Args:
        model: the model being trained (copied; the copy takes no gradients).
        decay: the long-run decay, in ``(0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a number in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def current_decay(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current parameters; copy its buffers."""
        averaged: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - self.current_decay())
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """Restore the update count and the averaged weights (a model ``state_dict``)."""
        self.updates = int(state["updates"])
        self.model.load_state_dict(weights)
