"""Pictures: image grids and curves written as PNG files.

matplotlib is loaded on use, and figures are ``matplotlib.figure.Figure`` objects made
without pyplot (:func:`new_figure`): flowkit never switches the global backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from flowkit.io import atomic_write_bytes

__all__ = ["DPI", "atomic_savefig", "image_grid", "new_figure", "save_curves", "save_image_grid"]

#: resolution of every picture flowkit writes (figure sizes are whole pixels at this dpi)
DPI = 100


def image_grid(images: torch.Tensor, num_levels: int, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Arrange integer images ``[N, C, H, W]`` (C = 1 or 3) into one float array in [0, 1].

    Returns ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]``; padding is mid-grey.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images: expected a tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {c}")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol_rows = int(math.ceil(n / nrow))
    imgs = images.detach().to("cpu", torch.float64).numpy() / max(num_levels - 1, 1)
    grid = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 0.5)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = imgs[k].transpose(1, 2, 0)
    return np.clip(grid, 0.0, 1.0)


def new_figure(width_in: float, height_in: float, layout: Literal["constrained", "compressed", "tight"] | None = None):
    """A ``matplotlib.figure.Figure`` of the given size in inches, outside pyplot.

    flowkit never switches matplotlib's global backend or touches pyplot's figure list: a
    notebook user's inline plots keep working, and nothing needs closing. ``layout`` is
    matplotlib's layout engine (e.g. ``"constrained"``; ``None``: none).
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout=layout)


def atomic_savefig(fig, path: str | os.PathLike, close: bool = True, **kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically (:func:`flowkit.io.atomic_write_bytes`).

    ``kwargs`` go to ``savefig`` (the format follows the file's suffix).  ``close`` closes the
    figure when pyplot manages it (a figure made with :func:`new_figure` needs no closing).
    """
    import io
    import sys

    path = Path(path)
    buffer = io.BytesIO()
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    fig.savefig(buffer, **kwargs)
    atomic_write_bytes(path, buffer.getvalue())
    pyplot = sys.modules.get("matplotlib.pyplot")
    if close and pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
        pyplot.close(fig)
    return path


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    num_levels: int,
    nrow: int | None = None,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
    zoom: int | None = None,
) -> Path:
    """Write integer images ``[N, C, H, W]`` as a PNG grid with ``nrow`` columns; returns the path.

    Optional labels left of each row and a title above.  Size in pixels:
    ``(label + zoom * grid_w) x (title + zoom * grid_h)``, where ``label`` is 60 px with row
    labels (else 0), ``title`` 24 px with a title (else 0), ``grid_w = nrow * (W + 1) + 1``
    (see :func:`image_grid`) and ``zoom`` defaults to about 48 px per image side.
    """
    grid = image_grid(images, num_levels, nrow)
    gh, gw = grid.shape[:2]
    if zoom is None:
        zoom = max(1, 48 // max(images.shape[-2:]))
    label_px = 60 if row_labels else 0
    title_px = 24 if title else 0
    width, height = label_px + zoom * gw, title_px + zoom * gh
    fig = new_figure(width / DPI, height / DPI)
    ax = fig.add_axes((label_px / width, 0, zoom * gw / width, zoom * gh / height))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if row_labels:
        h = images.shape[-2]
        ax.set_yticks([1 + r * (h + 1) + (h - 1) / 2 for r in range(len(row_labels))])
        ax.set_yticklabels(list(row_labels), fontsize=7)
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    if title:
        fig.text(0.5, 1 - (title_px / 2) / height, title, ha="center", va="center", fontsize=8)
    return atomic_savefig(fig, path, dpi=DPI)


def save_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str = "epoch",
    ylabel: str = "bits/dim",
    title: str | None = None,
    x: Sequence[float] | None = None,
    logy: bool = False,
) -> Path:
    """Plot named curves on one axis and write a PNG; returns the path."""
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ys = list(ys)
        xs = list(x) if x is not None and len(x) == len(ys) else list(range(1, len(ys) + 1))
        ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, label=name)
    if x is None or all(float(v).is_integer() for v in x):  # epochs, steps: no fractional ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=DPI)
