"""The one place that swaps flow directions between nflows (and flowkit) and normflows.

* nflows / flowkit: ``Transform.forward(x) -> (z, log|det dz/dx|)`` maps **data -> latent**;
  ``inverse(z) -> (x, log|det dx/dz|)``.
* normflows: ``Flow.forward(z) -> (x, log|det dx/dz|)`` maps **latent -> data** (that is how
  ``NormalizingFlow.sample`` uses it: ``log q -= log_det``); ``Flow.inverse(x) -> (z,
  log|det dz/dx|)``.

So a wrapper only renames: the normflows ``forward`` of an nflows transform is its ``inverse``
and vice versa, and each log-det keeps its sign, since each side already reports the log-det of
the map it applies. Tests check both wrappers against the autograd Jacobian.

Example:
    >>> import torch, normflows as nf
    >>> from nflows.transforms import ActNorm
    >>> from flowkit.bridge import to_nflows, to_normflows
    >>> flow = to_normflows(ActNorm(2))             # a normflows Flow, latent -> data
    >>> x, ld = flow(torch.randn(5, 2)); ld.shape
    torch.Size([5])
    >>> t = to_nflows(nf.flows.AffineConstFlow((2,)))  # an nflows Transform, data -> latent
    >>> z, ld = t(torch.randn(5, 2)); z.shape
    torch.Size([5, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import normflows as nf
import torch
from nflows.transforms import Transform

__all__ = [
    "NflowsAsNormflows",
    "NormflowsAsNflows",
    "has_inverse",
    "normflows_forward",
    "normflows_inverse",
    "to_nflows",
    "to_normflows",
]


def _batch_ladj(ladj: torch.Tensor, batch: int) -> torch.Tensor:
    """Log-dets as ``[batch]``: normflows flows may return ``[batch, 1]`` or, when the log-det is
    the same for every sample (``AffineConstFlow``), a scalar."""
    if ladj.dim() == 1 and ladj.shape[0] == batch:
        return ladj
    if ladj.numel() == 1:
        return ladj.reshape(1).expand(batch).clone()
    return ladj.reshape(batch)


class NflowsAsNormflows(nf.flows.Flow):
    """An nflows ``Transform`` seen as a normflows ``Flow``: ``forward = transform.inverse``."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """Latent -> data: ``x = T^-1(z)``; returns ``(x, log|det dx/dz|)``."""
        x, ladj = self.transform.inverse(z, context=context)
        return x, _batch_ladj(ladj, z.shape[0])

    def inverse(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Data -> latent: ``z = T(x)``; returns ``(z, log|det dz/dx|)``."""
        z, ladj = self.transform(x, context=context)
        return z, _batch_ladj(ladj, x.shape[0])


class NormflowsAsNflows(Transform):
    """An invertible normflows ``Flow`` seen as an nflows ``Transform``: ``forward = flow.inverse``.

    ``context`` is passed on only when given (most normflows flows take none).
    """

    def __init__(self, flow: nf.flows.Flow):
        super().__init__()
        self.flow = flow

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        """Data -> latent: ``z = f^-1(x)``; returns ``(z, log|det dz/dx|)``."""
        z, ladj = self.flow.inverse(inputs) if context is None else self.flow.inverse(inputs, context=context)
        return z, _batch_ladj(ladj, inputs.shape[0])

    def inverse(self, inputs: torch.Tensor, context: torch.Tensor | None = None):
        """Latent -> data: ``x = f(z)``; returns ``(x, log|det dx/dz|)``."""
        x, ladj = self.flow(inputs) if context is None else self.flow(inputs, context=context)
        return x, _batch_ladj(ladj, inputs.shape[0])


def has_inverse(flow: nf.flows.Flow) -> bool:
    """Whether a normflows flow has an algebraic inverse (by its class; Planar needs leaky_relu)."""
    if isinstance(flow, nf.flows.Planar):
        return flow.act == "leaky_relu"
    if isinstance(flow, NflowsAsNormflows):
        return True
    if isinstance(flow, (nf.flows.Reverse, nf.flows.Composite)):
        subs = [flow.flow] if isinstance(flow, nf.flows.Reverse) else list(flow._flows)
        return all(has_inverse(f) for f in subs)
    return type(flow).inverse is not nf.flows.Flow.inverse


def to_normflows(transform: Transform) -> NflowsAsNormflows:
    """Wrap an nflows ``Transform`` (any flowkit layer) as a normflows ``Flow``.

    Args:
        transform: maps data -> latent in ``forward`` (nflows contract).

    Returns:
        a normflows ``Flow`` whose ``forward(z)`` is ``transform.inverse(z)`` (latent -> data,
        ``log|det dx/dz|``) and whose ``inverse(x)`` is ``transform(x)``.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"transform: expected an nflows Transform, got {type(transform).__name__}")
    return NflowsAsNormflows(transform)


def to_nflows(flow: nf.flows.Flow) -> NormflowsAsNflows:
    """Wrap an invertible normflows ``Flow`` as an nflows ``Transform`` (data -> latent).

    Args:
        flow: a normflows flow with an algebraic inverse (e.g. ``AffineCouplingBlock``,
            ``CoupledRationalQuadraticSpline``, ``Planar(act="leaky_relu")``).

    Returns:
        an nflows ``Transform`` whose ``forward(x)`` is ``flow.inverse(x)``.

    Raises:
        ValueError: if ``flow`` has no inverse (``Planar`` with tanh, ``Radial``).
    """
    if not isinstance(flow, nf.flows.Flow):
        raise TypeError(f"flow: expected a normflows Flow, got {type(flow).__name__}")
    if not has_inverse(flow):
        raise ValueError(
            f"flow: {type(flow).__name__} has no algebraic inverse, so it cannot be an nflows Transform "
            "(which maps data -> latent); use an invertible flow (e.g. Planar(act='leaky_relu'), couplings, splines)"
        )
    return NormflowsAsNflows(flow)


def normflows_forward(
    flows: Sequence[nf.flows.Flow], z: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run normflows flows in their own direction, latent -> data (what ``NormalizingFlow.sample`` does).

    Args:
        flows: normflows flows in the order ``NormalizingFlow.flows`` holds them.
        z: latents ``[batch, ...]``.
        context: passed on to flows that take one.

    Returns:
        ``(x, logabsdet)`` with ``logabsdet = sum_k log|det dx_k/dx_{k-1}|`` of shape ``[batch]``,
        so ``log q(x) = log q0(z) - logabsdet``.
    """
    x, total = z, z.new_zeros(z.shape[0])
    for flow in flows:
        x, ladj = flow(x) if context is None else flow(x, context=context)
        total = total + _batch_ladj(torch.as_tensor(ladj, dtype=total.dtype, device=total.device), z.shape[0])
    return x, total


def normflows_inverse(
    flows: Sequence[nf.flows.Flow], x: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run normflows flows backwards, data -> latent (what ``NormalizingFlow.log_prob`` does).

    Returns:
        ``(z, logabsdet)`` with ``logabsdet = log|det dz/dx|`` of shape ``[batch]``, so
        ``log q(x) = log q0(z) + logabsdet``.
    """
    z, total = x, x.new_zeros(x.shape[0])
    for flow in reversed(list(flows)):
        z, ladj = flow.inverse(z) if context is None else flow.inverse(z, context=context)
        total = total + _batch_ladj(torch.as_tensor(ladj, dtype=total.dtype, device=total.device), x.shape[0])
    return z, total
