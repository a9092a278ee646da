"""Class-conditional layers: Glow's class-conditional prior, as a transform.

A class-conditional image flow (``glow(..., num_classes=K)``) conditions on a label ``y`` in two
places, both through nflows' own ``context`` argument:

* the **prior**: :class:`ClassConditionalPrior` maps the flow's latent ``z`` to the standard
  normal with a per-class mean and log-scale, ``u = (z - mu_y) exp(-log_sigma_y)``, so that
  ``log N(u; 0, I) + logabsdet = log N(z; mu_y, diag(sigma_y^2))``: Glow's class-conditional
  prior (Kingma & Dhariwal, 2018, sec. 5; normflows' ``ClassCondDiagGaussian``).  Zero-initialised,
  it starts as the unconditional standard-normal base;
* optionally the **coupling nets**: a label embedding ``[B, E]`` (``nn.Embedding(K, E)``) is the
  context of every coupling; :class:`~flowkit.layers.GatedConvNet` built with
  ``context_channels=E`` broadcasts it over the image as ``E`` extra input channels.  The nets'
  last convolutions are zero-initialised, so a fresh conditional model is the unconditional one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from nflows.transforms import Transform
from torch import nn

from flowkit.layers.base import sum_except_batch
from flowkit.validation import check_float_tensor, check_int, check_labels

__all__ = ["ClassConditionalPrior"]


class ClassConditionalPrior(Transform):
    """Glow's class-conditional prior as a transform to ``N(0, I)``: a per-class diagonal Gaussian.

    ``forward(z, context=y) = (z - loc[y]) * exp(-log_scale[y])`` with
    ``logabsdet = -sum(log_scale[y])``; ``inverse(u, context=y) = u * exp(log_scale[y]) + loc[y]``.
    With a standard-normal base this is the density ``N(z; loc[y], diag(exp(2 log_scale[y])))``
    (one mean and one log-scale per class and latent dimension, as normflows'
    ``ClassCondDiagGaussian``; for a multiscale flow the latent holds every level, so each
    level's latent gets its own per-class mean and scale).  Sampling at temperature ``T`` draws
    ``u ~ N(0, T^2 I)``, i.e. ``z ~ N(loc[y], T^2 diag(scale[y]^2))``, as Glow does.

    Both tables start at zero, so the prior starts as the standard normal of an unconditional
    flow.  The labels are indexed without reading them back (no device synchronisation): the
    model's boundary (:class:`~flowkit.models.ImageFlow`) validates their range once.

    Args:
        num_classes: ``K``, labels are ``0 .. K-1``.
        shape: shape of one latent ``z`` (without the batch dimension).

    Example:
        >>> prior = ClassConditionalPrior(3, (4,))            # 3 classes, latents of shape (4,)
        >>> z = torch.randn(2, 4)
        >>> u, logabsdet = prior(z, context=torch.tensor([0, 2]))
        >>> torch.equal(u, z), logabsdet.abs().sum().item()  # zero-initialised: the standard normal
        (True, 0.0)
    """

    def __init__(self, num_classes: int, shape: Sequence[int]):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, low=1)
        if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"shape: expected the shape of one latent as positive ints, got {shape!r}")
        self.shape = tuple(shape)
        self.loc = nn.Parameter(torch.zeros(num_classes, *self.shape))
        self.log_scale = nn.Parameter(torch.zeros(num_classes, *self.shape))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, shape={self.shape}, dims={math.prod(self.shape)}"

    def _loc_and_log_scale(self, inputs: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor]:
        check_float_tensor(inputs, "inputs")
        if tuple(inputs.shape[1:]) != self.shape:
            raise ValueError(
                f"inputs: expected shape [batch, {', '.join(map(str, self.shape))}], got {tuple(inputs.shape)}"
            )
        if context is None:
            raise ValueError(
                f"context: the class labels y are needed (an integer tensor [{inputs.shape[0]}]), got None"
            )
        check_labels(context, "context", self.num_classes, inputs.shape[0], check_values=False)
        return self.loc[context].to(inputs.dtype), self.log_scale[context].to(inputs.dtype)

    def forward(self, inputs: torch.Tensor, context=None):
        loc, log_scale = self._loc_and_log_scale(inputs, context)
        return (inputs - loc) * torch.exp(-log_scale), -sum_except_batch(log_scale)

    def inverse(self, inputs: torch.Tensor, context=None):
        loc, log_scale = self._loc_and_log_scale(inputs, context)
        return inputs * torch.exp(log_scale) + loc, sum_except_batch(log_scale)
