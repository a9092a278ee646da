"""Bits/dim of a model on a data set, and the independent-pixel baseline."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from flowkit.models import ImageFlow
from flowkit.validation import check_image_batch, check_int

__all__ = ["bpd_sum", "evaluate", "evaluate_bpd", "independent_pixel_bpd"]


def _images_and_labels(model: ImageFlow, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels)`` of a batch; the labels only for a conditional model, which needs them."""
    if not model.is_conditional:
        return (batch[0] if isinstance(batch, (tuple, list)) else batch), None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"loader: the model is conditional on {model.num_classes} classes, so its batches must be "
            f"(images, labels); got a {type(batch).__name__}"
        )
    return batch[0], batch[1]


@torch.no_grad()
def bpd_sum(
    model: ImageFlow,
    loader: Iterable,
    importance_samples: int = 1,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    validate: bool = True,
) -> tuple[torch.Tensor, int]:
    """``(sum of per-image bpd, number of images)`` over ``loader`` (see :func:`evaluate_bpd`).

    The sum stays on the model's device (float64) until the caller reads it: one host
    synchronisation per evaluation, not per batch.  ``validate=False`` skips the pixel-value
    check for data validated when it was loaded.
    """
    from tqdm.auto import tqdm

    check_int("importance_samples", importance_samples, low=1)
    was_training = model.training
    model.eval()
    total, count = None, 0
    try:
        for i, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress)):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _images_and_labels(model, batch)
            labels = {} if y is None else {"y": y}  # an unconditional model is called as before: bpd(x, ...)
            if importance_samples > 1:
                bpd = model.bpd_importance(x, num_samples=importance_samples, validate=validate, **labels)
            else:
                bpd = model.bpd(x, validate=validate, **labels)
            batch_sum = bpd.double().sum()
            total = batch_sum if total is None else total + batch_sum
            count += x.shape[0]
    finally:
        model.train(was_training)
    return (torch.zeros((), dtype=torch.float64) if total is None else total), count


def evaluate_bpd(
    model: ImageFlow,
    loader: Iterable,
    importance_samples: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """Mean bits/dim of ``model`` over ``loader`` (batches of integer images, or ``(images, labels)``).

    A class-conditional model is evaluated given each image's label (``log p(x | y)``; its
    batches must be ``(images, labels)``).

    ``importance_samples = M > 1`` uses the importance-weighted bound
    ``-log2((1/M) sum_m p(x + u_m) / q(u_m | x)) / D`` (the tutorial's test metric); ``M = 1``
    the one-sample variational bound.  The model's train/eval mode is restored afterwards.

    Raises:
        ValueError: ``importance_samples < 1``, or ``loader`` has no batches.
    """
    total, count = bpd_sum(model, loader, importance_samples, max_batches, progress, desc)
    if count == 0:
        raise ValueError("loader: no batches to evaluate")
    return float(total) / count


def evaluate(*args: Any, **kwargs: Any) -> float:
    """Deprecated name of :func:`evaluate_bpd` (kept for one release; ``flowkit.toy2d`` has an
    ``evaluate`` of its own that returns fit metrics, hence the clearer name)."""
    warnings.warn(
        "flowkit.training.evaluate is deprecated; use flowkit.training.evaluate_bpd (same arguments)",
        DeprecationWarning,
        stacklevel=2,
    )
    return evaluate_bpd(*args, **kwargs)


def independent_pixel_bpd(train_images: torch.Tensor, test_images: torch.Tensor, num_levels: int) -> float:
    """Bits/dim of the independent-pixel baseline: a categorical histogram per pixel.

    ``p_d(k) = (count_d(k) + 1) / (N + K)`` estimated on ``train_images`` (add-one
    smoothing), evaluated as ``-mean log2 p_d(x_d)`` on ``test_images`` (both ``[N, C, H, W]``
    integers in ``[0, K)``).  A flow that learns anything about pixel dependencies beats it.

    Example:
        >>> x = torch.tensor([[[[0, 1]]], [[[0, 0]]]])
        >>> round(independent_pixel_bpd(x, x, 2), 4)
        0.7075
    """
    check_image_batch(train_images, "train_images", num_levels)
    check_image_batch(test_images, "test_images", num_levels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"test_images: shape {tuple(test_images.shape[1:])} differs from train_images' {tuple(train_images.shape[1:])}"
        )
    train = train_images.reshape(train_images.shape[0], -1).long()
    test = test_images.reshape(test_images.shape[0], -1).long()
    counts = torch.zeros(train.shape[1], num_levels, dtype=torch.float64)
    counts.scatter_add_(1, train.t(), torch.ones(train.t().shape, dtype=torch.float64))
    log2p = torch.log2((counts + 1.0) / (train.shape[0] + num_levels))
    return float(-log2p.gather(1, test.t()).mean())
