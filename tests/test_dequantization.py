import math

import pytest
import torch
from nflows.transforms import CompositeTransform

from flowkit.check import perturb_parameters
from flowkit.layers import (
    Dequantization,
    GatedConvNet,
    MaskedAffineCoupling,
    ScaledLogit,
    VariationalDequantization,
    checkerboard_mask,
)

LEVELS = [2, 17, 256]


def _all_levels(k, copies=3):
    return torch.arange(k).view(1, 1, 1, k).repeat(copies, 1, 1, 1)


def _extreme_noise(k):
    # noise at 0, just below 1, and in the middle: the hardest cases for the round trip
    return torch.stack([torch.zeros(1, 1, k), torch.full((1, 1, k), 1 - 2**-24), torch.full((1, 1, k), 0.5)])


@pytest.mark.parametrize("k", LEVELS)
def test_round_trip_exact_for_every_level_float32(k):
    deq = Dequantization(num_levels=k)
    x = _all_levels(k)
    z, _, _ = deq.forward_with_noise(x, _extreme_noise(k))
    assert z.dtype == torch.float32
    assert torch.equal(deq.inverse(z)[0], x)
    for seed in range(5):  # random noise too
        torch.manual_seed(seed)
        assert torch.equal(deq.inverse(deq(x)[0])[0], x)


@pytest.mark.parametrize("k", [17, 256])
def test_without_the_margin_the_round_trip_fails(k):
    # the tutorial's formulation (noise on [0, 1) with no margin) loses levels in float32
    deq = Dequantization(num_levels=k, noise_margin=0.0)
    x = _all_levels(k)
    z, _, _ = deq.forward_with_noise(x, _extreme_noise(k))
    assert not torch.equal(deq.inverse(z)[0], x)


@pytest.mark.parametrize("k", LEVELS)
def test_variational_round_trip_exact_for_every_level(k):
    torch.manual_seed(0)
    flow = CompositeTransform(
        [
            MaskedAffineCoupling(
                checkerboard_mask(1, k, invert=i % 2 == 1), GatedConvNet(1, 2, 8, 1, context_channels=1), 1
            )
            for i in range(2)
        ]
    )
    perturb_parameters(flow, scale=0.5)
    deq = VariationalDequantization(flow, num_levels=k)
    x = _all_levels(k)
    z, _, _ = deq.forward_with_noise(x, _extreme_noise(k))
    assert torch.equal(deq.inverse(z)[0], x)


def test_uniform_logdet_matches_formula():
    # ladj = sum log|dz/dv| - log q(u), with log q(u) = -D log(1 - 2m) for the shrunk box
    deq = Dequantization(num_levels=256, alpha=1e-5).double()
    x = torch.randint(0, 256, (4, 1, 3, 3))
    r = torch.rand(x.shape, dtype=torch.float64)
    z, ladj, log_q = deq.forward_with_noise(x, r)
    m = deq.noise_margin
    torch.testing.assert_close(log_q, torch.full((4,), -9 * math.log1p(-2 * m), dtype=torch.float64))
    y = torch.sigmoid(z)
    expected = (math.log((1 - 1e-5) / 256) - torch.log(y) - torch.log1p(-y)).sum(dim=(1, 2, 3)) - log_q
    torch.testing.assert_close(ladj, expected)


def test_margin_costs_little():
    # the documented price of exactness: < 1e-3 bits/dim at 256 levels
    m = Dequantization(256).noise_margin
    assert -math.log1p(-2 * m) / math.log(2) < 1e-3


def test_outputs_follow_module_dtype_and_inverse_returns_long():
    deq = Dequantization(17).double()
    x = torch.randint(0, 17, (2, 1, 4, 4), dtype=torch.uint8)
    z, ladj = deq(x)
    assert z.dtype == torch.float64 and ladj.dtype == torch.float64
    xb = deq.inverse(z)[0]
    assert xb.dtype == torch.long and torch.equal(xb, x.long())


def test_variational_context_is_image_scaled_to_minus_one_one():
    deq = VariationalDequantization(CompositeTransform([]), num_levels=256)
    ctx = deq.context_from_images(torch.tensor([0.0, 255.0]))
    torch.testing.assert_close(ctx, torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("layer", [Dequantization(256), VariationalDequantization(CompositeTransform([]), 256)])
def test_bad_inputs_raise_clear_errors(layer):
    with pytest.raises(TypeError, match="inputs.*integer"):
        layer(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"inputs.*\[0, 256\)"):
        layer(torch.full((2, 1, 4, 4), 256))
    with pytest.raises(ValueError, match=r"inputs.*\[0, 256\)"):
        layer(torch.full((2, 1, 4, 4), -1))
    with pytest.raises(ValueError, match="inputs.*batch, channels, height, width"):
        layer(torch.zeros(2, 28, 28, dtype=torch.long))
    with pytest.raises(TypeError, match="inputs"):
        layer.inverse(torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_levels"):
        Dequantization(0)
    with pytest.raises(ValueError, match="alpha"):
        Dequantization(256, alpha=1.5)
    with pytest.raises(ValueError, match="noise_margin"):
        Dequantization(256, noise_margin=0.7)
    with pytest.raises(TypeError, match="flow"):
        VariationalDequantization(torch.nn.Identity())


def test_scaled_logit_is_the_tutorial_squeeze():
    t = ScaledLogit(8, alpha=0.1).double()
    v = torch.tensor([[0.0, 4.0, 8.0]], dtype=torch.float64)
    z, _ = t(v)
    y = 0.05 + 0.9 * v / 8
    torch.testing.assert_close(z, torch.log(y / (1 - y)))


def test_inverse_of_a_nan_latent_is_a_clear_error():
    deq = Dequantization(256)
    z = torch.zeros(2, 1, 4, 4)
    z[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="inputs: expected finite latents, got 1 NaN of 32 values"):
        deq.inverse(z)
    ends = deq.inverse(torch.tensor([-float("inf"), float("inf")]).view(1, 1, 1, 2))[0]
    assert ends.tolist() == [[[[0, 255]]]], "an infinite latent is an end of the range, not an error"


def test_forward_unchecked_is_forward_without_the_check():
    deq = Dequantization(17)
    x = torch.randint(0, 17, (3, 1, 4, 4))
    torch.manual_seed(0)
    checked = deq(x)
    torch.manual_seed(0)
    unchecked = deq.forward_unchecked(x)
    torch.testing.assert_close(unchecked, checked)
    with pytest.raises(ValueError, match=r"inputs.*\[0, 17\)"):
        deq(torch.full((1, 1, 4, 4), 17))  # a layer called directly still validates its input
