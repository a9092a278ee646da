"""Glow (Kingma & Dhariwal, 2018) from nflows' parts, with the tutorial's dequantization.

``x`` (integers) -> [pad] -> dequantization -> L levels of
``squeeze -> K x [ActNorm, OneByOneConvolution (LU), coupling(GatedConvNet)] -> split``
-> ``z ~ N(0, I)``; the levels are assembled with nflows' ``MultiscaleCompositeTransform``
(half of the channels leave for the prior after every level but the last).

Shapes are planned and validated before any layer is built: a squeeze needs even height
and width at every level, so ``glow((1, 28, 28), num_scales=3)`` fails at construction with a
message naming level 3, its ``4x7x7`` input, and the fixes (``num_scales<=2`` or
``pad_to=(32, 32)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from nflows.transforms import (
    ActNorm,
    AdditiveCouplingTransform,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
    Transform,
)

from flowkit._deprecation import renamed_arguments
from flowkit.layers import ClampedAffineCoupling, Dequantization, MemorySavingComposite, gated_conv_net
from flowkit.models.image_flow import ImageFlow, _padding, label_embedding
from flowkit.models.tutorial import _variational_dequantization
from flowkit.validation import check_bool, check_choice, check_image_shape, check_int

__all__ = [
    "COUPLINGS",
    "DEQUANTIZATIONS",
    "ClampedAffineCoupling",
    "GlowLevelPlan",
    "glow",
    "glow_coupling",
    "glow_step",
    "plan_glow_levels",
]

COUPLINGS = ("affine", "additive", "clamped-affine")
DEQUANTIZATIONS = ("variational", "uniform")


_COUPLING_CLASSES = {
    "affine": AffineCouplingTransform,
    "additive": AdditiveCouplingTransform,
    "clamped-affine": ClampedAffineCoupling,
}


def _alternating_mask(num_channels: int, index: int) -> list[int]:
    """nflows mask: step 0 transforms the second half of the channels, step 1 the first, ..."""
    half = num_channels // 2
    second = [1 if j >= half else -1 for j in range(num_channels)]
    return second if index % 2 == 0 else [-m for m in second]


def glow_coupling(
    num_channels: int,
    index: int = 0,
    hidden_channels: int = 64,
    num_layers: int = 2,
    coupling: str = "affine",
    context_channels: int = 0,
) -> Transform:
    """One coupling of a Glow step on ``num_channels`` channels, conditioned through a
    :class:`~flowkit.layers.GatedConvNet` (zero-initialised last conv).

    ``index`` picks the half that is transformed (alternates between steps).
    ``context_channels``: channels of the coupling's ``context`` (e.g. a label embedding
    ``[B, E]``, broadcast over the image), 0 for none.
    ``coupling``: ``"affine"`` (nflows ``AffineCouplingTransform``, Glow's
    ``z_b = x_b * (sigmoid(h + 2) + 1e-3) + t``), ``"additive"`` (nflows
    ``AdditiveCouplingTransform``, ``z_b = x_b + t``, volume preserving) or
    ``"clamped-affine"`` (:class:`ClampedAffineCoupling`).
    """
    if coupling not in _COUPLING_CLASSES:
        raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
    if not isinstance(num_channels, int) or num_channels < 2:
        raise ValueError(f"num_channels: a coupling splits channels, so at least 2 are needed; got {num_channels!r}")
    return _COUPLING_CLASSES[coupling](
        _alternating_mask(num_channels, index), gated_conv_net(hidden_channels, num_layers, context_channels)
    )


def glow_step(
    num_channels: int,
    index: int = 0,
    hidden_channels: int = 64,
    num_layers: int = 2,
    coupling: str = "affine",
    context_channels: int = 0,
) -> CompositeTransform:
    """One step of flow: ``ActNorm -> OneByOneConvolution (LU) -> coupling`` (nflows parts)."""
    return CompositeTransform(
        [
            ActNorm(num_channels),
            OneByOneConvolution(num_channels),
            glow_coupling(num_channels, index, hidden_channels, num_layers, coupling, context_channels),
        ]
    )


class GlowLevelPlan(NamedTuple):
    """Shapes of one Glow level (``level`` is 1-based); ``output_shape`` is what goes on to
    the next level after the split (``None`` for the last level, which does not split)."""

    level: int
    input_shape: tuple[int, int, int]
    squeezed_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int] | None


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)


def _two_adic(n: int) -> int:
    k = 0
    while n % 2 == 0 and n > 0:
        n //= 2
        k += 1
    return k


def plan_glow_levels(
    image_shape: Sequence[int], num_scales: int, original_shape: Sequence[int] | None = None
) -> list[GlowLevelPlan]:
    """Shapes of every Glow level for (already padded) ``image_shape``, or a ``ValueError``.

    Each level squeezes ``(C, H, W) -> (4C, H/2, W/2)``; all but the last then split off half
    the channels: ``-> (2C, H/2, W/2)``.  ``original_shape`` (before padding) is used to
    suggest a ``pad_to`` in the error message.

    Example:
        >>> [p.squeezed_shape for p in plan_glow_levels((1, 8, 8), 3)]
        [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    """
    c, h, w = (int(s) for s in image_shape)
    _, oh, ow = (int(s) for s in (original_shape or image_shape))
    max_levels = min(_two_adic(h), _two_adic(w))
    plans = []
    for level in range(1, num_scales + 1):
        if h % 2 or w % 2:
            odd = " and ".join(sorted({str(s) for s in (h, w) if s % 2}))
            step = 2**num_scales
            pad = (math.ceil(oh / step) * step, math.ceil(ow / step) * step)
            fixes = ([f"num_scales<={max_levels}"] if max_levels >= 1 else []) + [f"pad_to={pad}"]
            raise ValueError(
                f"glow: level {level} cannot squeeze {_fmt((c, h, w))} ({odd} is odd); use " + " or ".join(fixes)
            )
        squeezed = (4 * c, h // 2, w // 2)
        out = (squeezed[0] // 2, squeezed[1], squeezed[2]) if level < num_scales else None
        plans.append(GlowLevelPlan(level, (c, h, w), squeezed, out))
        if out is not None:
            c, h, w = out
    return plans


@renamed_arguments(levels="num_scales", steps_per_level="steps_per_scale")
def glow(
    image_shape: Sequence[int],
    num_scales: int = 3,
    steps_per_scale: int = 8,
    hidden_channels: int = 64,
    num_layers: int = 2,
    dequantization: str = "variational",
    num_levels: int = 256,
    coupling: str = "affine",
    pad_to: Sequence[int] | None = None,
    pad_value: int = 0,
    memory_saving: bool = False,
    num_classes: int | None = None,
    label_channels: int | None = None,
) -> ImageFlow:
    """A Glow for integer images, as an :class:`ImageFlow`.

    Per level (scale): ``SqueezeTransform -> steps_per_scale x [ActNorm, OneByOneConvolution (LU),
    coupling with a GatedConvNet] -> split`` (nflows parts, assembled with nflows'
    ``MultiscaleCompositeTransform``, so latents come out flattened; ``model.level_shapes``
    lists each level's latent shape).  ``log p(x) = log N(z) + log|det dz/dx|``.

    Args:
        image_shape: ``(C, H, W)`` of the data.
        num_scales: number of squeeze/steps/split levels (scales) ``L``; H and W (after padding) must be
            divisible by ``2**L``.
        steps_per_scale: ``K``, steps of flow per level.
        levels, steps_per_level: deprecated names of ``num_scales`` and ``steps_per_scale``
            (they read like ``num_levels``, the quantisation levels); they still work, with a
            ``DeprecationWarning``.
        hidden_channels: width of each coupling's GatedConvNet.
        num_layers: gated residual blocks per GatedConvNet.
        dequantization: ``"variational"`` (the tutorial's: 4 conditional checkerboard
            couplings, 16 hidden) or ``"uniform"``.
        num_levels: discrete values per pixel (256 for 8-bit images, 17 for sklearn digits).
        coupling: ``"affine"`` (nflows, Glow's sigmoid scale), ``"additive"`` (nflows) or
            ``"clamped-affine"`` (:class:`ClampedAffineCoupling`, identity at init).
        pad_to: ``(H', W')`` to pad images to (centred, constant ``pad_value``) before
            dequantization so that every squeeze sees even sides; ``sample``/``decode``
            crop back, and ``bpd`` is divided by the *original* ``C*H*W`` (see
            :class:`ImageFlow`).
        pad_value: the level the padding pixels take.
        memory_saving: wrap each level's K steps in
            :class:`flowkit.layers.memory_saving.MemorySavingComposite` (recomputes
            activations in the backward pass instead of storing them).
        num_classes: ``K`` for a class-conditional Glow (``log p(x | y)``, ``sample(n, T,
            y=3)``): Glow's class-conditional prior (:class:`~flowkit.layers.ClassConditionalPrior`,
            a per-class mean and log-scale of every level's latent) and a label embedding given
            to every coupling net; ``None``: unconditional.
        label_channels: channels of that label embedding (``nn.Embedding(K, E)``, broadcast over
            the image as extra input channels of each GatedConvNet); default
            :data:`~flowkit.models.image_flow.DEFAULT_LABEL_CHANNELS`; 0 conditions the prior only.

    Returns:
        An :class:`ImageFlow`; call ``model.initialize(batch)`` on real data before training
        (ActNorm's data-dependent initialisation).

    Raises:
        ValueError: for an impossible configuration, naming the level, its shape and a fix.

    Example:
        >>> import torch
        >>> model = glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8, num_levels=17)
        >>> model.level_shapes
        [(2, 4, 4), (8, 2, 2)]
        >>> model.sample(2).shape
        torch.Size([2, 1, 8, 8])
        >>> digits = glow((1, 8, 8), num_scales=2, steps_per_scale=1, hidden_channels=8, num_levels=17, num_classes=10)
        >>> digits.sample(4, temperature=0.7, y=3).shape          # four 3s
        torch.Size([4, 1, 8, 8])
    """
    shape = check_image_shape("image_shape", image_shape)
    check_int("num_scales", num_scales, 1)
    check_int("steps_per_scale", steps_per_scale, 1)
    check_int("hidden_channels", hidden_channels, 1)
    check_int("num_layers", num_layers, 0)
    check_int("num_levels", num_levels, 2)
    check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    check_choice("coupling", coupling, COUPLINGS)
    check_bool("memory_saving", memory_saving)
    padded_shape, _ = _padding(shape, pad_to)
    plans = plan_glow_levels(padded_shape, num_scales, original_shape=shape)
    context_encoder, context_channels = label_embedding(num_classes, label_channels)

    composite = CompositeTransform
    if memory_saving:
        composite = MemorySavingComposite

    flow = MultiscaleCompositeTransform(num_scales)
    for plan in plans:
        channels = plan.squeezed_shape[0]
        steps = composite(
            [
                glow_step(channels, i, hidden_channels, num_layers, coupling, context_channels)
                for i in range(steps_per_scale)
            ]
        )
        flow.add_transform(CompositeTransform([SqueezeTransform(), steps]), plan.squeezed_shape)

    c, h, w = padded_shape
    if dequantization == "variational":
        deq = _variational_dequantization(c, h, w, num_levels)
    else:
        deq = Dequantization(num_levels=num_levels)
    return ImageFlow(
        deq, flow, shape, pad_to=pad_to, pad_value=pad_value, num_classes=num_classes, context_encoder=context_encoder
    )
