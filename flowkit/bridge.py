"""The one place that swaps flow directions between nflows (and flowkit) and normflows.

* nflows / flowkit: ``Transform.forward(x) -> (z, log|det dz/dx|)`` maps **data -> latent**;
  ``inverse(z) -> (x, log|det dx/dz|)``.
* normflows: ``Flow.forward(z) -> (x, log|det dx/dz|)`` maps **latent -> data** (that is how
  ``NormalizingFlow.sample`` uses it: ``log q -= log_det``); ``Flow.inverse(x) -> (z,
  log|det dz/dx|)``.

So a wrapper only renames: the normflows ``forward`` of an nflows transform is its ``inverse``
and vice versa, and each log-det keeps its sign, since each side already reports the log-det of
the map it applies. Tests check both wrappers against the autograd Jacobian.

Every normflows flow runs through :func:`normflows_forward` / :func:`normflows_inverse`, which
accept what normflows flows return and hand back what nflows promises:

* **log-dets** as ``[batch]`` in the inputs' dtype and device, whether the flow returns a
  number (``Squeeze``, ``Split``, ``Merge`` return ``0``), a scalar tensor (``AffineConstFlow``),
  ``[batch]``, ``[batch, 1]``, or a float32 tensor for float64 inputs (``Permute``); any other
  shape is an error naming the flow;
* **context** under the name the flow's method takes it (``context=``, or e.g. ``y`` for
  ``CCAffineConst``); flows that take none ignore it, as nflows' unconditional transforms do;
* **lists** (``Split`` returns ``[z1, z2]``, ``Merge`` takes them) may pass between flows of a
  sequence; an nflows ``Transform`` maps one tensor to one tensor, so :func:`to_nflows` refuses
  ``Split``, ``Merge`` and ``AffineCoupling`` on their own (``AffineCouplingBlock``, which
  splits, couples and merges, is a bijection and is bridged).

:func:`to_nflows` takes every normflows flow that is a bijection and refuses, naming them,
stochastic layers (``MetropolisHastings``, ``HamiltonianMonteCarlo``: a random Markov step is
not a bijection, also inside a ``Composite``) and flows without an inverse (``Planar`` with
tanh, ``Radial``, ``BatchNorm``).

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
    >>> to_nflows(nf.flows.Squeeze())(torch.randn(3, 1, 4, 4))[1]   # integer 0 log-det -> [batch]
    tensor([0., 0., 0.])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import normflows as nf
import torch
from nflows.transforms import Transform

from flowkit.layers.base import Context, TransformResult

__all__ = [
    "STOCHASTIC_FLOWS",
    "NflowsAsNormflows",
    "NormflowsAsNflows",
    "has_inverse",
    "normflows_forward",
    "normflows_inverse",
    "to_nflows",
    "to_normflows",
    "why_not_bijective",
]

#: normflows layers that are random Markov steps, not bijections (any class in
#: ``normflows.flows.stochastic`` counts too)
STOCHASTIC_FLOWS: tuple[type, ...] = (nf.flows.MetropolisHastings, nf.flows.HamiltonianMonteCarlo)

# flows whose input or output is a list [z1, z2] rather than one tensor (Merge subclasses Split)
_LIST_FLOWS: tuple[type, ...] = (nf.flows.Split, nf.flows.AffineCoupling)


def _name(flow: Any) -> str:
    return type(flow).__name__


def _logdet_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _batch_ladj(ladj: Any, batch: int, like: torch.Tensor, flow: Any) -> torch.Tensor:
    """A flow's log-det as ``[batch]`` in ``like``'s dtype and device.

    Accepts a number, a scalar tensor (the same for every sample), ``[batch]`` or ``[batch, 1]``.

    Raises:
        ValueError: any other shape (e.g. ``[batch, D]``: a per-dimension log-det not summed).
        TypeError: not a number or tensor.
    """
    if isinstance(ladj, torch.Tensor):
        ladj = ladj.to(dtype=like.dtype, device=like.device)
        if ladj.dim() == 1 and ladj.shape[0] == batch:
            return ladj
        if ladj.numel() == 1:
            return ladj.reshape(1).expand(batch)
        if ladj.dim() >= 1 and ladj.shape[0] == batch and ladj.numel() == batch:
            return ladj.reshape(batch)
        raise ValueError(
            f"flow: {_name(flow)} returned a log-det of shape {list(ladj.shape)}; "
            f"expected a number, a scalar, [{batch}] or [{batch}, 1]"
        )
    if isinstance(ladj, (int, float)) and not isinstance(ladj, bool):
        return like.new_full((batch,), float(ladj))
    raise TypeError(
        f"flow: {_name(flow)} returned a log-det of type {type(ladj).__name__}; expected a tensor or a number"
    )


@functools.cache
def _context_parameter(function: Callable[..., Any], skip: int) -> tuple[str | None, bool]:
    """``(name, required)`` of the argument ``function`` takes its context under.

    The parameter called ``context`` if there is one, else the first parameter after the input
    (``CCAffineConst.forward(z, y)``), else ``context`` when it takes ``**kwargs``; ``None`` when
    it takes no context. ``skip`` leading parameters (``self``, the input) are not candidates.
    """
    try:
        params = list(inspect.signature(function).parameters.values())[skip:]
    except (TypeError, ValueError):  # no signature to read (a builtin): pass the context by name
        return "context", False
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    chosen = next((p for p in named if p.name == "context"), named[0] if named else None)
    if chosen is not None:
        return chosen.name, chosen.default is inspect.Parameter.empty
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return "context", False
    return None, False


def _context_of(method: Callable[..., Any]) -> tuple[str | None, bool]:
    function = getattr(method, "__func__", None)
    if function is None:  # a plain callable stored on the instance: not cached
        return _context_parameter.__wrapped__(method, 1)
    return _context_parameter(function, 2)


def _call(flow: nf.flows.Flow, inverse: bool, inputs: Any, context: Any) -> tuple[Any, Any]:
    """``flow(inputs)`` or ``flow.inverse(inputs)``, with ``context`` under the flow's own name for it."""
    name, required = _context_of(flow.inverse if inverse else flow.forward)
    run = flow.inverse if inverse else flow
    if context is not None and name is not None:
        return run(inputs, **{name: context})
    if required:
        raise ValueError(
            f"context: {_name(flow)}.{'inverse' if inverse else 'forward'} needs its conditioning argument "
            f"'{name}', got None"
        )
    return run(inputs)


