import math

import pytest
import torch

from flowkit.models import TUTORIAL_KINDS, ImageFlow, tutorial_flow

EXPECTED = {"simple": 335_128, "vardeq": 379_556, "multiscale": 1_062_090}


@pytest.mark.parametrize("kind", TUTORIAL_KINDS)
def test_parameter_counts_match_the_tutorial(kind):
    model = tutorial_flow(kind, image_shape=(1, 28, 28), num_levels=256)
    assert isinstance(model, ImageFlow)
    assert model.num_parameters() == EXPECTED[kind]


@pytest.mark.parametrize("kind", TUTORIAL_KINDS)
def test_log_prob_and_bpd(kind):
    torch.manual_seed(0)
    model = tutorial_flow(kind, image_shape=(1, 8, 8), num_levels=17)
    x = torch.randint(0, 17, (5, 1, 8, 8))
    torch.manual_seed(1)
    lp = model.log_prob(x)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    torch.manual_seed(1)  # same dequantization noise
    bpd = model.bpd(x)
    torch.testing.assert_close(bpd, -lp / (64 * math.log(2)))
    # an untrained flow is near the uniform baseline log2(17) bits/dim, not far off
    assert abs(bpd.mean().item() - math.log2(17)) < 1.5
    bpd_is = model.bpd_importance(x, num_samples=4)
    assert bpd_is.shape == (5,)
    samples = model.sample(3)
    assert samples.shape == (3, 1, 8, 8) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < 17


def test_multiscale_rejects_sizes_it_cannot_squeeze():
    with pytest.raises(ValueError, match="divisible by 4.*30x30"):
        tutorial_flow("multiscale", image_shape=(1, 30, 30))
    with pytest.raises(ValueError, match="kind"):
        tutorial_flow("glow")


def test_model_checks_its_inputs():
    model = tutorial_flow("simple", image_shape=(1, 8, 8), num_levels=17)
    with pytest.raises(ValueError, match=r"x: expected images of shape \[batch, 1, 8, 8\]"):
        model.log_prob(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        model.log_prob(torch.full((2, 1, 8, 8), 17))


def test_float64_model_end_to_end():
    model = tutorial_flow("multiscale", image_shape=(1, 8, 8), num_levels=17).double()
    x = torch.randint(0, 17, (2, 1, 8, 8))
    assert model.log_prob(x).dtype == torch.float64
    z = model.encode(x)
    assert z.dtype == torch.float64
    assert model.decode(z).dtype == torch.long


@pytest.mark.parametrize("validate", [True, False])
def test_an_empty_batch_is_a_clear_error_at_the_boundary(validate):
    model = tutorial_flow("simple", image_shape=(1, 8, 8), num_levels=17)
    empty = torch.zeros(0, 1, 8, 8, dtype=torch.long)
    expected = r"x: expected at least one image, got an empty batch of shape \(0, 1, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        model.bpd(empty, validate=validate)
    with pytest.raises(ValueError, match=expected):
        model.bpd_importance(empty, num_samples=2, validate=validate)


def test_widths_depth_and_dequantization_change_the_architecture():
    from flowkit.layers import VariationalDequantization
    from flowkit.models import build_model

    base = tutorial_flow("multiscale", (1, 8, 8), 17)
    small = tutorial_flow("multiscale", (1, 8, 8), 17, hidden_channels=[16, 24, 32], num_layers=1)
    uniform = tutorial_flow("multiscale", (1, 8, 8), 17, dequantization="uniform")
    assert small.num_parameters() < base.num_parameters() / 4
    assert isinstance(base.dequantization, VariationalDequantization)
    assert not isinstance(uniform.dequantization, VariationalDequantization)
    assert uniform.num_parameters() < base.num_parameters()
    assert tutorial_flow("simple", (1, 8, 8), 17, dequantization="variational").num_parameters() == (
        tutorial_flow("vardeq", (1, 8, 8), 17).num_parameters()
    )
    # the defaults are the tutorial's architecture, through the registry too
    built = build_model("multiscale", (1, 28, 28), 256, hidden_channels=[32, 48, 64], num_layers=3)
    assert built.num_parameters() == EXPECTED["multiscale"]
    x = torch.randint(0, 17, (3, 1, 8, 8))
    assert torch.isfinite(small.bpd(x)).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden_channels": [16, 24]}, ValueError, "hidden_channels: expected 3 widths"),
        ({"hidden_channels": 16}, TypeError, "hidden_channels"),
        ({"hidden_channels": [16, 0, 8]}, ValueError, "hidden_channels"),
        ({"num_layers": -1}, ValueError, "num_layers"),
        ({"dequantization": "gaussian"}, ValueError, "dequantization"),
    ],
)
def test_bad_architecture_options_are_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        tutorial_flow("multiscale", (1, 8, 8), 17, **kwargs)
