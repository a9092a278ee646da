"""Builders for 2D normflows models: ``build_flow(kind, layers)`` on a ``DiagGaussian(2)`` base.

Kinds: ``planar`` (the seed's 16x Planar; Rezende & Mohamed, 2015), ``radial``, ``affine``
(RealNVP-style affine couplings, Dinh et al., 2017), ``spline`` (normflows' rational-quadratic
coupling splines, Durkan et al., 2019) and ``nflows-spline`` (nflows' rational-quadratic
couplings brought in through :func:`flowkit.bridge.to_normflows`).
"""

from __future__ import annotations

from typing import Callable

import normflows as nf
import torch

__all__ = ["FLOW_KINDS", "build_flow", "is_invertible"]


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
            nf.flows.CoupledRationalQuadraticSpline(2, 2, hidden, num_bins=bins, tail_bound=tail_bound, reverse_mask=i % 2 == 1)
        )
    return flows


def _nflows_spline(layers: int, hidden: int = 64, bins: int = 8, tail_bound: float = 4.0, **kw) -> list:
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import CompositeTransform, PiecewiseRationalQuadraticCouplingTransform

    from flowkit.bridge import to_normflows

    parts = []
    for i in range(layers):
        mask = torch.tensor([1, 0] if i % 2 == 0 else [0, 1])
        parts.append(
            PiecewiseRationalQuadraticCouplingTransform(
                mask,
                lambda cin, cout: ResidualNet(cin, cout, hidden_features=hidden, num_blocks=2),
                num_bins=bins,
                tails="linear",
                tail_bound=tail_bound,
            )
        )
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
            ``act`` (planar: ``"tanh"`` or ``"leaky_relu"``).

    Returns:
        the model (its target ``p`` is unset: pass the target to :func:`flowkit.toy2d.fit`).
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"kind: unknown flow {kind!r}; expected one of {', '.join(FLOW_KINDS)}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers: expected a positive int, got {layers!r}")
    flows = FLOW_KINDS[kind](layers, **kwargs)
    return nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=trainable_base), flows=flows)


def is_invertible(model: nf.NormalizingFlow) -> bool:
    """Whether every flow of ``model`` has an inverse (so ``model.log_prob`` works)."""
    from flowkit.bridge import has_inverse

    return all(has_inverse(f) for f in model.flows)
