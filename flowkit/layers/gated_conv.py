"""The tutorial's coupling network: a gated residual CNN (inspired by Flow++, Ho et al., 2019).

Same parameters, same ``state_dict`` keys and the same function as the tutorial's
``GatedConvNet``; on the CPU it runs the way oneDNN runs fastest:

* channels-last (NHWC) activations from the first conv to the last, so every conv takes
  oneDNN's fast path and the channel LayerNorm normalises a contiguous last dimension;
* ``ConcatELU`` with one ``expm1`` per input value instead of two (``elu(x)`` and
  ``elu(-x)`` share ``expm1(-|x|)``), written straight into its output;
* the gate ``x + glu(h)`` over the contiguous last dimension of the NHWC view.

(A 1x1 conv as one matrix product on the NHWC view was measured too: no faster than oneDNN's.)

While ``torch.compile`` traces, the plain formulas are used instead (the compiler fuses them
itself), so a compiled model is one graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConcatELU", "LayerNormChannels", "GatedResidualBlock", "GatedConvNet", "gated_conv_net"]


def _channels_last_pays(x: torch.Tensor) -> bool:
    """True where oneDNN runs the convs faster in NHWC (CPU float32/bfloat16, 4-D)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)


def _is_nhwc(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _empty_doubled_channels(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[B, 2C, ...]`` tensor in ``x``'s layout (NHWC stays NHWC)."""
    shape = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
    layout = torch.channels_last if _is_nhwc(x) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


class _ConcatELUFunction(torch.autograd.Function):
    """``[elu(x), elu(-x)]`` from one ``e = expm1(-|x|)``: ``elu(x) = max(x, e)``, ``elu(-x) = max(-x, e)``.

    (For ``x > 0``: ``e = expm1(-x)`` lies in (-1, 0), below ``x`` and above ``-x``; for
    ``x <= 0``: ``e = expm1(x) >= x`` and ``e <= 0 <= -x``.)  Half the ``expm1`` work of two
    ELUs, written straight into the two halves of the output.  Saves only the output
    (which the next conv saves anyway): ``elu'(v) = 1`` where the output is positive,
    ``elu(v) + 1`` elsewhere.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        out = _empty_doubled_channels(x)
        minus_x = torch.neg(x)
        e = torch.minimum(x, minus_x).expm1_()  # expm1(-|x|), on a contiguous tensor (vectorises best)
        torch.maximum(x, e, out=out[:, :c])
        torch.maximum(minus_x, e, out=out[:, c:])
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        c = out.shape[1] // 2
        grad_cat = torch.ops.aten.elu_backward(grad, 1.0, 1, 1, True, out)
        return grad_cat[:, :c] - grad_cat[:, c:]


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """``[elu(x), elu(-x)]`` along dimension 1 (the fused kernel above, or the plain formula when compiling)."""
    if torch.compiler.is_compiling():
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)
    return _ConcatELUFunction.apply(x)


class ConcatELU(nn.Module):
    """``[elu(x), elu(-x)]`` along channels: doubles the channels, strong gradients both ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"x: expected a tensor [batch, channels, ...], got shape {tuple(x.shape)}")
        return concat_elu(x)


class LayerNormChannels(nn.Module):
    """LayerNorm over the channel dimension of ``[B, C, H, W]`` at every pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # on NHWC memory both permutes are free views and the norm reads a contiguous last dim
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedResidualBlock(nn.Module):
    """``x + a * sigmoid(g)`` with ``[a, g] = conv1x1(ConcatELU(conv3x3(x)))``."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1)
        self.act = ConcatELU()
        self.conv_out = nn.Conv2d(2 * hidden_channels, 2 * channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # glu(h, dim=1) = value * sigmoid(gate) for [value, gate] = h.chunk(2, dim=1), one kernel
        h = self.conv_out(self.act(self.conv_in(x)))
        if _is_nhwc(h):
            # NHWC: glu over the (contiguous) last dim of the NHWC view, several times faster on CPU
            return x + F.glu(h.permute(0, 2, 3, 1), dim=-1).permute(0, 3, 1, 2)
        return x + F.glu(h, dim=1)


class GatedConvNet(nn.Module):
    """Gated residual CNN used inside coupling layers.

    conv3x3 -> ``num_layers`` x [GatedResidualBlock, LayerNormChannels] -> ConcatELU ->
    conv3x3 (zero-initialised, so a coupling built on it starts as the identity).

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of the output (``2 * C`` for affine coupling parameters).
        hidden_channels: width of the residual blocks.
        num_layers: number of gated residual blocks.
        context_channels: channels of ``context``, concatenated after ``x``; 0 for none.  The
            context is ``[B, context_channels, H, W]``, or ``[B, context_channels]`` (e.g. a
            class-label embedding), broadcast to every pixel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 32,
        num_layers: int = 3,
        context_channels: int = 0,
    ):
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("hidden_channels", hidden_channels, 1),
            ("num_layers", num_layers, 0),
            ("context_channels", context_channels, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        self.in_channels = in_channels
        self.context_channels = context_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels + context_channels, hidden_channels, 3, padding=1)]
        for _ in range(num_layers):
            layers += [GatedResidualBlock(hidden_channels, hidden_channels), LayerNormChannels(hidden_channels)]
        last = nn.Conv2d(2 * hidden_channels, out_channels, 3, padding=1)
        for p in last.parameters():  # weight and bias
            nn.init.zeros_(p)
        self.net = nn.Sequential(*layers, ConcatELU(), last)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape [batch, {self.in_channels}, height, width], got {tuple(x.shape)}")
        if not self.context_channels:
            if context is not None:
                raise ValueError("context: this net was built with context_channels=0 but got a context")
            return
        if context is None:
            raise ValueError(f"context: this net expects {self.context_channels} context channels, got None")
        spatial = context.dim() == 4 and context.shape[2:] == x.shape[2:]
        if (
            context.shape[0] != x.shape[0]
            or context.shape[1:2] != (self.context_channels,)
            or not (spatial or context.dim() == 2)
        ):
            raise ValueError(
                f"context: expected shape [{x.shape[0]}, {self.context_channels}, {x.shape[2]}, {x.shape[3]}] "
                f"(or [{x.shape[0]}, {self.context_channels}], broadcast over the image), got {tuple(context.shape)}"
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, context)
        if context is not None:  # present exactly when the net was built with context channels
            if context.dim() == 2:  # a vector per image (a label embedding): the same at every pixel
                context = context[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        if _channels_last_pays(x):
            # oneDNN's convs run about twice as fast in NHWC; the LayerNorm's permute is then free.
            # A fresh NHWC copy (x is small: C channels), since x.contiguous(channels_last) leaves a
            # 1-channel NCHW tensor as it is and the convs would stay NCHW.  Output: NCHW again.
            x_nhwc = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
            return self.net(x_nhwc).contiguous()
        return self.net(x)


def gated_conv_net(
    hidden_channels: int = 32, num_layers: int = 3, context_channels: int = 0
) -> Callable[[int, int], GatedConvNet]:
    """The ``transform_net_create_fn(in_channels, out_channels)`` that nflows couplings take.

    Example:
        >>> from nflows.transforms import AffineCouplingTransform
        >>> coupling = AffineCouplingTransform([1, 1, -1, -1], gated_conv_net(16))
    """

    def create(in_channels: int, out_channels: int) -> GatedConvNet:
        return GatedConvNet(in_channels, out_channels, hidden_channels, num_layers, context_channels)

    return create
