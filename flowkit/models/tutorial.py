"""The image-flow tutorial's three models, rebuilt from flowkit layers and nflows parts."""

from __future__ import annotations

from collections.abc import Sequence

from nflows.transforms import CompositeTransform, MultiscaleCompositeTransform, SqueezeTransform, Transform

from flowkit.layers import (
    Dequantization,
    GatedConvNet,
    MaskedAffineCoupling,
    VariationalDequantization,
    channel_mask,
    checkerboard_mask,
)
from flowkit.models.image_flow import ImageFlow, label_embedding
from flowkit.validation import check_choice, check_image_shape, check_int

__all__ = ["tutorial_flow", "TUTORIAL_DEQUANTIZATIONS", "TUTORIAL_HIDDEN", "TUTORIAL_KINDS"]

TUTORIAL_KINDS = ("simple", "vardeq", "multiscale")
TUTORIAL_DEQUANTIZATIONS = ("variational", "uniform")
#: the tutorial's widths of the coupling nets: ``simple``/``vardeq`` use the first; ``multiscale``
#: the first (checkerboard couplings), second (channel couplings of level 1) and third (level 2)
TUTORIAL_HIDDEN = (32, 48, 64)


def _checkerboard_couplings(
    n: int, c: int, h: int, w: int, hidden: int, context_channels: int = 0, num_layers: int = 3
) -> list[Transform]:
    return [
        MaskedAffineCoupling(
            checkerboard_mask(h, w, invert=(i % 2 == 1)),
            GatedConvNet(c, 2 * c, hidden, num_layers, context_channels=context_channels),
            c,
        )
        for i in range(n)
    ]


def _channel_couplings(n: int, c: int, hidden: int, context_channels: int = 0, num_layers: int = 3) -> list[Transform]:
    return [
        MaskedAffineCoupling(
            channel_mask(c, invert=(i % 2 == 1)),
            GatedConvNet(c, 2 * c, hidden, num_layers, context_channels=context_channels),
            c,
        )
        for i in range(n)
    ]


def _check_hidden(hidden_channels: Sequence[int] | None) -> tuple[int, int, int]:
    if hidden_channels is None:
        return TUTORIAL_HIDDEN
    if isinstance(hidden_channels, (str, bytes)) or not isinstance(hidden_channels, Sequence):
        raise TypeError(f"hidden_channels: expected a sequence of 3 ints, got {type(hidden_channels).__name__}")
    widths = tuple(hidden_channels)
    if len(widths) != 3:
        raise ValueError(f"hidden_channels: expected 3 widths (checkerboard, level 1, level 2), got {widths!r}")
    for width in widths:
        check_int("hidden_channels", width, low=1)
    return widths


def _variational_dequantization(c: int, h: int, w: int, num_levels: int) -> VariationalDequantization:
    # four checkerboard couplings on the noise, conditioned on the image (hidden 16)
    noise_flow = CompositeTransform(_checkerboard_couplings(4, c, h, w, hidden=16, context_channels=c))
    return VariationalDequantization(noise_flow, num_levels=num_levels)


def tutorial_flow(
    kind: str,
    image_shape: Sequence[int] = (1, 28, 28),
    num_levels: int = 256,
    num_classes: int | None = None,
    label_channels: int | None = None,
    hidden_channels: Sequence[int] | None = None,
    num_layers: int = 3,
    dequantization: str | None = None,
) -> ImageFlow:
    """The tutorial's ``simple``, ``vardeq`` or ``multiscale`` flow as an :class:`ImageFlow`.

    * ``simple``: uniform dequantization + 8 checkerboard couplings (GatedConvNet, 32 hidden).
    * ``vardeq``: the same with variational dequantization (4 conditional couplings, 16 hidden).
    * ``multiscale``: variational dequantization, 2 checkerboard couplings, squeeze,
      2 channel couplings (48 hidden), split half off to the prior, squeeze,
      4 channel couplings (64 hidden) -- split and prior via nflows'
      ``MultiscaleCompositeTransform``.

    At ``(1, 28, 28)`` the parameter counts are the tutorial's: 335,128 / 379,556 / 1,062,090.

    ``num_classes=K`` makes it class-conditional as :func:`~flowkit.models.glow` does: a
    :class:`~flowkit.layers.ClassConditionalPrior` on the latent and a label embedding of
    ``label_channels`` channels (default 8; 0: the prior only) as context of every coupling
    net of the flow (the dequantization stays conditioned on the image only).

    The tutorial's architecture is the default; these options change it (for a smaller or
    faster model on small images):

    * ``hidden_channels``: the widths of the coupling nets, 3 ints (checkerboard couplings,
      level-1 channel couplings, level-2 channel couplings; ``simple``/``vardeq`` use the
      first); default :data:`TUTORIAL_HIDDEN` ``(32, 48, 64)``.
    * ``num_layers``: gated residual blocks per coupling net (default 3; 0 allowed).
    * ``dequantization``: ``"variational"`` or ``"uniform"``; default ``"uniform"`` for
      ``simple`` and ``"variational"`` for the others.
    """
    check_choice("kind", kind, TUTORIAL_KINDS)
    c, h, w = shape = check_image_shape("image_shape", image_shape)
    hidden = _check_hidden(hidden_channels)
    check_int("num_layers", num_layers, low=0)
    if dequantization is None:
        dequantization = "uniform" if kind == "simple" else "variational"
    check_choice("dequantization", dequantization, TUTORIAL_DEQUANTIZATIONS)
    context_encoder, e = label_embedding(num_classes, label_channels)

    def model(deq, flow) -> ImageFlow:
        return ImageFlow(deq, flow, shape, num_classes=num_classes, context_encoder=context_encoder)

    if dequantization == "uniform":
        deq = Dequantization(num_levels=num_levels)
    else:
        deq = _variational_dequantization(c, h, w, num_levels)

    if kind in ("simple", "vardeq"):
        couplings = _checkerboard_couplings(8, c, h, w, hidden[0], e, num_layers)
        return model(deq, CompositeTransform(couplings))

    if h % 4 or w % 4:
        raise ValueError(
            f"image_shape: the multiscale flow squeezes twice, so height and width must be divisible "
            f"by 4; got {h}x{w} (pad the images to {h + (-h) % 4}x{w + (-w) % 4})"
        )
    flow = MultiscaleCompositeTransform(2)
    level1 = CompositeTransform(
        _checkerboard_couplings(2, c, h, w, hidden[0], e, num_layers)
        + [SqueezeTransform()]
        + _channel_couplings(2, 4 * c, hidden[1], e, num_layers)
    )
    flow.add_transform(level1, (4 * c, h // 2, w // 2))
    level2 = CompositeTransform([SqueezeTransform()] + _channel_couplings(4, 8 * c, hidden[2], e, num_layers))
    flow.add_transform(level2, (8 * c, h // 4, w // 4))
    return model(deq, flow)
