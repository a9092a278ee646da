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

from flowkit.validation import check_float_tensor, check_image_batch

__all__ = ["Context", "TransformResult", "check_float_tensor", "check_image_batch", "sum_except_batch"]

#: What every ``forward`` and ``inverse`` returns: ``(outputs, logabsdet)`` with ``logabsdet`` of shape ``[batch]``.
TransformResult = tuple[torch.Tensor, torch.Tensor]

#: The optional conditioning input of a transform (nflows' ``context`` argument).
Context = torch.Tensor | None


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the first: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
