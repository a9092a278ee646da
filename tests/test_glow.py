"""glow(...): construction-time shape checks, every part through check_transform, the
ImageFlow API on a tiny Glow in float32/float64, padding, memory saving, build_model."""

import doctest
import math
import sys

import pytest
import torch
from nflows.transforms import ActNorm, MultiscaleCompositeTransform, OneByOneConvolution, SqueezeTransform

import flowkit
from flowkit.check import check_transform, perturb_parameters
from flowkit.models import MODEL_NAMES, ImageFlow, build_model, glow
from flowkit.models.glow import COUPLINGS, ClampedAffineCoupling, glow_coupling, glow_step, plan_glow_levels

DTYPES = [torch.float32, torch.float64]


TINY = dict(num_scales=2, steps_per_scale=2, hidden_channels=8, num_layers=1)


def _tiny(shape=(1, 4, 4), num_levels=16, **kw):
    torch.manual_seed(0)
    return glow(shape, num_levels=num_levels, **{**TINY, **kw})


def _images(n, shape=(1, 4, 4), num_levels=16, seed=0):
    return torch.randint(0, num_levels, (n, *shape), generator=torch.Generator().manual_seed(seed))


# -- shapes at construction -------------------------------------------------------------


def test_three_level_glow_on_28x28_fails_at_construction_naming_the_level():
    with pytest.raises(ValueError) as info:
        glow((1, 28, 28), num_scales=3)
    msg = str(info.value)
    assert "level 3" in msg and "4x7x7" in msg and "7 is odd" in msg
    assert "num_scales<=2" in msg and "pad_to=(32, 32)" in msg


@pytest.mark.parametrize(
    "shape, levels, pad_to, expected",
    [
        ((1, 7, 7), 1, None, "level 1 cannot squeeze 1x7x7 (7 is odd); use pad_to=(8, 8)"),
        ((1, 8, 8), 4, None, "level 4 cannot squeeze 8x1x1 (1 is odd); use num_scales<=3 or pad_to=(16, 16)"),
        ((3, 8, 6), 2, None, "level 2 cannot squeeze 6x4x3 (3 is odd); use num_scales<=1 or pad_to=(8, 8)"),
        ((1, 28, 28), 3, (30, 30), "level 2 cannot squeeze 2x15x15 (15 is odd); use num_scales<=1 or pad_to=(32, 32)"),
    ],
)
def test_impossible_configurations_name_level_shape_and_fix(shape, levels, pad_to, expected):
    with pytest.raises(ValueError) as info:
        glow(shape, num_scales=levels, steps_per_scale=1, hidden_channels=4, pad_to=pad_to)
    assert str(info.value) == "glow: " + expected


def test_the_suggested_padding_works():
    model = glow((1, 28, 28), num_scales=3, steps_per_scale=1, hidden_channels=4, num_layers=0, pad_to=(32, 32))
    assert model.level_shapes == [(2, 16, 16), (4, 8, 8), (16, 4, 4)]
    assert model.image_shape == (1, 28, 28) and model.padded_shape == (1, 32, 32)