def _run(flows: Iterable[nf.flows.Flow], inputs: torch.Tensor, context: Any, inverse: bool):
    batch = inputs.shape[0]
    total = inputs.new_zeros(batch, dtype=_logdet_dtype(inputs))
    outputs: Any = inputs
    for flow in reversed(list(flows)) if inverse else flows:
        outputs, ladj = _call(flow, inverse, outputs, context)
        total = total + _batch_ladj(ladj, batch, total, flow)
    return outputs, total


def normflows_forward(
    flows: Sequence[nf.flows.Flow], z: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run normflows flows in their own direction, latent -> data (what ``NormalizingFlow.sample`` does).

    Args:
        flows: normflows flows in the order ``NormalizingFlow.flows`` holds them (stochastic
            layers included: this runs a normflows model, it does not claim a bijection).
        z: latents ``[batch, ...]``.
        context: passed to each flow that takes one, under the name it takes it.

    Returns:
        ``(x, logabsdet)`` with ``logabsdet = sum_k log|det dx_k/dx_{k-1}|`` of shape ``[batch]``
        in ``z``'s dtype and device, so ``log q(x) = log q0(z) - logabsdet``.
    """
    return _run(flows, z, context, inverse=False)


def normflows_inverse(
    flows: Sequence[nf.flows.Flow], x: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run normflows flows backwards, data -> latent (what ``NormalizingFlow.log_prob`` does).

    Returns:
        ``(z, logabsdet)`` with ``logabsdet = log|det dz/dx|`` of shape ``[batch]`` in ``x``'s
        dtype and device, so ``log q(x) = log q0(z) + logabsdet``.
    """
    return _run(flows, x, context, inverse=True)


class NflowsAsNormflows(nf.flows.Flow):
    """An nflows ``Transform`` seen as a normflows ``Flow``: ``forward = transform.inverse``."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, z: torch.Tensor, context: Context = None) -> TransformResult:
        """Latent -> data: ``x = T^-1(z)``; returns ``(x, log|det dx/dz|)``."""
        x, ladj = self.transform.inverse(z, context=context)
        return x, _batch_ladj(ladj, z.shape[0], z, self.transform)

    def inverse(self, x: torch.Tensor, context: Context = None) -> TransformResult:
        """Data -> latent: ``z = T(x)``; returns ``(z, log|det dz/dx|)``."""
        z, ladj = self.transform(x, context=context)
        return z, _batch_ladj(ladj, x.shape[0], z, self.transform)


def _one_tensor(outputs: Any, flow: nf.flows.Flow) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"flow: {_name(flow)} returned a {type(outputs).__name__}, not one tensor; an nflows Transform maps "
            "one tensor to one tensor (pair a Split with a Merge inside the flow)"
        )
    return outputs


class NormflowsAsNflows(Transform):
    """A bijective normflows ``Flow`` seen as an nflows ``Transform``: ``forward = flow.inverse``.

    Build it with :func:`to_nflows` (which refuses flows that are not bijections). ``context`` is
    passed under the name the flow takes it; flows that take none ignore it.
    """

    def __init__(self, flow: nf.flows.Flow):
        super().__init__()
        self.flow = flow

    def forward(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        """Data -> latent: ``z = f^-1(x)``; returns ``(z, log|det dz/dx|)`` with shape ``[batch]``."""
        z, ladj = normflows_inverse([self.flow], inputs, context)
        return _one_tensor(z, self.flow), ladj

    def inverse(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        """Latent -> data: ``x = f(z)``; returns ``(x, log|det dx/dz|)`` with shape ``[batch]``."""
        x, ladj = normflows_forward([self.flow], inputs, context)
        return _one_tensor(x, self.flow), ladj


def _is_stochastic(module: torch.nn.Module) -> bool:
    return isinstance(module, STOCHASTIC_FLOWS) or (
        isinstance(module, nf.flows.Flow) and type(module).__module__ == nf.flows.stochastic.__name__
    )


def has_inverse(flow: nf.flows.Flow) -> bool:
    """Whether a normflows flow has an algebraic inverse (by its class; Planar needs leaky_relu).

    Stochastic layers (:data:`STOCHASTIC_FLOWS`) have none: their ``inverse`` is another random step.
    """
    if _is_stochastic(flow):
        return False
    if isinstance(flow, nf.flows.Planar):
        return flow.act == "leaky_relu"
    if isinstance(flow, NflowsAsNormflows):
        return True
    if isinstance(flow, (nf.flows.Reverse, nf.flows.Composite)):
        subs = [flow.flow] if isinstance(flow, nf.flows.Reverse) else list(flow._flows)
        return all(has_inverse(f) for f in subs)
    return type(flow).inverse is not nf.flows.Flow.inverse


def why_not_bijective(flow: nf.flows.Flow) -> str | None:
    """Why :func:`to_nflows` refuses ``flow`` (``None`` when it takes it).

    Example:
        >>> import normflows as nf
        >>> print(why_not_bijective(nf.flows.Radial((2,))))
        Radial has no algebraic inverse, so it cannot be an nflows Transform (which maps data -> latent); use an invertible flow (Planar(act="leaky_relu"), couplings, splines)
        >>> why_not_bijective(nf.flows.Squeeze()) is None
        True
    """
    stochastic = sorted({_name(m) for m in flow.modules() if _is_stochastic(m)})
    if stochastic:
        inside = "" if _is_stochastic(flow) else f"{_name(flow)} contains "
        return (
            f"{inside}{', '.join(stochastic)}: a stochastic layer (a random Markov-chain step whose 'inverse' is "
            "another random step), not a bijection, so it cannot be an nflows Transform; run it in a normflows "
            "model (flowkit.bridge.normflows_forward runs it)"
        )
    if isinstance(flow, _LIST_FLOWS):
        return (
            f"{_name(flow)} maps between one tensor and a list [z1, z2], so it cannot be an nflows Transform "
            "(one tensor to one tensor); use it between a Split and a Merge, as normflows' AffineCouplingBlock does"
        )
    if not has_inverse(flow):
        return (
            f"{_name(flow)} has no algebraic inverse, so it cannot be an nflows Transform (which maps data -> "
            'latent); use an invertible flow (Planar(act="leaky_relu"), couplings, splines)'
        )
    return None


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
    """Wrap a bijective normflows ``Flow`` as an nflows ``Transform`` (data -> latent).

    Args:
        flow: a normflows flow with an algebraic inverse (e.g. ``AffineCouplingBlock``,
            ``CoupledRationalQuadraticSpline``, ``Planar(act="leaky_relu")``, ``Squeeze``,
            ``CCAffineConst`` with its class vector as ``context``).

    Returns:
        an nflows ``Transform`` whose ``forward(x)`` is ``flow.inverse(x)``.

    Raises:
        TypeError: ``flow`` is not a normflows ``Flow``.
        ValueError: ``flow`` is not a bijection of one tensor (see :func:`why_not_bijective`).
    """
    if not isinstance(flow, nf.flows.Flow):
        raise TypeError(f"flow: expected a normflows Flow, got {type(flow).__name__}")
    reason = why_not_bijective(flow)
    if reason is not None:
        raise ValueError(f"flow: {reason}")
    return NormflowsAsNflows(flow)
