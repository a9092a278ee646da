"""A user's own flow, written the way a user would: a Glow assembled by hand from nflows parts
(SqueezeTransform, ActNorm, OneByOneConvolution, AffineCouplingTransform,
MultiscaleCompositeTransform) with flowkit's Dequantization and GatedConvNet.

The tests use ``hand_glow`` as an instance (``train(config, model=hand_glow(...))``) and, with
this file copied into a temporary folder, by import path (``--model my_flows:hand_glow``) in
fresh processes.
"""

from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)

from flowkit import ImageFlow
from flowkit.layers import Dequantization, gated_conv_net


def hand_glow(image_shape, num_levels, num_scales=2, steps=1, hidden=8):
    """``num_scales`` x [squeeze, ``steps`` x (ActNorm, 1x1 conv, affine coupling), split]."""
    c, h, w = image_shape
    flow = MultiscaleCompositeTransform(num_transforms=num_scales)
    shape = (c, h, w)
    for _ in range(num_scales):
        channels = 4 * shape[0]
        layers = [SqueezeTransform()]
        for i in range(steps):
            mask = [1 if (j < channels // 2) == (i % 2 == 0) else -1 for j in range(channels)]
            layers += [
                ActNorm(channels),
                OneByOneConvolution(channels),
                AffineCouplingTransform(mask, gated_conv_net(hidden_channels=hidden, num_layers=1)),
            ]
        shape = flow.add_transform(CompositeTransform(layers), (channels, shape[1] // 2, shape[2] // 2))
    return ImageFlow(Dequantization(num_levels), flow, image_shape)
