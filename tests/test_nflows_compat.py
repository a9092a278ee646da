"""Each fix in flowkit.nflows_compat has a test that fails without it (shown via `unpatched`)."""

import copy
import dataclasses
import warnings

import pytest
import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms import (
    ActNorm,
    Logit,
    MaskedPiecewiseLinearAutoregressiveTransform,
    OneByOneConvolution,
    PiecewiseLinearCDF,
    PiecewiseLinearCouplingTransform,
    Sigmoid,
)
from nflows.transforms.lu import LULinear

from flowkit import _patching, check_transform, nflows_compat
from flowkit.check import perturb_parameters
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


def test_linear_cache_refilled_after_an_in_place_parameter_edit():
    conv = OneByOneConvolution(3, using_cache=True)
    conv.eval()
    x = torch.randn(2, 3, 2, 2)
    conv(x)  # fills the cache
    with torch.no_grad():
        conv.upper_entries.add_(0.5)  # e.g. an optimizer step taken while in eval mode
    fresh = OneByOneConvolution(3, using_cache=True)
    fresh.load_state_dict(conv.state_dict())
    fresh.eval()
    torch.testing.assert_close(conv(x)[0], fresh(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(conv.inverse(x)[0], fresh.inverse(x)[0], rtol=0, atol=0)
    with unpatched("Linear._check_forward_cache"):
        stale = OneByOneConvolution(3, using_cache=True)
        stale.eval()
        before = stale(x)[0]
        with torch.no_grad():
            stale.upper_entries.add_(0.5)
        assert torch.equal(stale(x)[0], before)  # nflows keeps using the old weight


# -- the linear spline: nflows' searchsorted added eps to the cdf in place, and the inverse
#    built its bin boundaries in float32 on the CPU ---------------------------------------------


def _linear_cdf_errors_per_bin(num_bins=5):
    """Round-trip error of nflows' PiecewiseLinearCDF in float64, per (uniform, forward) bin."""
    torch.manual_seed(0)
    cdf = PiecewiseLinearCDF([1], num_bins=num_bins).double()
    x = torch.linspace(5e-4, 1 - 5e-4, 2000, dtype=torch.float64)[:, None]
    with torch.no_grad():
        z, ladj = cdf(x)
        x_back, ladj_inv = cdf.inverse(z)
    bins = (x[:, 0] * num_bins).floor().long()
    errors = (x_back - x).abs()[:, 0]
    return [errors[bins == b].max().item() for b in range(num_bins)], (ladj + ladj_inv).abs().max().item()


def test_linear_spline_inverse_is_exact_in_every_bin_in_float64():
    per_bin, ladj_sum = _linear_cdf_errors_per_bin()
    assert max(per_bin) < 1e-12 and ladj_sum < 1e-12, per_bin
    with unpatched("torchutils.searchsorted"):
        per_bin, ladj_sum = _linear_cdf_errors_per_bin()
        assert per_bin[-1] > 1e-7 and ladj_sum > 1e-7  # the last bin (slope off by eps)
    with unpatched("splines.linear.linear_spline"):
        per_bin, _ = _linear_cdf_errors_per_bin()
        assert max(per_bin[:-1]) > 1e-10  # float32 bin boundaries (1/5 is not a float32)


def _linear_spline_models():
    return {
        "PiecewiseLinearCDF[linear tails]": (PiecewiseLinearCDF([2], num_bins=5, tails="linear"), 2.0, -1.0),
        "PiecewiseLinearCouplingTransform": (
            PiecewiseLinearCouplingTransform(
                torch.tensor([1, 0]), lambda i, o: ResidualNet(i, o, 8, num_blocks=1), num_bins=5
            ),
            1.0,
            0.0,
        ),
        "MaskedPiecewiseLinearAutoregressiveTransform": (
            MaskedPiecewiseLinearAutoregressiveTransform(num_bins=5, features=2, hidden_features=8),
            1.0,
            0.0,
        ),
    }


@pytest.mark.parametrize("name", sorted(_linear_spline_models()))
def test_every_nflows_linear_spline_is_exact_in_float64(name):
    # nflows looks the spline up in three modules (splines.linear, splines, autoregressive):
    # each class below goes through a different one
    torch.manual_seed(0)
    model, scale, shift = _linear_spline_models()[name]
    model = model.double().eval()
    x = torch.rand(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale + shift
    report = check_transform(model, x, max_samples=4, atol=1e-12, rtol=1e-12)
    assert report.ok, str(report)
    with unpatched("torchutils.searchsorted", "splines.linear.linear_spline"):
        assert not check_transform(model, x, max_samples=4, atol=1e-12, rtol=1e-12).ok


def test_searchsorted_leaves_the_bin_locations_alone():
    from nflows.utils import searchsorted, torchutils

    bins = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    index = torchutils.searchsorted(bins, torch.tensor([0.2, 1.0], dtype=torch.float64))
    assert index.tolist() == [0, 1] and bins.tolist() == [0.0, 0.5, 1.0]
    assert searchsorted is torchutils.searchsorted  # the name nflows.utils re-exports is fixed too
    with unpatched("torchutils.searchsorted"):
        torchutils.searchsorted(bins, torch.tensor([0.2]))
        assert bins[-1].item() == 1.0 + 1e-6


# -- the mechanism: version and identity checked, idempotent, warns once -----------------------


def _weight_inverse_patch():
    return next(p for p in nflows_compat.PATCHES if p.name == "LULinear.weight_inverse")


def test_every_fix_is_active_and_says_what_it_replaces():
    assert nflows_compat.active_patches() == [p.name for p in nflows_compat.PATCHES]
    patch = _weight_inverse_patch()
    assert patch.active and patch.target == "nflows.transforms.lu.LULinear.weight_inverse"
    assert "device" in patch.reason and LULinear.weight_inverse is patch.replacement
    assert "LULinear.weight_inverse" in nflows_compat.__doc__


def test_applying_twice_changes_nothing():
    before = {
        p.name: p.owner.__dict__[p.attribute] if isinstance(p.owner, type) else getattr(p.owner, p.attribute)
        for p in nflows_compat.PATCHES
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nflows_compat.apply_patches() == list(before)
        assert nflows_compat.apply_patches() == list(before)
    for p in nflows_compat.PATCHES:
        current = p.owner.__dict__[p.attribute] if isinstance(p.owner, type) else getattr(p.owner, p.attribute)
        assert current is before[p.name] is p.replacement


def test_a_fix_refuses_a_function_it_does_not_know_and_warns_once():
    def users_own_weight_inverse(self):  # e.g. a newer nflows, or another library's patch
        return torch.linalg.inv(self.weight())

    fresh = dataclasses.replace(_weight_inverse_patch())  # same fix, not yet applied
    with unpatched("LULinear.weight_inverse"):
        original = LULinear.__dict__["weight_inverse"]
        LULinear.weight_inverse = users_own_weight_inverse
        try:
            with pytest.warns(
                RuntimeWarning, match="left nflows.transforms.lu.LULinear.weight_inverse unpatched.*source differs"
            ):
                assert not _patching.apply(fresh, "0.14", nflows_compat.SUPPORTED_VERSIONS)
            assert LULinear.weight_inverse is users_own_weight_inverse and not fresh.active
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once is enough
                assert not _patching.apply(fresh, "0.14", nflows_compat.SUPPORTED_VERSIONS)
        finally:
            LULinear.weight_inverse = original
    assert LULinear.weight_inverse is _weight_inverse_patch().replacement


def test_a_fix_leaves_another_nflows_version_alone():
    fresh = dataclasses.replace(_weight_inverse_patch())
    with unpatched("LULinear.weight_inverse"):
        original = LULinear.__dict__["weight_inverse"]
        with pytest.warns(RuntimeWarning, match="installed version 0.15, the fix is for 0.14"):
            assert not _patching.apply(fresh, "0.15", nflows_compat.SUPPORTED_VERSIONS)
        assert LULinear.__dict__["weight_inverse"] is original


def test_unpatched_names_must_exist():
    with pytest.raises(ValueError, match="names: unknown nflows fixes"):
        with unpatched("LULinear.nonexistent"):
            pass


def test_naive_linear_can_be_built_on_current_torch():
    from nflows.transforms import NaiveLinear

    lin = NaiveLinear(4)  # its orthogonal initialisation called torch.qr, removed from PyTorch
    w = lin._weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(4), rtol=0, atol=1e-5)
    perturb_parameters(lin, 0.3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert check_transform(lin, x).ok  # inverse_no_cache (torch.solve before)
    lin.use_cache(True)
    assert check_transform(lin, x).ok  # the eval-mode cache: weight_inverse_and_logabsdet
    with unpatched("torchutils.random_orthogonal"), pytest.raises(RuntimeError, match="torch.qr"):
        NaiveLinear(4)
    with unpatched("NaiveLinear.inverse_no_cache"), pytest.raises(RuntimeError, match="torch.solve"):
        lin.inverse_no_cache(x)
    with unpatched("NaiveLinear.weight_inverse_and_logabsdet"), pytest.raises(RuntimeError, match="torch.solve"):
        lin.weight_inverse_and_logabsdet()


@pytest.mark.cuda
def test_linear_spline_inverse_runs_on_cuda():
    cdf = PiecewiseLinearCDF([2], num_bins=5).cuda()  # its bin boundaries were built on the CPU
    x = torch.rand(64, 2, device="cuda")
    z, ladj = cdf(x)
    x_back, ladj_inv = cdf.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(ladj), rtol=0, atol=1e-5)
