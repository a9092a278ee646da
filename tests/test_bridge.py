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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bridge_registry_cases_pass_check_transform(dtype):
    names = [n for n in LAYER_CASES if n.startswith("bridge.")]
    assert len(names) >= 4
    for name in names:
        case = LAYER_CASES[name]()
        perturb_parameters(case.transform)
        case.transform.to(dtype)
        report = check_transform(case.transform, case.inputs.to(dtype), name=name)
        assert report.ok, str(report)


def test_planar_leaky_relu_bridges_in_float32():
    # normflows' Planar(leaky_relu) computes its slope in float32, so only a float32 check
    flow = nf.flows.Planar((2,), act="leaky_relu")
    report = check_transform(to_nflows(flow), torch.randn(5, 2, generator=torch.Generator().manual_seed(2)))
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
