"""flowkit's layers: each an ``nflows.transforms.Transform`` (contract in :mod:`flowkit.layers.base`)."""

from flowkit.layers.conditional import ClassConditionalPrior
from flowkit.layers.coupling import ClampedAffineCoupling, MaskedAffineCoupling, channel_mask, checkerboard_mask
from flowkit.layers.dequantization import (
    Dequantization,
    ScaledLogit,
    VariationalDequantization,
    default_noise_margin,
)
from flowkit.layers.gated_conv import (
    ConcatELU,
    GatedConvNet,
    GatedResidualBlock,
    LayerNormChannels,
    gated_conv_net,
)
from flowkit.layers.memory_saving import MemorySavingComposite

__all__ = [
    "ClampedAffineCoupling",
    "ClassConditionalPrior",
    "ConcatELU",
    "Dequantization",
    "GatedConvNet",
    "GatedResidualBlock",
    "LayerNormChannels",
    "MaskedAffineCoupling",
    "MemorySavingComposite",
    "ScaledLogit",
    "VariationalDequantization",
    "channel_mask",
    "checkerboard_mask",
    "default_noise_margin",
    "gated_conv_net",
]