def test_plan_glow_levels():
    plans = plan_glow_levels((1, 8, 8), 3)
    assert [p.level for p in plans] == [1, 2, 3]
    assert [p.input_shape for p in plans] == [(1, 8, 8), (2, 4, 4), (4, 2, 2)]
    assert [p.squeezed_shape for p in plans] == [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    assert [p.output_shape for p in plans] == [(2, 4, 4), (4, 2, 2), None]


@pytest.mark.parametrize(
    "kwargs, argname",
    [
        (dict(num_scales=0), "num_scales"),
        (dict(steps_per_scale=0), "steps_per_scale"),
        (dict(hidden_channels=0), "hidden_channels"),
        (dict(num_layers=-1), "num_layers"),
        (dict(num_levels=1), "num_levels"),
        (dict(coupling="spline"), "coupling"),
        (dict(dequantization="none"), "dequantization"),
        (dict(pad_to=(2, 8)), "pad_to"),
        (dict(pad_to=8), "pad_to"),
        (dict(pad_value=256), "pad_value"),
        (dict(image_shape=(8, 8)), "image_shape"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argname):
    args = {"image_shape": (1, 4, 4), **TINY, **kwargs}
    with pytest.raises(ValueError, match=argname):
        glow(**args)


def test_structure_uses_nflows_parts():
    model = _tiny(shape=(1, 8, 8), num_scales=3)
    assert isinstance(model, ImageFlow) and isinstance(model.flow, MultiscaleCompositeTransform)
    assert model.level_shapes == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
    for level in model.flow._transforms:
        squeeze, steps = level._transforms
        assert isinstance(squeeze, SqueezeTransform)
        assert len(steps._transforms) == 2
        for step in steps._transforms:
            actnorm, conv, coupling = step._transforms
            assert isinstance(actnorm, ActNorm) and isinstance(conv, OneByOneConvolution)
            assert type(coupling).__name__ == "AffineCouplingTransform"
            assert isinstance(coupling.transform_net, flowkit.layers.GatedConvNet)
        # alternating halves
        t0, t1 = (s._transforms[2].transform_features.tolist() for s in steps._transforms)
        assert sorted(t0 + t1) == list(range(steps._transforms[0]._transforms[0].log_scale.numel()))


# -- every part through check_transform ---------------------------------------------------


def _check(t, x, dtype):
    torch.manual_seed(1)
    perturb_parameters(t)
    t.to(dtype)
    report = check_transform(t, x.to(dtype) if x.is_floating_point() else x)
    assert report.ok, str(report)
    return report


def _floats(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_coupling_and_step_pass_check_transform(coupling, dtype):
    torch.manual_seed(0)
    _check(glow_coupling(4, 0, 8, 1, coupling), _floats(3, 4, 2, 2), dtype)
    _check(glow_coupling(4, 1, 8, 1, coupling), _floats(3, 4, 2, 2), dtype)
    _check(glow_step(4, 1, 8, 1, coupling), _floats(3, 4, 2, 2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nflows_parts_pass_check_transform(dtype):
    _check(SqueezeTransform(), _floats(2, 1, 4, 4), dtype)
    _check(ActNorm(4), _floats(2, 4, 2, 2), dtype)
    torch.manual_seed(0)
    _check(OneByOneConvolution(4), _floats(2, 4, 2, 2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_whole_glow_flow_passes_check_transform(coupling, dtype):
    model = _tiny(coupling=coupling)
    _check(model.flow, _floats(2, 1, 4, 4), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glow_dequantization_passes_check_transform(dtype):
    model = _tiny(shape=(1, 2, 4), num_scales=1, pad_to=(4, 4))  # vardeq is built at the padded size
    assert model.dequantization.flow is not None
    _check(model.dequantization, _images(3, (1, 4, 4)), dtype)


def test_couplings_at_initialisation():
    x = _floats(2, 4, 2, 2)
    for coupling in ("additive", "clamped-affine"):  # identity, ladj 0
        z, ladj = glow_coupling(4, 0, 8, 1, coupling)(x)
        assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(2))
    # nflows' affine coupling starts at scale sigmoid(2) + 1e-3 on the transformed half (Glow's choice)
    z, ladj = glow_coupling(4, 0, 8, 1, "affine")(x)
    scale = torch.sigmoid(torch.tensor(2.0)) + 1e-3
    torch.testing.assert_close(z[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(z[:, 2:], x[:, 2:] * scale)
    torch.testing.assert_close(ladj, torch.full((2,), 8 * math.log(scale)))


def test_clamped_coupling_clamps_log_scale():
    coupling = glow_coupling(4, 0, 8, 1, "clamped-affine")
    assert isinstance(coupling, ClampedAffineCoupling)
    with torch.no_grad():
        coupling.transform_net.net[-1].bias.fill_(100.0)  # huge raw log-scales
    _, ladj = coupling(_floats(2, 4, 2, 2))
    torch.testing.assert_close(ladj, torch.full((2,), 8 * math.tanh(100.0)))  # |s| <= f = 1


# -- the ImageFlow API on a tiny Glow ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dequantization", ["variational", "uniform"])
def test_image_flow_api_on_tiny_glow(dtype, dequantization):
    model = _tiny(dequantization=dequantization).to(dtype)
    x = _images(4)
    model.initialize(x)
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    perturb_parameters(model, scale=0.05)
    model.eval()
    assert model.dtype == dtype

    lp = model.log_prob(x)
    assert lp.shape == (4,) and lp.dtype == dtype and torch.isfinite(lp).all()
    torch.manual_seed(3)
    bpd = model.bpd(x)
    torch.manual_seed(3)
    torch.testing.assert_close(bpd, -model.log_prob(x) / (16 * math.log(2)))
    bpd_is = model.bpd_importance(x, num_samples=3)
    assert bpd_is.shape == (4,) and torch.isfinite(bpd_is).all()

    z = model.encode(x)
    assert z.shape == (4, 16) and z.dtype == dtype
    assert torch.equal(model.decode(z), x), "decode(encode(x)) must give x back exactly"

    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, 1, 4, 4) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < 16

    path = model.interpolate(x[0], x[1], steps=4)
    assert path.shape == (4, 1, 4, 4)
    assert torch.equal(path[0], x[0]) and torch.equal(path[-1], x[1])


def test_gradients_reach_every_parameter():
    model = _tiny()
    model.initialize(_images(8))
    perturb_parameters(model, scale=0.05)
    (-model.log_prob(_images(4)).mean()).backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert not missing


def test_state_dict_round_trip():
    model = _tiny()
    model.initialize(_images(8))
    perturb_parameters(model, scale=0.05)
    other = _tiny()
    torch.manual_seed(5)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    x = _images(3)
    torch.manual_seed(7)
    a = model.log_prob(x)
    torch.manual_seed(7)
    torch.testing.assert_close(other.log_prob(x), a, rtol=0, atol=0)


# -- padding ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_models_the_border_and_divides_bpd_by_original_dims(dtype):
    model = _tiny(shape=(1, 3, 4), pad_to=(4, 4), pad_value=2).to(dtype)
    assert model.padded_shape == (1, 4, 4) and model.padding == (0, 0, 0, 1)
    assert (model.num_dims, model.model_dims) == (12, 16) and model.latent_shape == (16,)
    x = _images(4, (1, 3, 4))
    padded = model.pad(x)
    assert padded.shape == (4, 1, 4, 4) and (padded[:, :, 3] == 2).all() and torch.equal(model.crop(padded), x)
    model.initialize(x)
    perturb_parameters(model, scale=0.05)
    model.eval()

    torch.manual_seed(0)
    lp = model.log_prob(x)
    torch.manual_seed(0)
    torch.testing.assert_close(model.bpd(x), -lp / (12 * math.log(2)))
    # log_prob of x is the log-density of the padded image (same noise, same flow)
    torch.manual_seed(0)
    h, ladj = model.dequantization(padded.to(model.device))
    z, ladj_flow = model.flow(h)
    torch.testing.assert_close(lp, flowkit.models.standard_normal_log_prob(z) + ladj + ladj_flow)

    z = model.encode(x)
    assert z.shape == (4, 16)
    assert torch.equal(model.decode(z), x)
    assert model.sample(3).shape == (3, 1, 3, 4)
    assert model.interpolate(x[0], x[1], steps=3).shape == (3, 1, 3, 4)
    with pytest.raises(ValueError, match="x"):
        model.log_prob(padded)  # the user passes unpadded images


def test_padding_centres_the_image():
    model = glow((1, 5, 6), num_scales=1, steps_per_scale=1, hidden_channels=4, num_layers=0, pad_to=(8, 8))
    assert model.padding == (1, 1, 1, 2)  # left, right, top, bottom


# -- memory saving ------------------------------------------------------------------------


def test_memory_saving_glow_matches_the_plain_one():
    from flowkit.layers.memory_saving import MemorySavingComposite

    plain = _tiny(coupling="clamped-affine")
    saving = _tiny(coupling="clamped-affine", memory_saving=True)
    assert sum(isinstance(m, MemorySavingComposite) for m in saving.modules()) == 2
    x = _images(4)
    plain.initialize(x)
    perturb_parameters(plain, scale=0.05)
    saving.load_state_dict(plain.state_dict())
    losses = []
    for model in (plain, saving):
        torch.manual_seed(11)
        loss = -model.log_prob(x).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (n, p), q in zip(plain.named_parameters(), saving.parameters(), strict=False):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)


# -- build_model ----------------------------------------------------------------------------


def test_build_model():
    assert MODEL_NAMES == ("glow", "simple", "vardeq", "multiscale")
    model = build_model("glow", (1, 4, 4), 16, **TINY)
    assert isinstance(model, ImageFlow) and model.num_levels == 16 and len(model.level_shapes) == 2
    for name in ("simple", "vardeq", "multiscale"):
        model = build_model(name, (1, 4, 4), 17)
        assert isinstance(model, ImageFlow) and model.num_levels == 17
    with pytest.raises(ValueError, match="num_scales"):
        build_model("multiscale", (1, 4, 4), 17, num_scales=2)
    with pytest.raises(ValueError, match="name"):
        build_model("realnvp", (1, 4, 4), 17)


def test_registry_has_a_glow_case():
    assert "glow flow (2 scales)" in flowkit.check.LAYER_CASES


def test_docstring_examples_run():
    import flowkit.models

    # flowkit.models.glow is the function; the module is in sys.modules
    for module in (sys.modules["flowkit.models.glow"], flowkit.models):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_old_argument_names_still_build_the_same_glow_with_a_deprecation_warning():
    with pytest.warns(
        DeprecationWarning, match="(levels|steps_per_level)= is deprecated; use (num_scales|steps_per_scale)="
    ):
        old = glow((1, 8, 8), levels=2, steps_per_level=1, hidden_channels=4, num_levels=17)
    new = glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=4, num_levels=17)
    assert old.level_shapes == new.level_shapes
    assert [p.shape for p in old.parameters()] == [p.shape for p in new.parameters()]
    with pytest.raises(TypeError, match="give num_scales= only"):
        glow((1, 8, 8), levels=2, num_scales=2)
