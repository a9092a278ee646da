"""``ImageFlow``: dequantization + a flow + a standard-normal base, for integer images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nflows.transforms import MultiscaleCompositeTransform, Transform
from torch import nn

from flowkit.layers.base import check_image_batch
from flowkit.layers.dequantization import Dequantization

__all__ = ["ImageFlow", "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``sum log N(z; 0, I)`` over all but the batch dimension."""
    return -0.5 * (z.reshape(z.shape[0], -1).pow(2).sum(dim=1) + z[0].numel() * _LOG_2PI)


class ImageFlow(nn.Module):
    """A normalizing flow for integer images.

    ``x`` (ints in ``[0, num_levels)``) -> ``dequantization`` -> ``flow`` -> ``z ~ N(0, I)``.
    ``log_prob(x) = log N(z) + logabsdet`` is the (one-sample, variational) lower bound on
    ``log P(x)`` in nats; ``bpd`` converts it to bits per dimension.

    Padding.  With ``pad_to=(H', W')`` the images are padded (centred) with the constant
    ``pad_value`` to ``(C, H', W')`` *before* dequantization, so that e.g. a Glow can squeeze
    28x28 MNIST three times at 32x32; ``dequantization`` and ``flow`` then work at the padded
    size, and ``decode``/``sample``/``interpolate`` crop back to ``image_shape``.  The padding
    pixels are modelled as part of the image, so ``log_prob(x)`` is
    ``log P(x, pad) <= log P(x)`` (the padded image carries no more information than ``x``;
    a code for the padded image is a code for ``x``): a valid, slightly looser bound on the
    original image.  ``bpd`` divides it by the **original** dimensions
    ``num_dims = C*H*W`` (not ``model_dims = C*H'*W'``), so it is an honest bits-per-pixel
    figure comparable with unpadded models; dividing by ``model_dims`` would make the cheap
    constant border look like compression of the image.

    Args:
        dequantization: a :class:`~flowkit.layers.Dequantization` (or the variational one),
            built for the padded shape.
        flow: nflows Transform from logits to latents (data -> latent direction), built for
            the padded shape.
        image_shape: ``(C, H, W)`` of the images the user passes and gets back.
        latent_shape: shape of one latent as ``flow`` outputs it (``(C*H'*W',)`` for nflows'
            flattening ``MultiscaleCompositeTransform``); default: derived from ``flow``.
        pad_to: ``(H', W')`` with ``H' >= H`` and ``W' >= W``, or ``None`` for no padding.
        pad_value: the integer level used for the padding pixels (default 0, the background
            of MNIST-like data).
    """

    def __init__(
        self,
        dequantization: Dequantization,
        flow: Transform,
        image_shape: Sequence[int],
        latent_shape: Sequence[int] | None = None,
        pad_to: Sequence[int] | None = None,
        pad_value: int = 0,
    ):
        super().__init__()
        if not isinstance(dequantization, Dequantization):
            raise TypeError(f"dequantization: expected a flowkit Dequantization, got {type(dequantization).__name__}")
        if not isinstance(flow, Transform):
            raise TypeError(f"flow: expected an nflows Transform, got {type(flow).__name__}")
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape: expected (channels, height, width), got {image_shape}")
        self.dequantization = dequantization
        self.flow = flow
        self.image_shape = image_shape
        self.num_levels = dequantization.num_levels
        self.padded_shape, self.padding = _padding(image_shape, pad_to)
        if not isinstance(pad_value, int) or not 0 <= pad_value < self.num_levels:
            raise ValueError(f"pad_value: expected an int level in [0, {self.num_levels}), got {pad_value!r}")
        self.pad_value = pad_value
        #: dimensions bpd is divided by: the original image's C*H*W
        self.num_dims = math.prod(image_shape)
        #: dimensions the flow models: C*H'*W' of the padded image (== num_dims without padding)
        self.model_dims = math.prod(self.padded_shape)
        if latent_shape is None:
            latent_shape = (self.model_dims,) if isinstance(flow, MultiscaleCompositeTransform) else self.padded_shape
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if math.prod(self.latent_shape) != self.model_dims:
            raise ValueError(f"latent_shape: {self.latent_shape} does not hold {self.model_dims} dimensions")

    # -- where the model lives ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.dequantization._dtype_ref.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dequantization.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def level_shapes(self) -> list[tuple[int, ...]]:
        """Per-level latent shapes of a multiscale flow (early split-offs first, final last)."""
        if isinstance(self.flow, MultiscaleCompositeTransform):
            return [tuple(s) for s in self.flow._output_shapes]
        return [self.latent_shape]

    def _check_images(self, x: torch.Tensor, name: str = "x", validate: bool = True) -> torch.Tensor:
        """The model's boundary: the one place a user batch is validated (layers further in trust it)."""
        check_image_batch(x, name, self.num_levels, check_values=validate)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name}: expected images of shape [batch, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one image, got an empty batch of shape {tuple(x.shape)}")
        return x.to(self.device)

    # -- padding ----------------------------------------------------------------------
    @property
    def is_padded(self) -> bool:
        return self.padded_shape != self.image_shape

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> ``[B, C, H', W']`` with the constant ``pad_value`` border."""
        if not self.is_padded:
            return x
        return F.pad(x, self.padding, mode="constant", value=self.pad_value)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad`: ``[B, C, H', W'] -> [B, C, H, W]``."""
        if not self.is_padded:
            return x
        left, _, top, _ = self.padding
        _, h, w = self.image_shape
        return x[..., top : top + h, left : left + w]

    # -- density ----------------------------------------------------------------------
    def encode_with_logdet(self, x: torch.Tensor, *, validate: bool = True):
        """``(z, logabsdet)``: latents (shaped as ``latent_shape``) of integer images.

        The batch is validated here, once (no layer further in reads the data back);
        ``validate=False`` skips the check of the pixel values (a device synchronisation) for
        data that was validated already (the trainer validates a data set once when it loads it).
        """
        return self._encode_valid(self._check_images(x, validate=validate))

    def _encode_valid(self, x: torch.Tensor):
        """:meth:`encode_with_logdet` of a batch that passed :meth:`_check_images`."""
        h, ladj = self.dequantization.forward_unchecked(self.pad(x))
        z, ladj_flow = self.flow(h)
        return z, ladj + ladj_flow

    def log_prob(self, x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Lower bound on ``log P(x)`` in nats, shape ``[batch]`` (``validate``: see :meth:`encode_with_logdet`)."""
        log_prob_of_valid = self.__dict__.get("_compiled_log_prob", _log_prob_of_valid_images)
        return log_prob_of_valid(self, self._check_images(x, validate=validate))

    def compile(self, *args, **kwargs) -> None:
        """Compile the density path with ``torch.compile``, in place (arguments go to ``torch.compile``).

        :meth:`log_prob`, :meth:`bpd` and :meth:`bpd_importance` then run dequantization, flow
        and base density (forward and backward) as compiled code; the batch is still validated
        eagerly at the boundary before it.  Call :meth:`initialize` first (ActNorm's
        data-dependent initialisation reads the data, which would split the graph).  Sampling
        and :meth:`encode`/:meth:`decode` stay eager.  Meant for a GPU; on a CPU it does not pay
        (``tutorial_flow("multiscale")``, 1 thread: about 10 minutes to compile, then a training
        step 13-18% *slower* than eager; ``benchmarks/bench_image.py --compile``), so it is
        never done by default.
        """
        self._compiled_log_prob = torch.compile(_log_prob_of_valid_images, *args, **kwargs)

    def nats_to_bpd(self, log_prob: torch.Tensor) -> torch.Tensor:
        """``-log_prob / (num_dims log 2)``; ``num_dims`` is the original (unpadded) C*H*W."""
        return -log_prob / (self.num_dims * math.log(2.0))

    def bpd(self, x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Bits per dimension, ``-log_prob(x) / (D log 2)``, shape ``[batch]``.

        ``D = num_dims`` is the original image's size; with padding the border's cost stays
        in ``log_prob`` (see the class docstring), so the figure is an upper bound per
        original pixel.
        """
        return self.nats_to_bpd(self.log_prob(x, validate=validate))

    def bpd_importance(self, x: torch.Tensor, num_samples: int = 8, *, validate: bool = True) -> torch.Tensor:
        """Importance-sampled bits/dim: ``log (1/M) sum_m p(x + u_m) / q(u_m | x)``.

        A tighter bound than :meth:`bpd` (Burda et al., 2016; the tutorial's test metric).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        self._check_images(x, validate=validate)
        lls = torch.stack([self.log_prob(x, validate=False) for _ in range(num_samples)], dim=-1)
        return self.nats_to_bpd(torch.logsumexp(lls, dim=-1) - math.log(num_samples))

    # -- latents and samples ----------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of integer images (stochastic through the dequantization noise)."""
        return self.encode_with_logdet(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Integer images (``torch.long``, ``[batch, *image_shape]``, cropped back to the
        original size when padded) from latents shaped ``[batch, *latent_shape]``."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"z: expected a floating-point tensor, got {type(z).__name__}")
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"z: expected shape [batch, {', '.join(map(str, self.latent_shape))}], got {tuple(z.shape)}"
            )
        h, _ = self.flow.inverse(z.to(device=self.device, dtype=self.dtype))
        x, _ = self.dequantization.inverse(h)
        return self.crop(x)

    def sample_latents(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``z ~ N(0, temperature^2 I)``, shape ``[n, *latent_shape]``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive float, got {temperature!r}")
        z = torch.randn((n, *self.latent_shape), dtype=self.dtype, device=self.device, generator=generator)
        return z * temperature

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` integer images ``[n, C, H, W]`` drawn at the given temperature."""
        return self.decode(self.sample_latents(n, temperature, generator))

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images decoded along the straight line between the latents of ``x1`` and ``x2``.

        ``x1``, ``x2``: single integer images ``[C, H, W]`` (or ``[1, C, H, W]``).
        Returns ``[steps, C, H, W]``; the ends reproduce ``x1`` and ``x2`` exactly.
        """
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps: expected an int >= 2, got {steps!r}")
        pair = []
        for name, img in (("x1", x1), ("x2", x2)):
            if isinstance(img, torch.Tensor) and img.dim() == 3:
                img = img.unsqueeze(0)
            if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[0] != 1:
                raise ValueError(
                    f"{name}: expected one image [C, H, W] or [1, C, H, W], got {getattr(img, 'shape', img)}"
                )
            pair.append(img)
        z = self.encode(torch.cat(pair))
        w = torch.linspace(0, 1, steps, dtype=z.dtype, device=z.device).view(-1, *[1] * (z.dim() - 1))
        return self.decode(z[:1] * (1 - w) + z[1:] * w)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Run one forward pass in training mode on a real batch (ActNorm's data-dependent init)."""
        was_training = self.training
        self.train()
        _log_prob_of_valid_images(self, self._check_images(x))  # eager, also after compile()
        self.train(was_training)


def _log_prob_of_valid_images(model: ImageFlow, x: torch.Tensor) -> torch.Tensor:
    """``log N(z) + logabsdet`` of a validated batch: what :meth:`ImageFlow.compile` compiles."""
    z, logabsdet = model._encode_valid(x)
    return standard_normal_log_prob(z) + logabsdet


def _padding(image_shape: tuple[int, int, int], pad_to) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """``(padded_shape, (left, right, top, bottom))`` centring the image in ``pad_to``."""
    c, h, w = image_shape
    if pad_to is None:
        return image_shape, (0, 0, 0, 0)
    if (
        isinstance(pad_to, (str, bytes))
        or not hasattr(pad_to, "__len__")
        or len(pad_to) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in pad_to)
    ):
        raise ValueError(f"pad_to: expected (height, width) as two ints, got {pad_to!r}")
    ph, pw = pad_to
    if ph < h or pw < w:
        raise ValueError(
            f"pad_to: {ph}x{pw} is smaller than the images ({h}x{w}); expected height >= {h} and width >= {w}"
        )
    top, left = (ph - h) // 2, (pw - w) // 2
    return (c, ph, pw), (left, pw - w - left, top, ph - h - top)
