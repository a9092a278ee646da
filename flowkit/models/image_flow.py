"""``ImageFlow``: dequantization + a flow + a standard-normal base, for integer images,
optionally conditioned on a class label."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nflows.transforms import MultiscaleCompositeTransform, Transform
from torch import nn

from flowkit.layers.base import check_image_batch
from flowkit.layers.conditional import ClassConditionalPrior
from flowkit.layers.dequantization import Dequantization
from flowkit.validation import check_image_shape, check_int, check_labels

__all__ = ["DEFAULT_LABEL_CHANNELS", "ImageFlow", "label_embedding", "standard_normal_log_prob"]

#: channels of the label embedding the built-in conditional models give their coupling nets
DEFAULT_LABEL_CHANNELS = 8

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

    Class-conditional models.  With ``num_classes=K`` the model is a density of ``x`` given a
    label ``y`` in ``[0, K)``: every density, latent and sampling method takes ``y`` (an integer
    tensor ``[batch]``, validated once here, at the boundary).  The label conditions

    * the ``prior``, a Transform from the flow's latent to ``N(0, I)`` called with
      ``context=y``: ``log p(x | y) = log N(prior(z, y)) + logabsdet``; by default a
      :class:`~flowkit.layers.ClassConditionalPrior` (a per-class mean and log-scale of every
      latent dimension, Glow's class-conditional prior, zero-initialised);
    * and, with a ``context_encoder`` (e.g. ``nn.Embedding(K, E)``), the ``flow``: it is called
      as ``flow(h, context=context_encoder(y))``, nflows' own context argument, which nflows'
      composites pass to every layer (couplings hand it to their nets, e.g. a
      :class:`~flowkit.layers.GatedConvNet` with ``context_channels=E``).

    Latents (:meth:`encode`, :meth:`decode`, :meth:`sample_latents`) are the base's standard
    normal ``u = prior(z, y)``, so ``decode(u, y)`` with one ``u`` and several labels draws the
    same "style" in each class.  An unconditional model given ``y``, or a conditional one
    without it, raises a ``TypeError`` saying so.

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
        num_classes: ``K`` for a class-conditional model, ``None`` (default) for an
            unconditional one.
        prior: conditional models: an nflows Transform from the flow's latent (shaped as
            ``latent_shape``) to the standard normal, called with ``context=y``; default
            ``ClassConditionalPrior(num_classes, latent_shape)`` (pass nflows'
            ``IdentityTransform()`` to leave the base unconditional).
        context_encoder: conditional models: a module mapping labels ``[B]`` to the
            ``context`` of ``flow``; ``None``: the flow gets no context.
    """

    def __init__(
        self,
        dequantization: Dequantization,
        flow: Transform,
        image_shape: Sequence[int],
        latent_shape: Sequence[int] | None = None,
        pad_to: Sequence[int] | None = None,
        pad_value: int = 0,
        *,
        num_classes: int | None = None,
        prior: Transform | None = None,
        context_encoder: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(dequantization, Dequantization):
            raise TypeError(f"dequantization: expected a flowkit Dequantization, got {type(dequantization).__name__}")
        if not isinstance(flow, Transform):
            raise TypeError(f"flow: expected an nflows Transform, got {type(flow).__name__}")
        image_shape = check_image_shape("image_shape", image_shape)
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
        self.num_classes, self.prior, self.context_encoder = _conditioning(
            num_classes, prior, context_encoder, self.latent_shape
        )

    # -- where the model lives ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.dequantization._dtype_ref.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dequantization.dtype

    @property
    def is_conditional(self) -> bool:
        """Whether the model is a density of images given a class label (built with ``num_classes``)."""
        return self.num_classes is not None

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

    def _check_labels(self, y, batch: int, validate: bool = True, name: str = "y") -> torch.Tensor | None:
        """The labels of a batch of ``batch`` images, checked against the model (the boundary, as
        :meth:`_check_images`): ``None`` for an unconditional model, else ``y`` on the device."""
        if self.num_classes is None:
            if y is not None:
                raise TypeError(
                    f"{name}: this model is unconditional (built without num_classes), so it takes no class labels; "
                    f"got {_describe(y)}"
                )
            return None
        if y is None:
            raise TypeError(
                f"{name}: this model is conditional on {self.num_classes} classes; pass the class labels {name}, "
                f"an integer tensor [{batch}] with values in [0, {self.num_classes})"
            )
        check_labels(y, name, self.num_classes, batch, check_values=validate)
        return y.to(self.device)

    def _flow_context(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """The ``context`` the flow gets for labels ``y``: ``context_encoder(y)``, or None."""
        return None if y is None or self.context_encoder is None else self.context_encoder(y)

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
    def encode_with_logdet(self, x: torch.Tensor, y: torch.Tensor | None = None, *, validate: bool = True):
        """``(z, logabsdet)``: latents (shaped as ``latent_shape``) of integer images (given
        their labels ``y`` for a conditional model).

        The batch is validated here, once (no layer further in reads the data back);
        ``validate=False`` skips the check of the pixel and label values (a device
        synchronisation each) for data that was validated already (the trainer validates a
        data set once when it loads it).
        """
        x = self._check_images(x, validate=validate)
        return self._encode_valid(x, self._check_labels(y, x.shape[0], validate))

    def _encode_valid(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """:meth:`encode_with_logdet` of a batch that passed :meth:`_check_images` (and labels
        that passed :meth:`_check_labels`)."""
        h, ladj = self.dequantization.forward_unchecked(self.pad(x))
        z, ladj_flow = self.flow(h, context=self._flow_context(y))
        ladj = ladj + ladj_flow
        if self.prior is None:
            return z, ladj
        u, ladj_prior = self.prior(z, context=y)
        return u, ladj + ladj_prior

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
        """Lower bound on ``log P(x)`` (``log P(x | y)`` for a conditional model) in nats, shape
        ``[batch]`` (``validate``: see :meth:`encode_with_logdet`)."""
        x = self._check_images(x, validate=validate)
        y = self._check_labels(y, x.shape[0], validate)
        log_prob_of_valid = self.__dict__.get("_compiled_log_prob", _log_prob_of_valid_images)
        return log_prob_of_valid(self, x, y)

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

    def bpd(self, x: torch.Tensor, y: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
        """Bits per dimension, ``-log_prob(x) / (D log 2)`` (given ``y`` for a conditional model), shape ``[batch]``.

        ``D = num_dims`` is the original image's size; with padding the border's cost stays
        in ``log_prob`` (see the class docstring), so the figure is an upper bound per
        original pixel.
        """
        return self.nats_to_bpd(self.log_prob(x, y, validate=validate))

    def bpd_importance(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 8, *, validate: bool = True
    ) -> torch.Tensor:
        """Importance-sampled bits/dim: ``log (1/M) sum_m p(x + u_m) / q(u_m | x)`` (given ``y``
        for a conditional model).

        A tighter bound than :meth:`bpd` (Burda et al., 2016; the tutorial's test metric).
        """
        if isinstance(y, int):
            raise TypeError(
                f"y: got the int {y!r} where the class labels go; the number of samples is a keyword "
                "argument: bpd_importance(x, num_samples=...)"
            )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        x = self._check_images(x, validate=validate)
        y = self._check_labels(y, x.shape[0], validate)
        lls = torch.stack([self.log_prob(x, y, validate=False) for _ in range(num_samples)], dim=-1)
        return self.nats_to_bpd(torch.logsumexp(lls, dim=-1) - math.log(num_samples))

    # -- latents and samples ----------------------------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents of integer images (stochastic through the dequantization noise)."""
        return self.encode_with_logdet(x, y)[0]

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Integer images (``torch.long``, ``[batch, *image_shape]``, cropped back to the
        original size when padded) from latents shaped ``[batch, *latent_shape]`` (of class
        ``y`` for a conditional model)."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"z: expected a floating-point tensor, got {type(z).__name__}")
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"z: expected shape [batch, {', '.join(map(str, self.latent_shape))}], got {tuple(z.shape)}"
            )
        y = self._check_labels(y, z.shape[0])
        z = z.to(device=self.device, dtype=self.dtype)
        if self.prior is not None:
            z, _ = self.prior.inverse(z, context=y)
        h, _ = self.flow.inverse(z, context=self._flow_context(y))
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

    def as_labels(self, y: int | torch.Tensor | None, n: int, name: str = "y") -> torch.Tensor | None:
        """``y`` as labels of ``n`` images: an int is one class for all ``n`` (a tensor is checked
        as it is); ``None`` stays ``None``.  For :meth:`sample` and :meth:`interpolate`."""
        if isinstance(y, int) and not isinstance(y, bool) and self.num_classes is not None:
            check_int(name, y, low=0, high=self.num_classes - 1)
            y = torch.full((n,), y, dtype=torch.long, device=self.device)
        return self._check_labels(y, n, name=name)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        y: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``n`` integer images ``[n, C, H, W]`` drawn at the given temperature.

        ``y`` (conditional models): the class of every image, a tensor ``[n]`` of labels or
        one int for all of them ("sample me a 3": ``model.sample(16, 0.7, y=3)``).
        """
        z = self.sample_latents(n, temperature, generator)
        return self.decode(z, self.as_labels(y, n))

    @torch.no_grad()
    def interpolate(
        self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8, *, y: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images decoded along the straight line between the latents of ``x1`` and ``x2``.

        ``x1``, ``x2``: single integer images ``[C, H, W]`` (or ``[1, C, H, W]``); ``y``
        (conditional models): their class, an int (or a one-element tensor), used to encode
        both and to decode the whole line.
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
        if isinstance(y, torch.Tensor) and y.numel() != 1:
            raise ValueError(f"y: expected one class for both images (an int), got a tensor of shape {tuple(y.shape)}")
        label = self.as_labels(y.reshape(1) if isinstance(y, torch.Tensor) else y, 1)
        z = self.encode(torch.cat(pair), None if label is None else label.expand(2))
        w = torch.linspace(0, 1, steps, dtype=z.dtype, device=z.device).view(-1, *[1] * (z.dim() - 1))
        return self.decode(z[:1] * (1 - w) + z[1:] * w, None if label is None else label.expand(steps))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Run one forward pass in training mode on a real batch (ActNorm's data-dependent init);
        ``y``: its labels, for a conditional model."""
        was_training = self.training
        self.train()
        x = self._check_images(x)
        _log_prob_of_valid_images(self, x, self._check_labels(y, x.shape[0]))  # eager, also after compile()
        self.train(was_training)


def _log_prob_of_valid_images(model: ImageFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``log N(u) + logabsdet`` of a validated batch (and labels): what :meth:`ImageFlow.compile` compiles."""
    u, logabsdet = model._encode_valid(x, y)
    return standard_normal_log_prob(u) + logabsdet


def _describe(value) -> str:
    """A short description of an argument for a message: a tensor's shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float)) else type(value).__name__


def _conditioning(num_classes, prior, context_encoder, latent_shape: tuple[int, ...]):
    """``(num_classes, prior, context_encoder)`` of an :class:`ImageFlow`, checked; the prior
    defaults to a :class:`ClassConditionalPrior` for a conditional model."""
    if num_classes is None:
        given = [name for name, part in (("prior", prior), ("context_encoder", context_encoder)) if part is not None]
        if given:
            raise ValueError(
                f"num_classes: {' and '.join(given)} condition on a class label, so the model needs num_classes=K "
                "(the number of classes); got num_classes=None"
            )
        return None, None, None
    num_classes = check_int("num_classes", num_classes, low=2)
    if prior is not None and not isinstance(prior, Transform):
        raise TypeError(f"prior: expected an nflows Transform (latent -> standard normal), got {type(prior).__name__}")
    if context_encoder is not None and not isinstance(context_encoder, nn.Module):
        raise TypeError(
            f"context_encoder: expected a torch.nn.Module (labels -> context), got {type(context_encoder).__name__}"
        )
    return num_classes, (ClassConditionalPrior(num_classes, latent_shape) if prior is None else prior), context_encoder


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


def label_embedding(num_classes: int | None, label_channels: int | None) -> tuple[nn.Embedding | None, int]:
    """``(context_encoder, context_channels)`` of a built-in model: an ``nn.Embedding`` of the
    labels into ``label_channels`` channels (``None``: :data:`DEFAULT_LABEL_CHANNELS`) for a
    conditional model, ``(None, 0)`` for an unconditional one or with ``label_channels=0``
    (only the prior is conditioned)."""
    if num_classes is None:
        if label_channels:
            raise ValueError(f"label_channels: {label_channels} needs a conditional model (num_classes=K)")
        return None, 0
    channels = DEFAULT_LABEL_CHANNELS if label_channels is None else check_int("label_channels", label_channels, low=0)
    return (nn.Embedding(check_int("num_classes", num_classes, low=2), channels), channels) if channels else (None, 0)
