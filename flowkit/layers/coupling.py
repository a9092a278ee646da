"""Affine couplings: the tutorial's masked coupling (RealNVP, Dinh et al., 2017) and nflows'
channel coupling with the tutorial's soft clamp (:class:`ClampedAffineCoupling`), as nflows Transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from nflows.transforms import AffineCouplingTransform, Transform
from torch import nn

from flowkit.layers.base import Context, TransformResult, check_float_tensor, sum_except_batch

__all__ = ["ClampedAffineCoupling", "MaskedAffineCoupling", "checkerboard_mask", "channel_mask"]


def checkerboard_mask(h: int, w: int, invert: bool = False) -> torch.Tensor:
    """``[1, 1, h, w]`` mask with 1 where ``(i + j)`` is odd (0 elsewhere); flipped if ``invert``."""
    if h < 1 or w < 1:
        raise ValueError(f"h, w: expected positive sizes, got {h}x{w}")
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    mask = ((i + j) % 2).float().view(1, 1, h, w)
    return 1.0 - mask if invert else mask


def channel_mask(c: int, invert: bool = False) -> torch.Tensor:
    """``[1, c, 1, 1]`` mask with 1 on the first ``c // 2`` channels; flipped if ``invert``."""
    if c < 2:
        raise ValueError(f"c: a channel mask needs at least 2 channels, got {c}")
    mask = torch.zeros(c)
    mask[: c // 2] = 1.0
    mask = mask.view(1, c, 1, 1)
    return 1.0 - mask if invert else mask


class MaskedAffineCoupling(Transform):
    """``z' = (z + t) * exp(s)`` on the unmasked part, with ``s = tanh(s_raw / f) * f``.

    ``[s_raw, t] = net(z * mask, context)``; positions where ``mask == 1`` pass through and
    condition the net, positions where ``mask == 0`` are transformed; ``f = exp(scale)`` is a
    learned per-channel soft clamp.  ``logabsdet = sum(s * (1 - mask))``.

    Args:
        mask: 0/1 tensor broadcastable to ``[1, C, H, W]``
            (:func:`checkerboard_mask`, :func:`channel_mask`).
        net: module ``net(x, context) -> [B, 2C, H, W]`` (e.g. ``GatedConvNet(C, 2C)``),
            last layer zero-initialised so the coupling starts as the identity.
        num_channels: ``C``.
    """

    def __init__(self, mask: torch.Tensor, net: nn.Module, num_channels: int):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels: expected a positive int, got {num_channels!r}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a tensor, got {type(mask).__name__}")
        if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] not in (1, num_channels):
            raise ValueError(
                f"mask: expected a tensor broadcastable to [1, {num_channels}, H, W], got shape {tuple(mask.shape)}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected only 0s and 1s")
        self.net = net
        self.num_channels = num_channels
        self.scaling_factor = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("mask", mask.float())

    def _scale_shift(self, inputs: torch.Tensor, context):
        check_float_tensor(inputs, "inputs", dim=4)
        if inputs.shape[1] != self.num_channels:
            raise ValueError(f"inputs: expected {self.num_channels} channels, got shape {tuple(inputs.shape)}")
        if self.mask.shape[2:] != (1, 1) and self.mask.shape[2:] != inputs.shape[2:]:
            raise ValueError(
                f"inputs: spatial size {tuple(inputs.shape[2:])} does not match the mask's {tuple(self.mask.shape[2:])}"
            )
        mask = self.mask.to(inputs.dtype)
        params = self.net(inputs * mask, context) if context is not None else self.net(inputs * mask)
        s, t = params.chunk(2, dim=1)
        f = self.scaling_factor.exp().view(1, -1, 1, 1)
        s = torch.tanh(s / f) * f
        keep = 1.0 - mask
        return s * keep, t * keep

    def forward(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        s, t = self._scale_shift(inputs, context)
        return (inputs + t) * torch.exp(s), sum_except_batch(s)

    def inverse(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        s, t = self._scale_shift(inputs, context)
        return inputs * torch.exp(-s) - t, -sum_except_batch(s)


class ClampedAffineCoupling(AffineCouplingTransform):
    """nflows' affine coupling with the tutorial's soft clamp on the log-scale.

    ``z_b = x_b * exp(s) + t`` with ``s = f * tanh(s_raw / f)``, ``[t, s_raw] = net(x_a)`` and a
    learned per-channel ``f = exp(log_clamp)`` (starts at 1); ``logabsdet = sum(s)``.
    Unlike nflows' ``AffineCouplingTransform`` (scale ``sigmoid(s_raw + 2) + 1e-3``, 0.88 for
    a zero-initialised net) this is the identity at initialisation and can also expand.

    Args:
        mask: nflows channel mask (``> 0``: transformed, ``<= 0``: passed through).
        transform_net_create_fn: ``(in_channels, out_channels) -> net``, e.g.
            :func:`flowkit.layers.gated_conv_net`.
    """

    def __init__(self, mask: Any, transform_net_create_fn: Callable[[int, int], nn.Module]) -> None:
        super().__init__(mask, transform_net_create_fn)
        self.log_clamp = nn.Parameter(torch.zeros(self.num_transform_features))

    def _log_scale_and_shift(self, transform_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_transform_features
        shift, raw = transform_params[:, :n], transform_params[:, n:]
        f = self.log_clamp.exp().view(1, n, *[1] * (transform_params.dim() - 2))
        return torch.tanh(raw / f) * f, shift

    def _coupling_transform_forward(self, inputs: torch.Tensor, transform_params: torch.Tensor) -> TransformResult:
        s, t = self._log_scale_and_shift(transform_params)
        return inputs * torch.exp(s) + t, sum_except_batch(s)

    def _coupling_transform_inverse(self, inputs: torch.Tensor, transform_params: torch.Tensor) -> TransformResult:
        s, t = self._log_scale_and_shift(transform_params)
        return (inputs - t) * torch.exp(-s), -sum_except_batch(s)
