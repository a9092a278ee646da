"""Builders for 2D normflows models: ``build_flow(kind, layers)`` on a ``DiagGaussian(2)`` base.

Kinds: ``planar`` (the seed's 16x Planar; Rezende & Mohamed, 2015), ``radial``, ``affine``
(RealNVP-style affine couplings, Dinh et al., 2017), ``spline`` (normflows' rational-quadratic
coupling splines, Durkan et al., 2019) and ``nflows-spline`` (nflows' rational-quadratic
couplings brought in through :func:`flowkit.bridge.to_normflows`). :func:`extend_flow` appends
layers that start as the identity to a fitted model (the ``refine`` stage of
:func:`flowkit.toy2d.fit`). :func:`model_sample` and :func:`model_log_prob` run any normflows
model through :mod:`flowkit.bridge` (the one place that sums normflows log-dets).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import normflows as nf
import torch

from flowkit.bridge import normflows_forward, normflows_inverse

__all__ = [
    "FLOW_KINDS",
    "IDENTITY_KINDS",
    "INVERTIBLE_KINDS",
    "base_sample",
    "gaussian_mixture_base",
    "build_flow",
    "extend_flow",
    "is_invertible",
    "model_log_prob",
    "model_sample",
    "push_forward",
]


def _planar(layers: int, **kw) -> list:
    return [nf.flows.Planar((2,), act=kw.get("act", "tanh")) for _ in range(layers)]


def _radial(layers: int, **kw) -> list:
    return [nf.flows.Radial((2,)) for _ in range(layers)]


def _affine(layers: int, hidden: int = 64, **kw) -> list:
    flows = []
    for _ in range(layers):
        # x2 -> (shift, log-scale) for x1; zero-initialised last layer: identity at start
        flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([1, hidden, hidden, 2], init_zeros=True)))
        flows.append(nf.flows.Permute(2, mode="swap"))
    return flows


def _spline(layers: int, hidden: int = 64, bins: int = 8, tail_bound: float = 4.0, **kw) -> list:
    flows = []
    for i in range(layers):
        flows.append(
            nf.flows.CoupledRationalQuadraticSpline(
                2, 2, hidden, num_bins=bins, tail_bound=tail_bound, reverse_mask=i % 2 == 1
            )
        )
    return flows


def _identity_spline(coupling) -> None:
    """Make an nflows rational-quadratic coupling the identity: with the last layer of its net
    zero, every bin has the same width and height, and the derivative bias puts slope 1 at every
    knot (``min_derivative + softplus(c) = 1``, the value nflows pads the boundary knots with)."""
    last = coupling.transform_net.final_layer
    bins = coupling.num_bins
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias.view(-1, 3 * bins - 1)[:, 2 * bins :] = math.log(math.expm1(1 - coupling.min_derivative))


def _nflows_spline(
    layers: int, hidden: int = 64, bins: int = 8, tail_bound: float = 4.0, identity_init: bool = False, **kw
) -> list:
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import CompositeTransform, PiecewiseRationalQuadraticCouplingTransform

    from flowkit.bridge import to_normflows

    parts = []
    for i in range(layers):
        mask = torch.tensor([1, 0] if i % 2 == 0 else [0, 1])
        coupling = PiecewiseRationalQuadraticCouplingTransform(
            mask,
            lambda cin, cout: ResidualNet(cin, cout, hidden_features=hidden, num_blocks=2),
            num_bins=bins,
            tails="linear",
            tail_bound=tail_bound,
        )
        if identity_init:
            _identity_spline(coupling)
        parts.append(coupling)
    return [to_normflows(CompositeTransform(parts))]


FLOW_KINDS: dict[str, Callable[..., list]] = {
    "planar": _planar,
    "radial": _radial,
    "affine": _affine,
    "spline": _spline,
    "nflows-spline": _nflows_spline,
}


def build_flow(kind: str = "planar", layers: int = 16, *, trainable_base: bool = True, **kwargs) -> nf.NormalizingFlow:
    """A normflows ``NormalizingFlow`` on R^2: ``x = f_K(...f_1(z))``, ``z ~ N(loc, diag(scale^2))``.

    Args:
        kind: one of :data:`FLOW_KINDS` (``planar``, ``radial``, ``affine``, ``spline``,
            ``nflows-spline``).
        layers: number of layers (coupling kinds: coupling layers).
        trainable_base: whether the Gaussian base has a learned mean and scale (the seed's).
        **kwargs: ``hidden`` (coupling/spline nets), ``bins`` and ``tail_bound`` (splines),
            ``identity_init`` (``nflows-spline``: start as the identity), ``act`` (planar:
            ``"tanh"`` or ``"leaky_relu"``).

    Returns:
        the model (its target ``p`` is unset: pass the target to :func:`flowkit.toy2d.fit`).
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"kind: unknown flow {kind!r}; expected one of {', '.join(FLOW_KINDS)}")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers: expected a positive int, got {layers!r}")
    flows = FLOW_KINDS[kind](layers, **kwargs)
    return nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=trainable_base), flows=flows)


IDENTITY_KINDS = ("nflows-spline",)  # kinds that can start as the identity
INVERTIBLE_KINDS = ("nflows-spline", "spline", "affine")  # kinds with an inverse (log q at any point)


