"""Verify that a transform honours flowkit's contract, numerically.

:func:`check_transform` measures, on a small input:

* the inverse round trip ``max |inverse(forward(x)) - x|`` (relative to the scale of ``x``);
* ``max |logabsdet - log|det J||`` with ``J`` from :func:`torch.autograd.functional.jacobian`
  (computed on a float64 copy of the transform by default);
* ``max |logabsdet_forward + logabsdet_inverse|`` (0 for a bijection; for stochastic layers
  ``+ log q(u | x)``).

Stochastic layers (dequantization) are checked with their noise fixed: they expose
``forward_with_noise(x, noise) -> (z, logabsdet, log_q)``; the Jacobian is taken with respect
to the base noise ``r ~ U[0, 1)`` and the round trip must be exact on the integers.

:data:`LAYER_CASES` is the registry of every built-in layer (used by ``flowkit check`` and by
the shared transform test); a new layer joins it with :func:`register_case`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from nflows.transforms import Transform

__all__ = [
    "CheckReport",
    "LayerCase",
    "LAYER_CASES",
    "check_transform",
    "register_case",
    "perturb_parameters",
    "format_reports",
]


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_transform`. ``ok`` is True when all errors are within tolerance."""

    name: str
    dtype: str
    roundtrip_error: float
    jacobian_error: float
    ladj_sum_error: float
    tolerance: dict
    ok: bool

    def __str__(self) -> str:
        return format_reports([self])


@dataclasses.dataclass
class LayerCase:
    """A layer, an input for it and (optionally) a context: one row of the registry."""

    transform: Transform
    inputs: torch.Tensor
    context: torch.Tensor | None = None


LAYER_CASES: dict[str, Callable[[], LayerCase]] = {}


def register_case(name: str):
    """Decorator adding ``fn() -> LayerCase`` to :data:`LAYER_CASES` under ``name``."""

    def deco(fn: Callable[[], LayerCase]) -> Callable[[], LayerCase]:
        if name in LAYER_CASES:
            raise ValueError(f"name: a layer case called {name!r} is already registered")
        LAYER_CASES[name] = fn
        return fn

    return deco


@torch.no_grad()
def perturb_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add ``N(0, scale^2)`` noise to every parameter (so a zero-initialised coupling is no
    longer the identity and a check exercises it). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return module


def _is_stochastic(transform) -> bool:
    return hasattr(transform, "forward_with_noise") and hasattr(transform, "sample_noise")


