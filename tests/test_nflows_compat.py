"""Each fix in flowkit.nflows_compat has a test that fails without it (shown via `unpatched`)."""

import copy

import pytest
import torch
from nflows.transforms import ActNorm, Logit, OneByOneConvolution, Sigmoid
from nflows.transforms.lu import LULinear

import flowkit  # noqa: F401  (applies the patches)
from flowkit.nflows_compat import unpatched


def _cached_inverse_float64():
    conv = OneByOneConvolution(4, using_cache=True).double()
    conv.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, _ = conv(x)
    return conv.inverse(z)[0], x


def test_lu_weight_inverse_follows_dtype():
    x_back, x = _cached_inverse_float64()
    torch.testing.assert_close(x_back, x)
    with unpatched(), pytest.raises(RuntimeError):
        _cached_inverse_float64()


def test_lu_inverse_no_longer_uses_deprecated_triangular_solve():
    lin = LULinear(5, identity_init=False).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y, ladj = lin.forward_no_cache(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_back, ladj_inv = lin.inverse_no_cache(y)
        w_inv = lin.weight_inverse()
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(w_inv @ lin.weight(), torch.eye(5, dtype=torch.float64))
    with unpatched():
        assert "triangular_solve" in LULinear.inverse_no_cache.__code__.co_names
    assert "triangular_solve" not in LULinear.inverse_no_cache.__code__.co_names


def test_linear_cache_dropped_when_dtype_changes():
    conv = OneByOneConvolution(3, using_cache=True)
    conv.eval()
    x = torch.randn(2, 3, 2, 2)
    conv(x)  # fills the float32 cache
    conv.double()
    z, _ = conv(x.double())
    assert z.dtype == torch.float64
    with unpatched():
        conv = OneByOneConvolution(3, using_cache=True)
        conv.eval()
        conv(x)
        conv.double()
        with pytest.raises(RuntimeError):
            conv(x.double())


def test_linear_cache_dropped_on_load_state_dict():
    a = OneByOneConvolution(3, using_cache=True)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.upper_entries.add_(0.5)
    a.eval()
    x = torch.randn(2, 3, 2, 2)
    a(x)  # cache holds a's weight
    a.load_state_dict(b.state_dict())
    b.eval()
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_sigmoid_temperature_follows_to():
    # .to(device)/.double() move buffers; a plain tensor attribute stays behind (on the CPU
    # while the inputs are on CUDA: "expected all tensors on the same device")
    s = Logit(temperature=0.5).double()
    assert s._transform.temperature.dtype == torch.float64
    x = torch.rand(3, 4, dtype=torch.float64) * 0.8 + 0.1
    z, ladj = s(x)
    assert z.dtype == torch.float64 and ladj.dtype == torch.float64
    assert "temperature" not in Sigmoid(temperature=2.0).state_dict()  # non-persistent: old checkpoints load
    with unpatched():
        s = Logit(temperature=0.5).double()
        assert s._transform.temperature.dtype == torch.float32


def test_actnorm_init_keeps_buffer_in_place_and_guards_constant_channels():
    norm = ActNorm(3)
    buffer = norm.initialized
    x = torch.randn(8, 3, 4, 4)
    x[:, 1] = 0.5  # a constant channel
    norm.train()
    z, _ = norm(x)
    assert norm.initialized is buffer and bool(norm.initialized)
    assert torch.isfinite(norm.log_scale).all() and torch.isfinite(z).all()
    with unpatched():
        norm = ActNorm(3)
        buffer = norm.initialized
        norm(x)
        assert norm.initialized is not buffer or not torch.isfinite(norm.log_scale).all()