def extend_flow(
    model: nf.NormalizingFlow, kind: str = "nflows-spline", layers: int = 2, **kwargs
) -> nf.NormalizingFlow:
    """``model`` followed by ``layers`` new layers of ``kind`` that start as the identity.

    The new model shares ``model``'s base and layers (training it trains them), so it starts at
    exactly ``model``'s density: a fitted Planar stack keeps the modes it found while the new
    layers reshape each one (the ``refine`` stage of :func:`flowkit.toy2d.fit`).

    Args:
        model: a normflows ``NormalizingFlow``.
        kind: one of :data:`IDENTITY_KINDS`: ``"nflows-spline"`` (rational-quadratic couplings,
            identity-initialised).
        layers: number of new coupling layers.
        **kwargs: as for :func:`build_flow` (``hidden``, ``bins``, ``tail_bound``).
    """
    if kind not in IDENTITY_KINDS:
        raise ValueError(
            f"kind: expected one of {', '.join(IDENTITY_KINDS)} (layers that can start as the identity), got {kind!r}"
        )
    flows = getattr(model, "flows", None)
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "q0") and isinstance(flows, torch.nn.ModuleList)):
        raise TypeError(f"model: expected a normflows NormalizingFlow (q0, flows), got {type(model).__name__}")
    new = build_flow(kind, layers, identity_init=True, **kwargs).flows  # checks layers; its fresh base is dropped
    ref = next(model.parameters(), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    return nf.NormalizingFlow(q0=model.q0, flows=list(flows) + list(new), p=getattr(model, "p", None))


def is_invertible(model: nf.NormalizingFlow) -> bool:
    """Whether every flow of ``model`` has an inverse (so ``model.log_prob`` works)."""
    from flowkit.bridge import has_inverse

    return all(has_inverse(f) for f in model.flows)


def push_forward(model: nf.NormalizingFlow, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = f_K(...f_1(z))`` and ``log q(x) = log q0(z) - log|det dx/dz|`` for base draws ``z``."""
    x, logabsdet = normflows_forward(model.flows, z)
    return x, model.q0.log_prob(z) - logabsdet


def base_sample(model: nf.NormalizingFlow, num_samples: int) -> torch.Tensor:
    """``z ~ q0``, ``[num_samples, 2]``: draws from ``model``'s base distribution."""
    return model.q0(num_samples)[0]


def model_sample(model: nf.NormalizingFlow, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ q`` and ``log q(x)``, ``[num_samples, 2]`` and ``[num_samples]`` (normflows' ``sample``)."""
    return push_forward(model, base_sample(model, num_samples))


def model_log_prob(model: nf.NormalizingFlow, x: torch.Tensor) -> torch.Tensor:
    """``log q(x) = log q0(z) + log|det dz/dx|``, ``z = f^-1(x)`` (needs an invertible model)."""
    z, logabsdet = normflows_inverse(model.flows, x)
    return model.q0.log_prob(z) + logabsdet


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` starting centres by weighted k-means++ (Arthur & Vassilvitskii, 2007)."""
    centres = x[torch.multinomial(w, 1)]
    for _ in range(k - 1):
        d2 = torch.cdist(x, centres).min(1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(w * d2 + 1e-300, 1)]])
    return centres


@torch.no_grad()
def gaussian_mixture_base(
    x: torch.Tensor, weights: torch.Tensor, components: int = 8, iters: int = 25
) -> nf.distributions.GaussianMixture:
    """A trainable normflows ``GaussianMixture`` fitted to weighted samples by k-means.

    Weighted k-means (k-means++ start, ``iters`` Lloyd steps) on ``x`` with ``weights``; each
    component gets its cluster's mean, per-axis standard deviation (at least 5% of the data's)
    and mass as mixture weight. With importance weights ``p~(x) / r(x)`` of samples ``x ~ r`` it
    puts the target's mass in each region, whatever ``r``'s.

    Args:
        x: samples ``[n, d]``.
        weights: non-negative weights ``[n]`` (need not sum to 1).
        components: Gaussians (at most ``n``).
        iters: Lloyd iterations.

    Returns:
        the mixture, in ``x``'s dtype and on its device.
    """
    w = weights.double() / weights.double().sum()
    xd = x.double()
    k = min(components, int((w > 0).sum()))
    centres = _kmeans_pp(xd, w, k)
    for _ in range(iters):
        assign = torch.cdist(xd, centres).argmin(1)
        mass = xd.new_zeros(k).index_add_(0, assign, w)
        sums = xd.new_zeros(k, xd.shape[1]).index_add_(0, assign, w[:, None] * xd)
        centres = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-300)[:, None], centres)
    assign = torch.cdist(xd, centres).argmin(1)
    mass = xd.new_zeros(k).index_add_(0, assign, w)
    var = xd.new_zeros(k, xd.shape[1]).index_add_(0, assign, w[:, None] * (xd - centres[assign]) ** 2)
    spread = ((w[:, None] * (xd - (w[:, None] * xd).sum(0)) ** 2).sum(0)).sqrt()
    scale = torch.maximum((var / mass.clamp_min(1e-300)[:, None]).sqrt(), 0.05 * spread)
    base = nf.distributions.GaussianMixture(
        k, xd.shape[1], loc=centres.cpu().numpy(), scale=scale.cpu().numpy(), weights=mass.clamp_min(1e-6).cpu().numpy()
    )
    return base.to(device=x.device, dtype=x.dtype)