def _to_dtype(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _jacobian_logdets(fn, points: torch.Tensor) -> torch.Tensor:
    """``log|det d fn(p)/dp|`` for each row ``p`` of ``points`` (one Jacobian per sample)."""
    out = []
    for i in range(points.shape[0]):
        p = points[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda q: fn(q, i).reshape(-1), p)  # noqa: B023 (called at once)
        jac = jac.reshape(p.numel(), p.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _ctx_row(context, i):
    return None if context is None else context[i : i + 1]


def check_transform(
    transform: Transform,
    inputs: torch.Tensor,
    context: torch.Tensor | None = None,
    *,
    name: str | None = None,
    jacobian_dtype: torch.dtype = torch.float64,
    max_jacobian_samples: int = 4,
) -> CheckReport:
    """Check ``transform`` on ``inputs`` (small: the Jacobian is ``D x D`` per sample).

    Args:
        transform: an nflows ``Transform`` (data -> latent in ``forward``).
        inputs: a batch ``[B, ...]``; integer images for stochastic (dequantization) layers.
        context: optional context batch passed to ``forward``/``inverse``.
        name: label for the report (default: the class name).
        jacobian_dtype: dtype of the copy on which the Jacobian is computed.
        max_jacobian_samples: Jacobians are computed for at most this many samples.

    Returns:
        A :class:`CheckReport`; the transform is left in the mode (train/eval) it was in.

    Example:
        >>> import torch, flowkit
        >>> from nflows.transforms import ActNorm
        >>> flowkit.check_transform(ActNorm(3), torch.randn(4, 3)).ok
        True
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"transform: expected an nflows Transform, got {type(transform).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ValueError(f"inputs: expected a batch tensor [B, ...], got {getattr(inputs, 'shape', inputs)}")
    if context is not None and (not isinstance(context, torch.Tensor) or context.shape[0] != inputs.shape[0]):
        raise ValueError("context: expected a tensor with the same batch size as inputs")
    name = name or type(transform).__name__
    stochastic = _is_stochastic(transform)
    was_training = transform.training
    transform.eval()
    try:
        ref_dtype = next(
            (b.dtype for b in list(transform.parameters()) + list(transform.buffers()) if b.is_floating_point()),
            torch.get_default_dtype(),
        )
        run_dtype = inputs.dtype if inputs.is_floating_point() else ref_dtype
        with torch.no_grad():
            if stochastic:
                noise = transform.sample_noise(inputs)
                z, ladj_f, log_q = transform.forward_with_noise(inputs, noise, context)
                x_back, ladj_i = transform.inverse(z, context)
                roundtrip = (x_back.to(torch.float64) - inputs.to(torch.float64)).abs().max().item()
                ladj_sum = (ladj_f + ladj_i + log_q).abs().max().item()
            else:
                z, ladj_f = transform(inputs, context)
                x_back, ladj_i = transform.inverse(z, context)
                scale = 1.0 + inputs.abs().max().item()
                roundtrip = (x_back - inputs).abs().max().item() / scale
                ladj_sum = (ladj_f + ladj_i).abs().max().item()
            ladj_scale = 1.0 + ladj_f.abs().max().item()

        # Jacobian on a float64 copy
        t64 = copy.deepcopy(transform).to(jacobian_dtype)
        n = min(inputs.shape[0], max_jacobian_samples)
        ctx64 = _to_dtype(context, jacobian_dtype)
        if stochastic:
            x = inputs[:n]
            r = noise[:n].to(jacobian_dtype)
            fn = lambda q, i: t64.forward_with_noise(x[i : i + 1], q, _ctx_row(ctx64, i))[0]  # noqa: E731
            with torch.no_grad():
                ladj64 = t64.forward_with_noise(x, r, None if ctx64 is None else ctx64[:n])[1]
            jac = _jacobian_logdets(fn, r)
        else:
            x64 = inputs[:n].to(jacobian_dtype)
            fn = lambda q, i: t64(q, _ctx_row(ctx64, i))[0]  # noqa: E731
            with torch.no_grad():
                ladj64 = t64(x64, None if ctx64 is None else ctx64[:n])[1]
            jac = _jacobian_logdets(fn, x64)
        jacobian_error = (ladj64 - jac).abs().max().item() / (1.0 + jac.abs().max().item())
    finally:
        transform.train(was_training)

    if run_dtype == torch.float64:
        tol = {"roundtrip": 1e-9, "jacobian": 1e-8, "ladj_sum": 1e-8 * ladj_scale}
    else:
        tol = {"roundtrip": 1e-4, "jacobian": 1e-8, "ladj_sum": 1e-4 * ladj_scale}
    if stochastic:
        tol["roundtrip"] = 0.0
    ok = roundtrip <= tol["roundtrip"] and jacobian_error <= tol["jacobian"] and ladj_sum <= tol["ladj_sum"]
    return CheckReport(name, str(run_dtype).replace("torch.", ""), roundtrip, jacobian_error, ladj_sum, tol, ok)


def format_reports(reports: list[CheckReport]) -> str:
    """A text table of reports."""
    header = f"{'layer':<34} {'dtype':<8} {'roundtrip':>10} {'|ladj-logdetJ|':>15} {'|fwd+inv ladj|':>15}  ok"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(
            f"{r.name:<34} {r.dtype:<8} {r.roundtrip_error:>10.2e} {r.jacobian_error:>15.2e} {r.ladj_sum_error:>15.2e}  {'yes' if r.ok else 'NO'}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Registry of built-in layers. Each case is small (<= 32 dims per sample) and, where the
# layer has parameters, perturbed away from its (identity) initialisation by the caller.
# --------------------------------------------------------------------------------------


def _images(c=1, h=4, w=4, b=3, levels=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (b, c, h, w), generator=gen)


def _floats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@register_case("ScaledLogit")
def _case_scaled_logit() -> LayerCase:
    from flowkit.layers import ScaledLogit

    v = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 255.0 + 0.5
    return LayerCase(ScaledLogit(256), v)


@register_case("Dequantization")
def _case_dequantization() -> LayerCase:
    from flowkit.layers import Dequantization

    return LayerCase(Dequantization(256), _images())


@register_case("VariationalDequantization")
def _case_vardeq() -> LayerCase:
    from nflows.transforms import CompositeTransform

    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, VariationalDequantization, checkerboard_mask

    flow = CompositeTransform(
        [
            MaskedAffineCoupling(
                checkerboard_mask(4, 4, invert=i % 2 == 1), GatedConvNet(1, 2, 8, 1, context_channels=1), 1
            )
            for i in range(2)
        ]
    )
    return LayerCase(VariationalDequantization(flow, 256), _images())


@register_case("MaskedAffineCoupling[checkerboard]")
def _case_coupling_checkerboard() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, checkerboard_mask

    return LayerCase(MaskedAffineCoupling(checkerboard_mask(4, 4), GatedConvNet(2, 4, 8, 2), 2), _floats(3, 2, 4, 4))


@register_case("MaskedAffineCoupling[channel]")
def _case_coupling_channel() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, channel_mask

    return LayerCase(
        MaskedAffineCoupling(channel_mask(4, invert=True), GatedConvNet(4, 8, 8, 1), 4), _floats(3, 4, 2, 2)
    )


@register_case("MaskedAffineCoupling[context]")
def _case_coupling_context() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, checkerboard_mask

    net = GatedConvNet(1, 2, 8, 1, context_channels=1)
    return LayerCase(
        MaskedAffineCoupling(checkerboard_mask(4, 4), net, 1), _floats(3, 1, 4, 4), _floats(3, 1, 4, 4, seed=1)
    )


@register_case("nflows.AffineCoupling+GatedConvNet")
def _case_nflows_affine() -> LayerCase:
    from nflows.transforms import AffineCouplingTransform

    from flowkit.layers import gated_conv_net

    return LayerCase(AffineCouplingTransform([1, -1, 1, -1], gated_conv_net(8, 1)), _floats(3, 4, 2, 2))


@register_case("nflows.GlowStep(ActNorm,1x1,coupling)")
def _case_glow_step() -> LayerCase:
    from nflows.transforms import ActNorm, AffineCouplingTransform, CompositeTransform, OneByOneConvolution

    from flowkit.layers import gated_conv_net

    step = CompositeTransform(
        [ActNorm(4), OneByOneConvolution(4), AffineCouplingTransform([1, 1, -1, -1], gated_conv_net(8, 1))]
    )
    return LayerCase(step, _floats(3, 4, 2, 2))


@register_case("nflows.OneByOneConvolution[cached]")
def _case_onebyone_cached() -> LayerCase:
    from nflows.transforms import OneByOneConvolution

    return LayerCase(OneByOneConvolution(4, using_cache=True), _floats(3, 4, 2, 2))


@register_case("nflows.Logit")
def _case_logit() -> LayerCase:
    from nflows.transforms import Logit

    return LayerCase(
        Logit(temperature=0.5), torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    )


@register_case("tutorial multiscale flow")
def _case_multiscale() -> LayerCase:
    from flowkit.models import tutorial_flow

    model = tutorial_flow("multiscale", image_shape=(1, 4, 4))
    return LayerCase(model.flow, _floats(2, 1, 4, 4))


@register_case("MemorySavingComposite(glow steps)")
def _case_memory_saving() -> LayerCase:
    from nflows.transforms import ActNorm, AffineCouplingTransform, OneByOneConvolution

    from flowkit.layers import MemorySavingComposite, gated_conv_net

    steps = []
    for i in range(2):
        mask = [1, 1, -1, -1] if i % 2 == 0 else [-1, -1, 1, 1]
        steps += [ActNorm(4), OneByOneConvolution(4), AffineCouplingTransform(mask, gated_conv_net(8, 1))]
    return LayerCase(MemorySavingComposite(steps), _floats(3, 4, 2, 2))


@register_case("glow flow (2 levels)")
def _case_glow_flow() -> LayerCase:
    from flowkit.models import glow

    model = glow((1, 4, 4), levels=2, steps_per_level=2, hidden_channels=8, num_layers=1, dequantization="uniform")
    return LayerCase(model.flow, _floats(2, 1, 4, 4))


# -- flowkit.bridge: normflows flows as nflows Transforms (and back) -----------------------


@register_case("bridge.to_nflows(nf.AffineCouplingBlock)")
def _case_bridge_affine() -> LayerCase:
    import normflows as nf

    from flowkit.bridge import to_nflows

    return LayerCase(to_nflows(nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 8, 4], init_zeros=True))), _floats(3, 4))


@register_case("bridge.to_nflows(nf.CoupledRQSpline)")
def _case_bridge_spline() -> LayerCase:
    import normflows as nf

    from flowkit.bridge import to_nflows

    return LayerCase(to_nflows(nf.flows.CoupledRationalQuadraticSpline(2, 1, 8, num_bins=4)), _floats(3, 2))


@register_case("bridge.to_nflows(nf.MaskedAffineFlow)")
def _case_bridge_masked_affine() -> LayerCase:
    # (normflows' Planar(act="leaky_relu") inverts too, but computes its slope in float32)
    import normflows as nf

    from flowkit.bridge import to_nflows

    mask = torch.tensor([1.0, 0.0])
    flow = nf.flows.MaskedAffineFlow(
        mask, t=nf.nets.MLP([2, 8, 2], init_zeros=True), s=nf.nets.MLP([2, 8, 2], init_zeros=True)
    )
    return LayerCase(to_nflows(flow), _floats(3, 2))


@register_case("bridge.to_nflows(to_normflows(RQ coupling))")
def _case_bridge_roundtrip() -> LayerCase:
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform

    from flowkit.bridge import to_nflows, to_normflows

    inner = PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor([1, 0]),
        lambda i, o: ResidualNet(i, o, 8, num_blocks=1),
        num_bins=4,
        tails="linear",
        tail_bound=3.0,
    )
    return LayerCase(to_nflows(to_normflows(inner)), _floats(3, 2))
