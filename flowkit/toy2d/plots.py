"""Pictures of 2D fits as PNGs: target density, model density, loss curve, snapshots.

matplotlib is imported inside each function; files are written with
:func:`flowkit.viz.atomic_savefig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flowkit.toy2d.flows import is_invertible
from flowkit.toy2d.targets import Target2D, _grid_points, get_target

__all__ = [
    "target_density_grid",
    "model_density_grid",
    "plot_target",
    "plot_model",
    "plot_loss",
    "plot_snapshots",
    "save_fit_pictures",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def target_density_grid(target: Target2D | str, box=None, size: int = 200) -> np.ndarray:
    """``p(x) = p~(x) / Z`` on a ``size x size`` grid over ``box`` (default: the target's); ``[y, x]``."""
    target = get_target(target)
    box = box or target.box
    pts, _ = _grid_points(box, (size, size), torch.float64, target._anchor.device)
    lp = target.log_prob(pts).double() - target.log_z
    return lp.exp().reshape(size, size).T.cpu().numpy()


@torch.no_grad()
def model_density_grid(model, box, size: int = 200, num_samples: int = 200_000) -> tuple[np.ndarray, str]:
    """The model's density on a grid over ``box``: exact ``q(x)`` if the model inverts, else a
    normalised histogram of ``num_samples`` samples. Returns ``(density [y, x], "exact"|"histogram")``."""
    param = next(model.parameters())
    if is_invertible(model):
        pts, _ = _grid_points(box, (size, size), param.dtype, param.device)
        dens = torch.cat([model.log_prob(c) for c in pts.split(1 << 15)]).exp()
        return dens.reshape(size, size).T.float().cpu().numpy(), "exact"
    x = (
        torch.cat([model.sample(c)[0] for c in [1 << 16] * (num_samples >> 16) + [num_samples % (1 << 16)] if c])
        .float()
        .cpu()
        .numpy()
    )
    x0, x1, y0, y1 = box
    h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[y0, y1], [x0, x1]])
    area = (x1 - x0) * (y1 - y0) / size**2
    return h / (num_samples * area), "histogram"


def _imshow(ax, dens, box, title):
    ax.imshow(dens, origin="lower", extent=box, aspect="auto", cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_target(target: Target2D | str, path: str | os.PathLike, box=None, size: int = 200) -> Path:
    """PNG of the normalised target density."""
    from flowkit.viz import atomic_savefig

    target = get_target(target)
    box = box or target.box
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    _imshow(ax, target_density_grid(target, box, size), box, f"target {target.name}")
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)


def plot_model(model, target: Target2D | str, path: str | os.PathLike, box=None, size: int = 200) -> Path:
    """PNG of the target density next to the model's (exact ``q`` or a sample histogram)."""
    from flowkit.viz import atomic_savefig

    target = get_target(target)
    box = box or target.box
    dens, how = model_density_grid(model, box, size)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    _imshow(axes[0], target_density_grid(target, box, size), box, f"target {target.name}")
    _imshow(axes[1], dens, box, f"model q ({how})")
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)


def plot_loss(
    loss: Sequence[float], path: str | os.PathLike, log_z: float | None = None, refined_from: int | None = None
) -> Path:
    """PNG of the loss per step and its moving average; with ``log_z``, as ``loss + log Z``
    (at beta = 1 an estimate of KL(q||p) in nats); with ``refined_from``, a line where the
    refine stage starts."""
    from flowkit.viz import atomic_savefig

    y = np.asarray(loss, dtype=float) + (log_z or 0.0)
    k = max(1, len(y) // 50)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    xs = np.arange(1, len(y) + 1)
    label = "loss + log Z (nats)" if log_z is not None else "loss"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, y, alpha=0.3, lw=0.7, label="per step")
    ax.plot(xs[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    lo, hi = np.percentile(y, [1, 99])
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    if refined_from is not None:
        ax.axvline(refined_from + 0.5, color="k", ls="--", lw=0.8, label="refine starts")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)


def plot_snapshots(
    snapshots: Sequence[tuple[int, np.ndarray]], target: Target2D | str, path: str | os.PathLike, size: int = 100
) -> Path:
    """PNG grid of sample histograms, one panel per ``(step, samples)`` snapshot."""
    from flowkit.viz import atomic_savefig

    target = get_target(target)
    if not snapshots:
        raise ValueError("snapshots: expected at least one (step, samples) pair, got none")
    x0, x1, y0, y1 = target.box
    n = len(snapshots)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (step, x) in zip(axes.flat, snapshots, strict=False):
        h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[y0, y1], [x0, x1]])
        _imshow(ax, h, target.box, f"step {step}")
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=100)


def save_fit_pictures(result, target: Target2D | str, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``target.png``, ``model.png``, ``loss.png`` (and ``snapshots.png``) to ``out_dir``."""
    target = get_target(target)
    out_dir = Path(out_dir)
    paths = [
        plot_target(target, out_dir / "target.png"),
        plot_model(result.model, target, out_dir / "model.png"),
        plot_loss(
            result.loss, out_dir / "loss.png", log_z=target.log_z, refined_from=getattr(result, "refined_from", None)
        ),
    ]
    if result.snapshots:
        paths.append(plot_snapshots(result.snapshots, target, out_dir / "snapshots.png"))
    return paths
