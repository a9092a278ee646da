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
