"""The shared transform test: every layer in flowkit.check.LAYER_CASES, float32 and float64."""

import io

import pytest
import torch

from flowkit.check import LAYER_CASES, check_transform, perturb_parameters
from flowkit.layers import MaskedAffineCoupling

DTYPES = [torch.float32, torch.float64]
NAMES = sorted(LAYER_CASES)


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _case(name, dtype, perturb=True):
    torch.manual_seed(0)
    case = LAYER_CASES[name]()
    if perturb:
        perturb_parameters(case.transform)
    case.transform.to(dtype)
    return case.transform, _cast(case.inputs, dtype), _cast(case.context, dtype)


def _forward(t, x, ctx, noise=None):
    if noise is not None:
        z, ladj, _ = t.forward_with_noise(x, noise, ctx)
        return z, ladj
    return t(x, ctx)


def _is_stochastic(t):
    return hasattr(t, "forward_with_noise")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, dtype):
    t, x, ctx = _case(name, dtype)
    t.eval()
    with torch.no_grad():
        z, ladj = t(x, ctx)
        assert ladj.shape == (x.shape[0],), "logabsdet must have shape [batch]"
        assert ladj.dtype == dtype and z.dtype == dtype
        assert z.shape[0] == x.shape[0] and z[0].numel() == x[0].numel()
        if not _is_stochastic(t) and z.dim() == x.dim():
            assert z.shape == x.shape
        x_back, ladj_inv = t.inverse(z, ctx)
        assert x_back.shape == x.shape
        if _is_stochastic(t):
            assert torch.equal(x_back, x.long()), "dequantization must round-trip exactly"
        else:
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(x_back, x, atol=tol * (1 + x.abs().max().item()), rtol=0)
    report = check_transform(t, x, ctx, name=name)
    assert report.ok, str(report)
    assert report.jacobian_error < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    t, x, ctx = _case(name, torch.float64)
    params = [p for p in t.parameters() if p.requires_grad]
    if not params:
        pytest.skip("no parameters")
    t.train()
    t(x, ctx)  # data-dependent initialisation (ActNorm) happens on the first training call
    z, ladj = t(x, ctx)
    loss = 0.5 * z.pow(2).sum() - ladj.sum()
    loss.backward()
    for pname, p in t.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    t, x, ctx = _case(name, torch.float32)
    t.eval()
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    fresh, _, _ = _case(name, torch.float32, perturb=False)
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    noise = t.sample_noise(x) if _is_stochastic(t) else None
    with torch.no_grad():
        z1, l1 = _forward(t, x, ctx, noise)
        z2, l2 = _forward(fresh, x, ctx, noise)
        torch.testing.assert_close(z1, z2, rtol=0, atol=0)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
        torch.testing.assert_close(t.inverse(z1, ctx)[0], fresh.inverse(z1, ctx)[0], rtol=0, atol=0)


COUPLINGS = [n for n in NAMES if isinstance(LAYER_CASES[n]().transform, MaskedAffineCoupling)]


@pytest.mark.parametrize("name", COUPLINGS)
def test_fresh_coupling_is_identity(name):
    t, x, ctx = _case(name, torch.float64, perturb=False)
    z, ladj = t(x, ctx)
    assert torch.equal(z, x)
    assert torch.equal(ladj, torch.zeros_like(ladj))


class _WrongSign(MaskedAffineCoupling):
    def forward(self, inputs, context=None):
        z, ladj = super().forward(inputs, context)
        return z, -ladj


def test_checker_catches_wrong_logdet():
    from flowkit.layers import GatedConvNet, checkerboard_mask

    t = perturb_parameters(_WrongSign(checkerboard_mask(4, 4), GatedConvNet(1, 2, 8, 1), 1))
    report = check_transform(t, torch.randn(2, 1, 4, 4))
    assert not report.ok
    assert report.jacobian_error > 1e-3


def test_checker_catches_wrong_inverse():
    from nflows.transforms import ActNorm

    class BadInverse(ActNorm):
        def inverse(self, inputs, context=None):
            x, ladj = super().inverse(inputs, context)
            return x + 1e-2, ladj

    t = BadInverse(3)
    with torch.no_grad():
        t.log_scale.fill_(0.3)
    assert not check_transform(t, torch.randn(4, 3)).ok


def test_registry_covers_every_layer():
    import flowkit.layers as L

    transforms = {
        name
        for name in L.__all__
        if isinstance(getattr(L, name), type)
        and issubclass(getattr(L, name), __import__("nflows").transforms.Transform)
    }
    covered = {type(LAYER_CASES[n]().transform).__name__ for n in NAMES}
    missing = transforms - covered
    assert not missing, f"layers without a registry case: {missing}"
