"""The fast GatedConvNet computes the tutorial's function: checked against the plain formulas."""

import pytest
import torch
import torch.nn.functional as F

from flowkit.layers import ConcatELU, GatedConvNet


def plain_concat_elu(x):
    return torch.cat([F.elu(x), F.elu(-x)], dim=1)


def plain_gated_conv_net(net: GatedConvNet, x, context=None):
    """The tutorial's GatedConvNet written out with F.conv2d, reading the weights of ``net``."""
    layers = list(net.net)
    if context is not None:
        x = torch.cat([x, context], dim=1)
    h = F.conv2d(x, layers[0].weight, layers[0].bias, padding=1)
    for block, norm in zip(layers[1:-2:2], layers[2:-2:2], strict=True):
        a = F.conv2d(plain_concat_elu(F.conv2d(h, block.conv_in.weight, block.conv_in.bias, padding=1)),
                     block.conv_out.weight, block.conv_out.bias)  # fmt: skip
        value, gate = a.chunk(2, dim=1)
        h = h + value * torch.sigmoid(gate)
        h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), norm.norm.weight, norm.norm.bias).permute(0, 3, 1, 2)
    return F.conv2d(plain_concat_elu(h), layers[-1].weight, layers[-1].bias, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_concat_elu_equals_the_two_elus_values_and_gradient(dtype, channels_last):
    x = torch.randn(3, 5, 4, 4, dtype=dtype) * 3
    x[0, 0, 0, :3] = torch.tensor([0.0, float("inf"), -float("inf")], dtype=dtype)
    x[0, 1, 0, :2] = torch.tensor([1e-30, -1e-30], dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = ConcatELU()(x)
    expected = plain_concat_elu(x)
    # torch's vectorised elu and the fast path's expm1 may differ in the last bit (seen on some
    # CPUs in float32); the special values (0, +-inf, +-1e-30) must come out exactly
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(out, expected, rtol=tol, atol=0)
    special = (slice(0, 1), slice(0, 2), slice(0, 1))
    assert torch.equal(out[special][..., :3], expected[special][..., :3])
    finite = torch.randn_like(x).detach().requires_grad_(True)
    grad_out = torch.randn(3, 10, 4, 4, dtype=dtype)
    (g_fast,) = torch.autograd.grad(ConcatELU()(finite), finite, grad_out)
    (g_plain,) = torch.autograd.grad(plain_concat_elu(finite), finite, grad_out)
    torch.testing.assert_close(g_fast, g_plain, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("context_channels", [0, 1])
def test_gated_conv_net_is_the_tutorials_function(dtype, context_channels):
    torch.manual_seed(0)
    net = GatedConvNet(2, 4, hidden_channels=6, num_layers=2, context_channels=context_channels)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)  # the last conv starts at zero: move every weight off it
    net.to(dtype)
    x = torch.randn(3, 2, 5, 5, dtype=dtype, requires_grad=True)
    ctx = torch.randn(3, context_channels, 5, 5, dtype=dtype) if context_channels else None
    out, expected = net(x, ctx), plain_gated_conv_net(net, x, ctx)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    fast = torch.autograd.grad(out, [x, *net.parameters()], grad_out)
    plain = torch.autograd.grad(expected, [x, *net.parameters()], grad_out)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1)))


def test_state_dict_keys_are_unchanged():
    keys = set(GatedConvNet(1, 2, hidden_channels=4, num_layers=1).state_dict())
    assert keys == {
        "net.0.weight",
        "net.0.bias",
        "net.1.conv_in.weight",
        "net.1.conv_in.bias",
        "net.1.conv_out.weight",
        "net.1.conv_out.bias",
        "net.2.norm.weight",
        "net.2.norm.bias",
        "net.4.weight",
        "net.4.bias",
    }
