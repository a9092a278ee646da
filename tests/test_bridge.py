"""flowkit.bridge: directions and log-det signs between nflows and normflows."""

import normflows as nf
import pytest
import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import ActNorm, PiecewiseRationalQuadraticCouplingTransform

from flowkit import check_transform
from flowkit.bridge import NflowsAsNormflows, NormflowsAsNflows, has_inverse, to_nflows, to_normflows
from flowkit.check import LAYER_CASES, perturb_parameters


def _rq_coupling(mask=(1, 0)):
    return PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor(list(mask)),
        lambda i, o: ResidualNet(i, o, 8, num_blocks=1),
        num_bins=4,
        tails="linear",
        tail_bound=3.0,
    )


def _jac_logdet(fn, pts):
    out = []
    for p in pts:
        jac = torch.autograd.functional.jacobian(lambda q: fn(q[None])[0][0], p)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def test_to_normflows_forward_is_latent_to_data_with_its_logdet():
    t = perturb_parameters(_rq_coupling()).double()
    flow = to_normflows(t)
    assert isinstance(flow, nf.flows.Flow)
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, ld = flow(z)
    x_ref, ld_ref = t.inverse(z)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(ld, _jac_logdet(flow, z), rtol=1e-9, atol=1e-10)  # log|det dx/dz|
    z_back, ld_inv = flow.inverse(x)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)


def test_to_nflows_forward_is_data_to_latent_with_its_logdet():
    flow = nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 8, 2], init_zeros=True))
    perturb_parameters(flow, scale=0.3)
    t = to_nflows(flow).double()
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, ld = t(x)
    z_ref, _ = flow.inverse(x)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    assert ld.abs().min() > 1e-3  # a non-trivial log-det, so the sign below is tested
    torch.testing.assert_close(ld, _jac_logdet(t, x), rtol=1e-9, atol=1e-10)  # log|det dz/dx|


def test_the_registry_holds_bridged_normflows_flows():
    # tests/test_transforms.py runs every registry case (these included) in float32 and float64
    names = [n for n in LAYER_CASES if n.startswith("bridge.")]
    assert len(names) >= 6 and any("context" in n for n in names)
    assert all(isinstance(LAYER_CASES[n]().transform, NormflowsAsNflows) for n in names)


def test_planar_leaky_relu_bridges_in_float64():
    # normflows' Planar(leaky_relu) computed its slope in float32 (fixed in flowkit.normflows_compat)
    flow = nf.flows.Planar((2,), act="leaky_relu").double()
    report = check_transform(to_nflows(flow), torch.randn(5, 2, dtype=torch.float64))
    assert report.ok, str(report)


def test_scalar_logdet_of_normflows_is_expanded_to_batch():
    flow = perturb_parameters(nf.flows.AffineConstFlow((2,)), 0.5).double()
    t = to_nflows(flow)
    x = torch.randn(5, 2, dtype=torch.float64)
    z, ld = t(x)
    assert ld.shape == (5,) and ld.abs().min() > 0
    assert check_transform(t, x).ok


