"""Every bijective normflows flow class, built the way normflows' own tests build it (smaller),
passes check_transform through the bridge in float64; the others are refused, naming the class.

The cases follow normflows 1.7.3's test files (installed next to it): flows/base_test.py,
flows/affine/{coupling,autoregressive,glow}_test.py, flows/mixing_test.py, flows/planar_test.py,
flows/radial_test.py, flows/residual_test.py, flows/periodic_test.py, flows/stochastic_test.py,
flows/neural_spline/{coupling,autoregressive,wrapper}_test.py, transforms_test.py and the
reshape/normalization flows core_test.py builds. Parameters are perturbed away from the
identity initialisation so the check has something to check.
"""

import normflows as nf
import numpy as np
import pytest
import torch
from normflows.flows.affine.autoregressive import MaskedAffineAutoregressive
from normflows.flows.neural_spline import autoregressive as nsf_autoregressive
from normflows.flows.neural_spline import coupling as nsf_coupling
from normflows.nets import MLP, LipschitzCNN, LipschitzMLP, ResidualNet
from normflows.utils.masks import create_mid_split_binary_mask

from flowkit import check_transform
from flowkit.bridge import has_inverse, normflows_forward, normflows_inverse, to_nflows, why_not_bijective
from flowkit.check import perturb_parameters

B = 3  # samples per check: the Jacobian is compared on every one of them


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _mask(n):
    return torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(n)])


