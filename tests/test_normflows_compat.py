"""Each fix in flowkit.normflows_compat has a test that fails without it (shown via `unpatched`)."""

import dataclasses

import normflows as nf
import pytest
import torch

from flowkit import _patching, check_transform, normflows_compat
from flowkit.bridge import normflows_forward, normflows_inverse, to_nflows
from flowkit.check import perturb_parameters
from flowkit.normflows_compat import unpatched


def _x(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _composite():
    flows = [perturb_parameters(nf.flows.AffineConstFlow((3,)), 0.5, seed=k) for k in range(2)]
    return nf.flows.Composite(flows).double()


def test_composite_sums_float64_logdets_in_float64():
    flow = _composite()
    x = _x(4, 3)
    z, ladj = flow.inverse(x)
    assert ladj.dtype == torch.float64
    exact = -sum(f.s.sum() for f in flow._flows)  # AffineConstFlow: log|det| = sum(s)
    torch.testing.assert_close(ladj, exact.expand(4), rtol=0, atol=1e-15)
    with unpatched("Composite._cascade"):
        assert flow.inverse(x)[1].dtype == torch.float32


def test_planar_leaky_relu_is_float64_throughout():
    torch.manual_seed(0)
    flow = nf.flows.Planar((3,), act="leaky_relu").double()
    z = _x(64, 3)
    x, ladj = flow(z)
    z_back, ladj_inv = flow.inverse(x)
    assert ladj.dtype == torch.float64 and ladj_inv.dtype == torch.float64
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-13)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(ladj), rtol=0, atol=1e-13)
    with unpatched("Planar.forward"):
        assert flow(z)[1].dtype == torch.float32
    with unpatched("Planar.forward", "Planar.inverse"):
        assert (flow.inverse(flow(z)[0])[0] - z).abs().max() > 1e-10  # slope 0.2 rounded to float32


def test_planar_float32_results_are_unchanged_bit_for_bit():
    torch.manual_seed(0)
    flow = nf.flows.Planar((3,), act="leaky_relu")
    z = _x(64, 3, dtype=torch.float32)
    fixed = (*flow(z), *flow.inverse(z))
    with unpatched("Planar.forward", "Planar.inverse"):
        original = (*flow(z), *flow.inverse(z))
    for a, b in zip(fixed, original, strict=True):
        assert torch.equal(a, b)


def test_shift_leaves_the_callers_tensor_alone():
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(3), [nf.transforms.Shift(0.5)])
    x = _x(5, 3, dtype=torch.float32)
    kept = x.clone()
    model.log_prob(x)
    assert torch.equal(x, kept)
    with unpatched("Shift.forward", "Shift.inverse"):
        model.log_prob(x)
        assert not torch.equal(x, kept)  # normflows shifted the user's data
        report = check_transform(nf.transforms.Shift(0.5), kept.clone())
        assert "forward modified its input in place" in report.reason


def test_float64_normflows_model_through_the_bridge_gives_float64_logdets():
    # what toy2d runs: a stack of Planar(leaky_relu) flows in a Composite, through the bridge
    torch.manual_seed(0)
    flows = [nf.flows.Composite([nf.flows.Planar((2,), act="leaky_relu") for _ in range(4)]).double()]
    z = _x(6, 2)
    x, ladj = normflows_forward(flows, z)
    z_back, ladj_inv = normflows_inverse(flows, x)
    assert ladj.dtype == torch.float64 and ladj_inv.dtype == torch.float64
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12)
    assert check_transform(to_nflows(flows[0]), x).ok
    with unpatched():
        assert not check_transform(to_nflows(flows[0]), x).ok


def test_every_fix_is_active_and_a_foreign_version_is_left_alone():
    assert normflows_compat.active_patches() == [p.name for p in normflows_compat.PATCHES]
    assert normflows_compat.apply_patches() == normflows_compat.active_patches()  # idempotent
    fresh = dataclasses.replace(normflows_compat.PATCHES[0])
    with unpatched("Composite._cascade"):
        original = nf.flows.Composite.__dict__["_cascade"]
        with pytest.warns(RuntimeWarning, match="installed version 1.8.0, the fix is for 1.7.3"):
            assert not _patching.apply(fresh, "1.8.0", normflows_compat.SUPPORTED_VERSIONS)
        assert nf.flows.Composite.__dict__["_cascade"] is original


@pytest.mark.cuda
def test_composite_and_bridge_run_on_cuda():
    flows = [nf.flows.Composite([nf.flows.Planar((2,), act="leaky_relu"), nf.flows.Permute(2)]).cuda()]
    z = torch.randn(8, 2, device="cuda")
    x, ladj = normflows_forward(flows, z)  # Composite summed into a CPU torch.zeros(batch)
    assert ladj.device.type == "cuda"
    assert check_transform(to_nflows(flows[0]), x).ok