def test_flowkit_layer_through_normflows_model_log_prob_matches_sample():
    torch.manual_seed(0)
    model = nf.NormalizingFlow(
        nf.distributions.DiagGaussian(2),
        [to_normflows(perturb_parameters(ActNorm(2), 0.5)), to_normflows(perturb_parameters(_rq_coupling()))],
    )
    model.eval()  # nflows ActNorm initialises itself from data in training mode
    x, log_q = model.sample(64)
    torch.testing.assert_close(model.log_prob(x), log_q, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no algebraic inverse"):
        to_nflows(nf.flows.Planar((2,)))
    with pytest.raises(ValueError, match="no algebraic inverse"):
        to_nflows(nf.flows.Radial((2,)))
    with pytest.raises(TypeError, match="transform"):
        to_normflows(nf.flows.Planar((2,)))
    with pytest.raises(TypeError, match="flow"):
        to_nflows(ActNorm(2))
    assert has_inverse(nf.flows.Planar((2,), act="leaky_relu")) and not has_inverse(nf.flows.Planar((2,)))
    assert isinstance(to_normflows(ActNorm(2)), NflowsAsNormflows)
    assert isinstance(to_nflows(nf.flows.AffineConstFlow((2,))), NormflowsAsNflows)


def test_reverse_kl_fit_of_two_modes_with_nflows_splines_through_the_bridge():
    from flowkit.toy2d import build_flow, evaluate, fit

    torch.manual_seed(0)
    model = build_flow("nflows-spline", 2, hidden=16, bins=6)
    before = evaluate(model, "two-modes", 4000, forward=False).reverse_kl
    fit(model, "two-modes", iters=150, batch_size=256, lr=5e-3, anneal_iters=50, progress=False, seed=0)
    after = evaluate(model, "two-modes", 4000, forward=False).reverse_kl
    assert after < 0.5 * before and before - after > 0.5, (before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_logdets_of_squeeze_become_batch_tensors(dtype):
    t = to_nflows(nf.flows.Squeeze())
    x = torch.randn(3, 1, 4, 4, dtype=dtype)
    z, ld = t(x)  # normflows Squeeze returns the int 0
    assert z.shape == (3, 4, 2, 2) and ld.dtype == dtype and torch.equal(ld, torch.zeros(3, dtype=dtype))
    x_back, ld_inv = t.inverse(z)
    assert torch.equal(x_back, x) and ld_inv.shape == (3,)


def test_float32_logdets_of_a_normflows_flow_follow_float64_inputs():
    t = to_nflows(nf.flows.Permute(4, mode="shuffle")).double()  # Permute returns float32 zeros
    z, ld = t(torch.randn(3, 4, dtype=torch.float64))
    assert ld.dtype == torch.float64


def test_context_goes_under_the_name_the_flow_takes_it():
    flow = perturb_parameters(nf.flows.CCAffineConst((2,), 3), 0.5)  # forward(z, y)
    t = to_nflows(flow)
    x, y = torch.randn(4, 2), torch.eye(3)[[0, 1, 2, 0]]
    z, ld = t(x, context=y)
    z_ref, ld_ref = flow.inverse(x, y)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(ld, ld_ref, rtol=0, atol=0)
    assert check_transform(t, x, y).ok
    with pytest.raises(
        ValueError, match="context: CCAffineConst.inverse needs its conditioning argument 'y', got None"
    ):
        t(x)


def test_flows_without_context_ignore_it_inside_a_conditional_nflows_composite():
    from nflows.transforms import CompositeTransform

    flow = nf.flows.CoupledRationalQuadraticSpline(2, 1, 8, num_context_channels=3)
    composite = CompositeTransform([to_nflows(nf.flows.Planar((2,), act="leaky_relu")), to_nflows(flow)])
    report = check_transform(composite, torch.randn(4, 2), torch.randn(4, 3))
    assert report.ok, str(report)


def test_a_logdet_of_the_wrong_shape_is_an_error_naming_the_flow():
    class PerDimension(nf.flows.Flow):
        def forward(self, z):
            return z, torch.zeros_like(z)

        def inverse(self, z):
            return z, torch.zeros_like(z)

    with pytest.raises(ValueError, match=r"flow: PerDimension returned a log-det of shape \[4, 3\]; expected"):
        to_nflows(PerDimension())(torch.randn(4, 3))
    report = check_transform(PerDimension(), torch.randn(4, 3))  # bridged, reported
    assert not report.ok and "PerDimension returned a log-det of shape [4, 3]" in report.reason


def test_a_flow_returning_a_list_is_an_error():
    t = to_nflows(nf.flows.Composite([nf.flows.Merge()]))  # Merge.inverse splits into a list
    with pytest.raises(TypeError, match="flow: Composite returned a list, not one tensor"):
        t(torch.randn(2, 4, 2, 2))