# each builder returns (flow, inputs, context, check_transform keyword arguments)
CASES = {
    # flows/base_test.py
    "AffineConstFlow": lambda: (nf.flows.AffineConstFlow((7,)), _randn(B, 7), None, {}),
    "Reverse(AffineConstFlow)": lambda: (nf.flows.Reverse(nf.flows.AffineConstFlow((7,))), _randn(B, 7), None, {}),
    "Composite(AffineConstFlow x2)": lambda: (
        nf.flows.Composite([nf.flows.AffineConstFlow((2,)), nf.flows.AffineConstFlow((2,))]),
        _randn(B, 2),
        None,
        {},
    ),
    # flows/affine/coupling_test.py
    "MaskedAffineFlow": lambda: (
        nf.flows.MaskedAffineFlow(_mask(7), MLP([7, 14, 7], init_zeros=True), MLP([7, 14, 7], init_zeros=True)),
        _randn(B, 7),
        None,
        {},
    ),
    "CCAffineConst[(5,)]": lambda: (nf.flows.CCAffineConst((5,), 2), _randn(B, 5), _rand(B, 2, seed=1), {}),
    "CCAffineConst[(2,3,4)]": lambda: (
        nf.flows.CCAffineConst((2, 3, 4), 5),
        _randn(B, 2, 3, 4),
        _rand(B, 5, seed=1),
        {},
    ),
    "AffineCouplingBlock": lambda: (
        nf.flows.AffineCouplingBlock(MLP([2, 8, 4], init_zeros=True)),
        _randn(B, 4),
        None,
        {},
    ),
    # flows/affine/autoregressive_test.py
    "MaskedAffineAutoregressive": lambda: (
        MaskedAffineAutoregressive(features=5, hidden_features=8, num_blocks=1),
        _randn(B, 5),
        None,
        {},
    ),
    "MaskedAffineAutoregressive[residual]": lambda: (
        MaskedAffineAutoregressive(features=5, hidden_features=8, num_blocks=1, use_residual_blocks=True),
        _randn(B, 5),
        None,
        {},
    ),
    "MaskedAffineAutoregressive[random mask]": lambda: (
        MaskedAffineAutoregressive(
            features=5, hidden_features=8, num_blocks=1, use_residual_blocks=False, random_mask=True
        ),
        _randn(B, 5),
        None,
        {},
    ),
    # flows/affine/glow_test.py (ActNorm initialises itself on the check's first batch)
    "GlowBlock[channel,lu]": lambda: (
        nf.flows.GlowBlock(3, 4, scale=True, split_mode="channel", use_lu=True),
        _rand(B, 3, 2, 2),
        None,
        {},
    ),
    "GlowBlock[channel_inv,actnorm]": lambda: (
        nf.flows.GlowBlock(4, 4, scale=True, split_mode="channel_inv", use_lu=True, net_actnorm=True),
        _rand(B, 4, 2, 2),
        None,
        {},
    ),
    "GlowBlock[checkerboard,no scale,no lu]": lambda: (
        nf.flows.GlowBlock(3, 4, scale=False, split_mode="checkerboard", use_lu=False, net_actnorm=True),
        _rand(B, 3, 2, 2),
        None,
        {},
    ),
    # flows/mixing_test.py (+ Invertible1x1Conv, which GlowBlock uses)
    "Permute[shuffle]": lambda: (nf.flows.Permute(3, mode="shuffle"), _randn(B, 3), None, {}),
    "Permute[swap,odd]": lambda: (nf.flows.Permute(3, mode="swap"), _randn(B, 3), None, {}),
    "Permute[swap,even]": lambda: (nf.flows.Permute(4, mode="swap"), _randn(B, 4), None, {}),
    "InvertibleAffine[lu]": lambda: (nf.flows.InvertibleAffine(4, use_lu=True), _randn(B, 4), None, {}),
    "InvertibleAffine": lambda: (nf.flows.InvertibleAffine(4, use_lu=False), _randn(B, 4), None, {}),
    "Invertible1x1Conv[lu]": lambda: (nf.flows.Invertible1x1Conv(3, use_lu=True), _randn(B, 3, 2, 2), None, {}),
    "Invertible1x1Conv": lambda: (nf.flows.Invertible1x1Conv(3), _randn(B, 3, 2, 2), None, {}),
    "LULinearPermute[identity init]": lambda: (nf.flows.LULinearPermute(4), _randn(B, 4), None, {}),
    "LULinearPermute": lambda: (nf.flows.LULinearPermute(4, identity_init=False), _randn(B, 4), None, {}),
    # flows/planar_test.py (leaky_relu: the one with an inverse)
    "Planar[leaky_relu,(2,)]": lambda: (nf.flows.Planar((2,), act="leaky_relu"), _randn(B, 2), None, {}),
    "Planar[leaky_relu,(2,3,4)]": lambda: (nf.flows.Planar((2, 3, 4), act="leaky_relu"), _randn(B, 2, 3, 4), None, {}),
    # flows/residual_test.py: in 2D the log-det is exact (brute force); the inverse is a
    # fixed-point iteration to 1e-5, hence normflows' own tolerance
    "Residual[LipschitzMLP,2D]": lambda: (
        nf.flows.Residual(LipschitzMLP([2, 16, 16, 2], init_zeros=True, lipschitz_const=0.9), exact_trace=True),
        _randn(B, 2),
        None,
        {"atol": 1e-4, "rtol": 1e-4},
    ),
    # flows/periodic_test.py
    "PeriodicWrap": lambda: (nf.flows.PeriodicWrap([2, 3], bound=np.pi), _rand(B, 4) * np.pi, None, {}),
    "PeriodicShift": lambda: (
        nf.flows.PeriodicShift([1], bound=1.0, shift=1.0 / 3),
        _rand(B, 4) * 2 - 1,
        None,
        {},
    ),
    # flows/neural_spline/wrapper_test.py
    "CoupledRationalQuadraticSpline": lambda: (
        nf.flows.CoupledRationalQuadraticSpline(5, 1, 8),
        _randn(B, 5),
        None,
        {},
    ),
    "CoupledRationalQuadraticSpline[context]": lambda: (
        nf.flows.CoupledRationalQuadraticSpline(2, 1, 8, num_context_channels=3),
        _randn(B, 2),
        _randn(B, 3, seed=1),
        {},
    ),
    "AutoregressiveRationalQuadraticSpline[context]": lambda: (
        nf.flows.AutoregressiveRationalQuadraticSpline(5, 1, 8, num_context_channels=3),
        _randn(B, 5),
        _randn(B, 3, seed=1),
        {},
    ),
    "CircularCoupledRationalQuadraticSpline": lambda: (
        nf.flows.CircularCoupledRationalQuadraticSpline(2, 1, 8, [1], tail_bound=torch.tensor([5.0, np.pi])),
        _rand(B, 2) * 6 - 3,
        None,
        {},
    ),
    "CircularAutoregressiveRationalQuadraticSpline[context]": lambda: (
        nf.flows.CircularAutoregressiveRationalQuadraticSpline(
            5, 1, 8, [0, 3], tail_bound=torch.tensor([np.pi, 5.0, 4.0, 6.0, 3.0]), num_context_channels=3
        ),
        _rand(B, 5) * 6 - 3,
        _randn(B, 3, seed=1),
        {},
    ),
    # flows/neural_spline/coupling_test.py and autoregressive_test.py
    "PiecewiseRationalQuadraticCoupling[tails=None]": lambda: (
        nsf_coupling.PiecewiseRationalQuadraticCoupling(
            mask=create_mid_split_binary_mask(6),
            transform_net_create_fn=lambda i, o: ResidualNet(i, o, hidden_features=8, num_blocks=1),
            tails=None,
        ),
        _rand(B, 6),
        None,
        {},
    ),
    "PiecewiseRationalQuadraticCoupling[linear,image]": lambda: (
        nsf_coupling.PiecewiseRationalQuadraticCoupling(
            mask=create_mid_split_binary_mask(2),
            transform_net_create_fn=lambda i, o: nf.nets.ConvResidualNet(i, o, hidden_channels=4),
            tails="linear",
            apply_unconditional_transform=True,
            img_shape=[2, 2],
        ),
        _rand(B, 2, 2, 2),
        None,
        {},
    ),
    "MaskedPiecewiseRationalQuadraticAutoregressive": lambda: (
        nsf_autoregressive.MaskedPiecewiseRationalQuadraticAutoregressive(
            num_bins=4, features=4, hidden_features=8, num_blocks=1, use_residual_blocks=True
        ),
        _rand(B, 4),
        None,
        {},
    ),
    # transforms_test.py (Logit's data side is (0, 1))
    "transforms.Logit": lambda: (nf.transforms.Logit(), _rand(B, 2, 3) * 0.9 + 0.05, None, {}),
    "transforms.Shift": lambda: (nf.transforms.Shift(), _randn(B, 2, 3), None, {}),
    # reshape and normalization flows (core_test.py's multiscale model uses Squeeze and Merge)
    "Squeeze": lambda: (nf.flows.Squeeze(), _randn(B, 1, 4, 4), None, {}),
    "ActNorm": lambda: (nf.flows.ActNorm((4,)), _randn(B, 4), None, {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bijective_normflows_flow_passes_check_transform_in_float64(name):
    torch.manual_seed(0)
    flow, inputs, context, tolerances = CASES[name]()
    perturb_parameters(flow, scale=0.1)
    flow.double()
    context = None if context is None else context.double()
    report = check_transform(to_nflows(flow), inputs.double(), context, name=name, **tolerances)
    assert report.ok, str(report)
    assert report.dtype == "float64" and report.samples == B


def test_a_normflows_flow_is_bridged_by_check_transform_itself():
    flow = perturb_parameters(nf.flows.Planar((3,), act="leaky_relu"))
    report = check_transform(flow, _randn(4, 3))
    assert report.ok and report.name == "Planar", str(report)


def _mh():
    target = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
    return nf.flows.MetropolisHastings(target, nf.distributions.DiagGaussianProposal((4,), 0.1), 3)


def _hmc():
    target = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
    return nf.flows.HamiltonianMonteCarlo(target, 3, -2.0 * torch.ones(4), torch.zeros(4))


@pytest.mark.parametrize(
    "make, named",
    [
        (_mh, "MetropolisHastings"),
        (_hmc, "HamiltonianMonteCarlo"),
        (lambda: nf.flows.Composite([nf.flows.AffineConstFlow((4,)), _mh()]), "Composite contains MetropolisHastings"),
    ],
    ids=["MetropolisHastings", "HamiltonianMonteCarlo", "Composite(MH)"],
)
def test_stochastic_layers_are_refused_by_name(make, named):
    flow = make()
    with pytest.raises(ValueError, match=f"flow: {named}.*stochastic.*not a bijection"):
        to_nflows(flow)
    assert not has_inverse(flow)
    report = check_transform(flow, _randn(B, 4))  # a failing row, not an exception
    assert not report.ok and named in report.reason
    # a normflows model still runs them (a stochastic normalizing flow samples through them)
    x, ladj = normflows_forward([flow], _randn(B, 4))
    assert x.shape == (B, 4) and ladj.shape == (B,)


@pytest.mark.parametrize(
    "flow, reason",
    [
        (nf.flows.Planar((2,)), "Planar has no algebraic inverse"),
        (nf.flows.Radial((2,)), "Radial has no algebraic inverse"),
        (nf.flows.BatchNorm(), "BatchNorm has no algebraic inverse"),
        (nf.flows.Split(), "Split maps between one tensor and a list"),
        (nf.flows.Merge(), "Merge maps between one tensor and a list"),
        (nf.flows.AffineCoupling(MLP([1, 2])), "AffineCoupling maps between one tensor and a list"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nf.flows.Flow) else "",
)
def test_flows_that_are_not_bijections_of_one_tensor_are_refused(flow, reason):
    assert reason in why_not_bijective(flow)
    with pytest.raises(ValueError, match=f"flow: {reason}"):
        to_nflows(flow)


def test_split_and_merge_run_inside_a_sequence():
    z = _randn(B, 4, 2, 2)
    flows = [nf.flows.Split("checkerboard"), nf.flows.Merge("checkerboard")]
    x, ladj = normflows_forward(flows, z)  # Split's and Merge's integer 0 log-dets
    assert torch.equal(x, z) and torch.equal(ladj, torch.zeros(B))
    back, ladj_inv = normflows_inverse(flows, x)
    assert torch.equal(back, z) and torch.equal(ladj_inv, torch.zeros(B))


def test_residual_flow_with_a_stochastic_logdet_estimate_is_reported_not_passed():
    # beyond 2D normflows' Residual estimates log|det| with a random power series: a bijection
    # whose log-det is an unbiased estimate, not the exact value the contract asks for
    torch.manual_seed(0)
    flow = nf.flows.Residual(LipschitzCNN([2, 8, 2], [3, 3]), reduce_memory=False).double()
    report = check_transform(to_nflows(flow), _randn(2, 2, 2, 2).double())
    assert report.roundtrip_error < 1e-9  # it does invert
    assert not report.ok and "log|det J|" in report.reason, str(report)
    assert 1e-7 < report.jacobian_error < 1e-2  # an estimate: close, not exact
