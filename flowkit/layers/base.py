"""The one contract every flowkit layer follows.

A flowkit layer is an :class:`nflows.transforms.Transform`:

* ``forward(x, context=None) -> (z, logabsdet)`` maps **data -> latent**;
* ``inverse(z, context=None) -> (x, logabsdet)`` maps **latent -> data**;
* ``logabsdet`` has shape ``[batch]``: ``log |det dz/dx|`` for ``forward`` and
  ``log |det dx/dz|`` for ``inverse``, so at matching points the two add up to 0;
* no ``reverse=`` flag, no in-place update of a caller's log-det, no global device:
  accumulators are born from the input (``x.new_zeros(x.shape[0])``) and a layer takes
  its device and dtype from its input or its own parameters/buffers.

Stochastic layers (dequantization) map integer data to a continuous latent through noise
``r ~ U[0, 1)^D``.  With the noise fixed they are a deterministic bijection ``r -> z`` for a
given ``x``; they expose ``forward_with_noise(x, noise)`` so that
:func:`flowkit.check_transform` can verify them like any other layer.

The density of data ``x`` under a flow ``f`` with base ``p_z`` is
``log p(x) = log p_z(f(x)) + logabsdet`` (change of variables; Dinh et al., 2017).
normflows runs the other way (its ``Flow.forward`` maps latent -> data); only
:mod:`flowkit.bridge` knows that.
"""

from __future__ import annotations

import torch

__all__ = ["sum_except_batch", "check_image_batch", "check_float_tensor"]


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the first: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def check_float_tensor(x, name: str, dim: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a floating tensor of rank ``dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(
            f"{name}: expected a {dim}-D tensor, got shape {tuple(x.shape)}"
            + (" ([batch, channels, height, width] expected)" if dim == 4 else "")
        )


def check_image_batch(x, name: str, num_levels: int) -> None:
    """Validate integer images ``[B, C, H, W]`` with values in ``[0, num_levels)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer images, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected integer images (uint8/int32/int64 with values in "
            f"[0, {num_levels})), got dtype {x.dtype}; convert with (x * {num_levels - 1}).round().long() "
            "if your images are floats in [0, 1]"
        )
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected integer images of shape [batch, channels, height, width], got shape {tuple(x.shape)}"
        )
    if x.numel() > 0:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= num_levels:
            raise ValueError(
                f"{name}: values must lie in [0, {num_levels}) for num_levels={num_levels}, got min {lo} and max {hi}"
            )
