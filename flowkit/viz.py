"""Pictures: image grids and curves written as PNG files (matplotlib loaded on use)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["image_grid", "save_image_grid", "save_curves", "atomic_savefig"]


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


def atomic_savefig(fig, path: str | os.PathLike, close: bool = True, **kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically (temp file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    num_levels: int,
    nrow: int | None = None,
    title: str | None = None,
    scale: float = 0.35,
) -> Path:
    """Write integer images ``[N, C, H, W]`` as a PNG grid; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, num_levels, nrow)
    h, w = grid.shape[:2]
    fig = plt.figure(figsize=(max(2.0, w * scale / 8), max(2.0, h * scale / 8) + (0.4 if title else 0)))
    ax = fig.add_axes([0, 0, 1, 1 if not title else 0.9])
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return atomic_savefig(fig, path, dpi=100)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ys = list(ys)
        xs = list(x) if x is not None and len(x) == len(ys) else list(range(1, len(ys) + 1))
        ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)
