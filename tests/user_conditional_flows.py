"""A user's own class-conditional flow, written the way a user would: nflows parts that take
``context`` (a squeeze, ActNorm, 1x1 convolutions, affine couplings whose nets read the label),
the user's own coupling net and label encoder, and flowkit's Dequantization and ImageFlow.

The tests copy this file into a temporary folder and train it by import path
(``flowkit train --model my_conditional_flows:labelled_glow --conditional``), so it is called
as a builder: ``labelled_glow(image_shape, num_levels, num_classes=K, **model_kwargs)``.
"""

import torch
import torch.nn.functional as F
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)
from torch import nn

from flowkit import ImageFlow
from flowkit.layers import Dequantization


class OneHot(nn.Module):
    """Labels ``[B]`` -> one-hot rows ``[B, K]``: the flow's context (no parameters)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, y):
        return F.one_hot(y, self.num_classes).float()


class LabelConvNet(nn.Module):
    """``net(x, context)``: a conv on ``x`` plus a per-class bias from the one-hot context; the
    last layer starts at zero, so each coupling starts as nflows' default affine coupling."""

    def __init__(self, in_channels, out_channels, num_classes, hidden=8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.label = nn.Linear(num_classes, hidden)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, context):
        h = self.conv(x) + self.label(context)[:, :, None, None]
        return self.out(torch.relu(h))


def labelled_glow(image_shape, num_levels, num_classes, num_scales=2, hidden=8):
    """``num_scales`` x [squeeze, ActNorm, 1x1 conv, label-conditioned affine coupling, split]."""
    c, h, w = image_shape
    flow = MultiscaleCompositeTransform(num_transforms=num_scales)
    shape = (c, h, w)
    for _ in range(num_scales):
        channels = 4 * shape[0]
        mask = [1 if j >= channels // 2 else -1 for j in range(channels)]
        coupling = AffineCouplingTransform(mask, lambda i, o: LabelConvNet(i, o, num_classes, hidden))
        layers = [SqueezeTransform(), ActNorm(channels), OneByOneConvolution(channels), coupling]
        shape = flow.add_transform(CompositeTransform(layers), (channels, shape[1] // 2, shape[2] // 2))
    return ImageFlow(
        Dequantization(num_levels), flow, image_shape, num_classes=num_classes, context_encoder=OneHot(num_classes)
    )
