"""Dequantization layers: integer images -> continuous logits (Ho et al., 2019; the tutorial).

``Dequantization`` adds uniform noise, ``VariationalDequantization`` learns the noise
distribution ``q(u | x)`` with a conditional flow.  Both end with :class:`ScaledLogit`.

Exact round trip.  The tutorial's layer maps ``x + u`` to logits and back with ``floor``;
in float32 the sigmoid/logit round trip moves values by up to ~1e-5 of a level, so a noise
value within that distance of 0 or 1 crosses into the neighbouring level (the tutorial's own
check fails: 0 comes back as 1).  flowkit keeps the noise inside ``[m, 1 - m]`` with a margin
``m`` far larger than that error (``m = num_levels * 2**-20``, 2.4e-4 levels at 256 levels)
and counts the narrower box in the density: ``u = m + (1 - 2m) * u0`` adds
``D * log(1 - 2m)`` to the log-det (``-log q``), about 4e-4 nats per dimension, i.e. a
bound looser by 7e-4 bits/dim.  Every level ``0 .. num_levels-1`` then round-trips exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nflows.transforms import Transform

from flowkit.layers.base import Context, TransformResult, check_float_tensor, check_image_batch, sum_except_batch

__all__ = ["ScaledLogit", "Dequantization", "VariationalDequantization", "default_noise_margin"]


def default_noise_margin(num_levels: int) -> float:
    """Margin keeping dequantization noise away from level boundaries (see module doc)."""
    return float(num_levels) * 2.0**-20


class ScaledLogit(Transform):
    """``z = logit(alpha/2 + (1 - alpha) * v / num_levels)`` for ``v`` in ``[0, num_levels]``.

    The tutorial's "scale and inverse sigmoid": maps dequantized values to the real line,
    the ``alpha`` squeeze keeping away from logit's singularities at 0 and 1.

    Args:
        num_levels: number of discrete levels ``K`` (``v`` lies in ``[0, K]``).
        alpha: squeeze constant.
    """

    def __init__(self, num_levels: int = 256, alpha: float = 1e-5):
        super().__init__()
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels: expected a positive int, got {num_levels!r}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha: expected a float in [0, 1), got {alpha!r}")
        self.num_levels = num_levels
        self.alpha = float(alpha)

    def forward(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        check_float_tensor(inputs, "inputs")
        y = inputs * ((1.0 - self.alpha) / self.num_levels) + 0.5 * self.alpha
        log_y, log_1my = torch.log(y), torch.log1p(-y)
        # log|dz/dv| = log((1 - alpha) / K) - log y - log(1 - y)
        const = math.log((1.0 - self.alpha) / self.num_levels)
        return log_y - log_1my, sum_except_batch(const - log_y - log_1my)

    def inverse(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        check_float_tensor(inputs, "inputs")
        y = torch.sigmoid(inputs)
        v = (y - 0.5 * self.alpha) * (self.num_levels / (1.0 - self.alpha))
        # log|dv/dz| = log y + log(1 - y) - log((1 - alpha) / K), computed stably from z
        const = math.log((1.0 - self.alpha) / self.num_levels)
        logabsdet = sum_except_batch(-F.softplus(-inputs) - F.softplus(inputs) - const)
        return v, logabsdet


class Dequantization(Transform):
    """Uniform dequantization: ``z = logit(squeeze((x + u) / K))`` with ``u ~ U[m, 1-m)``.

    ``forward`` takes integer images ``[B, C, H, W]`` in ``[0, num_levels)`` and returns
    float logits (dtype of this module: ``.double()`` gives float64) and
    ``logabsdet = log|dz/dv| - log q(u | x)``, so ``log p_z(z) + logabsdet`` is a one-sample
    lower bound on ``log P(x)``.  ``inverse`` returns the integer images (``torch.long``) and
    ``log|dv/dz|``.

    Args:
        num_levels: number of discrete values per pixel (256 for 8-bit images).
        alpha: logit squeeze, see :class:`ScaledLogit`.
        noise_margin: keeps noise in ``[m, 1 - m]`` for an exact float32 round trip
            (default :func:`default_noise_margin`).

    Example:
        >>> import torch, flowkit
        >>> deq = flowkit.layers.Dequantization(num_levels=256)
        >>> x = torch.arange(256).view(1, 1, 16, 16)
        >>> z, ladj = deq(x)
        >>> bool((deq.inverse(z)[0] == x).all())
        True
    """

    def __init__(self, num_levels: int = 256, alpha: float = 1e-5, noise_margin: float | None = None):
        super().__init__()
        self.logit = ScaledLogit(num_levels, alpha)
        self.num_levels = num_levels
        margin = default_noise_margin(num_levels) if noise_margin is None else float(noise_margin)
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"noise_margin: expected a float in [0, 0.5), got {noise_margin!r}")
        self.noise_margin = margin
        # carries the module's dtype (follows .double()/.to()); not saved in state_dict
        self.register_buffer("_dtype_ref", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_ref.dtype

    # -- noise ----------------------------------------------------------------------
    def sample_noise(self, inputs: torch.Tensor) -> torch.Tensor:
        """Base noise ``r ~ U[0, 1)`` with the shape of ``inputs`` (this module's dtype)."""
        return torch.rand(inputs.shape, dtype=self.dtype, device=inputs.device)

    def _noise(self, x: torch.Tensor, noise: torch.Tensor):
        """Map base noise ``r`` to ``u0`` in (0, 1); returns ``(u0, log q(u0 | x))``."""
        return noise, noise.new_zeros(noise.shape[0])

    def forward_with_noise(
        self, inputs: torch.Tensor, noise: torch.Tensor, context: Context = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Deterministic forward for fixed base noise ``r``.

        Returns ``(z, logabsdet, log_q)`` with ``logabsdet = log|det dz/dr|`` (the uniform
        base noise has density 1) and ``log_q = log q(u | x)`` of the noise actually used.
        """
        check_image_batch(inputs, "inputs", self.num_levels)
        check_float_tensor(noise, "noise")
        if noise.shape != inputs.shape:
            raise ValueError(f"noise: expected shape {tuple(inputs.shape)}, got {tuple(noise.shape)}")
        return self._forward_checked(inputs, noise)

    def _forward_checked(self, inputs: torch.Tensor, noise: torch.Tensor):
        """:meth:`forward_with_noise` on inputs already validated."""
        x = inputs.to(noise.dtype)
        u0, log_q = self._noise(x, noise)
        m = self.noise_margin
        u = m + (1.0 - 2.0 * m) * u0
        log_q = log_q - u.shape[1:].numel() * math.log1p(-2.0 * m)
        z, ladj = self.logit(x + u)
        return z, ladj - log_q, log_q

    def forward(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        check_image_batch(inputs, "inputs", self.num_levels)  # reads min/max: one device sync
        return self.forward_unchecked(inputs)

    def forward_unchecked(self, inputs: torch.Tensor) -> TransformResult:
        """:meth:`forward` without the input check, for a caller that validated the batch.

        :class:`~flowkit.models.ImageFlow` validates each batch once at its boundary and then
        calls this, so the hot path reads nothing back from the device.
        """
        z, logabsdet, _ = self._forward_checked(inputs, self.sample_noise(inputs))
        return z, logabsdet

    def inverse(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        check_float_tensor(inputs, "inputs")
        if not torch.compiler.is_compiling() and bool(torch.isnan(inputs).any()):
            bad = int(torch.isnan(inputs).sum())
            raise ValueError(
                f"inputs: expected finite latents, got {bad} NaN of {inputs.numel()} values; "
                "a NaN has no integer level (the flow's inverse diverged or the latent was NaN)"
            )
        v, logabsdet = self.logit.inverse(inputs)
        x = torch.floor(v).clamp_(0, self.num_levels - 1).long()
        return x, logabsdet


class VariationalDequantization(Dequantization):
    """Learned dequantization noise ``u ~ q(u | x)`` (Ho et al., 2019, Flow++).

    ``r ~ U[0, 1)`` -> ``ScaledLogit(1)`` -> ``flow(., context=x / (K-1) * 2 - 1)`` -> sigmoid
    gives ``u`` in (0, 1); ``log q(u | x) = -log|du/dr|`` enters the log-det, so
    ``forward`` returns ``log|dz/dv| - log q(u | x)``.  ``inverse`` is the same as for
    :class:`Dequantization` (floor to the level).

    Args:
        flow: a conditional nflows ``Transform`` on noise shaped like the images, taking
            the image scaled to [-1, 1] as ``context`` (e.g. four
            :class:`~flowkit.layers.MaskedAffineCoupling` with
            ``GatedConvNet(C, 2C, context_channels=C)``).
        num_levels, alpha, noise_margin: as for :class:`Dequantization`.
    """

    def __init__(
        self,
        flow: Transform,
        num_levels: int = 256,
        alpha: float = 1e-5,
        noise_margin: float | None = None,
    ):
        super().__init__(num_levels, alpha, noise_margin)
        if not isinstance(flow, Transform):
            raise TypeError(f"flow: expected an nflows Transform, got {type(flow).__name__}")
        self.flow = flow
        self.noise_logit = ScaledLogit(1, alpha)

    def context_from_images(self, x: torch.Tensor) -> torch.Tensor:
        """The conditioning input: images scaled to [-1, 1]."""
        return x * (2.0 / max(self.num_levels - 1, 1)) - 1.0

    def _noise(self, x: torch.Tensor, noise: torch.Tensor):
        h, ladj = self.noise_logit(noise)
        h, ladj_flow = self.flow(h, context=self.context_from_images(x))
        ladj = ladj + ladj_flow
        u0 = torch.sigmoid(h)
        ladj = ladj + sum_except_batch(-F.softplus(-h) - F.softplus(h))
        return u0, -ladj
