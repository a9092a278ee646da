"""Pictures of 2D fits as PNGs: target and model densities on one colour scale, the loss curve
with the annealing marked, snapshots of the model during the fit.

Figures are ``matplotlib.figure.Figure`` objects from :func:`flowkit.viz.new_figure` (no pyplot,
no global backend), written atomically with :func:`flowkit.viz.atomic_savefig`; matplotlib is
imported on use.
:class:`SnapshotWriter` is a :func:`~flowkit.toy2d.fit` callback that rewrites
``snapshots.png`` as the fit goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowkit.toy2d.flows import is_invertible, model_log_prob, model_sample
from flowkit.toy2d.targets import Box, Target2D, _grid_points, as_target
from flowkit.viz import DPI, atomic_savefig, new_figure

__all__ = [
    "SnapshotWriter",
    "model_density_grid",
    "plot_loss",
    "plot_model",
    "plot_snapshots",
    "plot_target",
    "save_fit_pictures",
    "target_density_grid",
]


def _figure(width: float, height: float):
    return new_figure(width, height, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_savefig(fig, path, dpi=DPI, format="png")


def _box_of(target: Target2D, box: Box | None) -> Box:
    box = box or target.box
    if box is None:
        raise ValueError(f"box: the target {target.name} has no box (none holds its mass); pass box=(x0, x1, y0, y1)")
    return box


@torch.no_grad()
def target_density_grid(target: Any, box: Box | None = None, size: int = 200) -> np.ndarray:
    """``p(x) = p~(x) / Z`` on a ``size x size`` grid over ``box`` (default: the target's), as
    ``[y, x]``; without a known ``log Z``, ``p~`` normalised over the grid."""
    target = as_target(target)
    box = _box_of(target, box)
    pts, area = _grid_points(box, (size, size), torch.float64, target._anchor.device)
    lp = target.log_prob(pts).double()
    log_z = target.log_z if target.log_z is not None else float(torch.logsumexp(lp, 0)) + np.log(area)
    return (lp - log_z).exp().reshape(size, size).T.cpu().numpy()


@torch.no_grad()
def model_density_grid(model, box: Box, size: int = 200, num_samples: int = 200_000) -> tuple[np.ndarray, str]:
    """The model's density on a grid over ``box``: exact ``q(x)`` if the model inverts, else a
    normalised histogram of ``num_samples`` samples. Returns ``(density [y, x], "exact"|"histogram")``."""
    param = next(model.parameters())
    if is_invertible(model):
        pts, _ = _grid_points(box, (size, size), param.dtype, param.device)
        dens = torch.cat([model_log_prob(model, c) for c in pts.split(1 << 15)]).exp()
        return dens.reshape(size, size).T.double().cpu().numpy(), "exact"
    chunks = [1 << 16] * (num_samples >> 16) + [num_samples % (1 << 16)]
    x = torch.cat([model_sample(model, c)[0] for c in chunks if c]).double().cpu().numpy()
    return _histogram(x, box, size), "histogram"


def _histogram(x: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Samples ``[n, 2]`` as a density on a ``size x size`` grid over ``box``, ``[y, x]``."""
    x0, x1, y0, y1 = box
    h, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=size, range=[[y0, y1], [x0, x1]])
    return h / (max(len(x), 1) * (x1 - x0) * (y1 - y0) / size**2)


def _density_panels(fig, panels: list[tuple[np.ndarray, str]], box: Box, label: str, cols: int | None = None) -> None:
    """One image per ``(density, title)``, axes in data units, one colour bar for all (one scale)."""
    cols = cols or len(panels)
    rows = -(-len(panels) // cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(float(np.max(d)) for d, _ in panels) or 1.0
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        dens, title = panels[k]
        image = ax.imshow(dens, origin="lower", extent=box, cmap="viridis", vmin=0.0, vmax=vmax, aspect="equal")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("$x_1$", fontsize=8)
        ax.set_ylabel("$x_2$", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=label, shrink=0.9)


def plot_target(target: Any, path: str | os.PathLike, box: Box | None = None, size: int = 200) -> Path:
    """PNG of the normalised target density, with axes and a colour bar."""
    target = as_target(target)
    box = _box_of(target, box)
    fig = _figure(5, 4)
    _density_panels(fig, [(target_density_grid(target, box, size), f"target p: {target.name}")], box, "density")
    return _save(fig, path)


def plot_model(model, target: Any, path: str | os.PathLike, box: Box | None = None, size: int = 200) -> Path:
    """PNG of the target density next to the model's (exact ``q`` or a sample histogram), on one
    colour scale, with axes and a colour bar."""
    target = as_target(target)
    box = _box_of(target, box)
    dens, how = model_density_grid(model, box, size)
    panels = [(target_density_grid(target, box, size), f"target p: {target.name}"), (dens, f"model q ({how})")]
    fig = _figure(9, 4)
    _density_panels(fig, panels, box, "density")
    return _save(fig, path)


def plot_loss(
    loss: Sequence[float],
    path: str | os.PathLike,
    log_z: float | None = None,
    anneal_end: int | None = None,
    refine_start: int | None = None,
    refine_label: str = "refine stage",
) -> Path:
    """PNG of the loss per step and its moving average.

    With ``log_z``, the curve is ``loss + log Z``: at ``beta = 1`` an estimate of ``KL(q||p)`` in
    nats. ``anneal_end`` shades the annealing: while ``beta < 1`` the loss
    ``E_q[log q - beta log p~]`` rises with ``beta`` even as the fit improves (``-beta log p~``
    grows), so only the curve after the line measures the fit. ``refine_start`` marks the second
    stage (``refine_label``, e.g. ``"distilled model"``).
    """
    y = np.asarray(loss, dtype=float) + (log_z or 0.0)
    k = max(1, len(y) // 50)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    xs = np.arange(1, len(y) + 1)
    fig = _figure(7, 4)
    ax = fig.subplots()
    ax.plot(xs, y, alpha=0.3, lw=0.7, label="per step")
    ax.plot(xs[k - 1 :], smooth, lw=1.5, label=f"mean of {k} steps")
    after = y[anneal_end:] if anneal_end is not None and anneal_end < len(y) else y
    finite = after[np.isfinite(after)]
    if finite.size:
        lo, hi = np.percentile(finite, [1, 99])
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    if anneal_end is not None:
        ax.axvspan(0, anneal_end, color="orange", alpha=0.12, label="annealing: beta < 1, loss rises with beta")
        ax.axvline(anneal_end, color="orange", lw=1.0, label=f"annealing ends (beta = 1) at step {anneal_end}")
    if refine_start is not None:
        ax.axvline(refine_start + 0.5, color="k", ls="--", lw=0.8, label=f"{refine_label} from step {refine_start}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss + log Z (nats)" if log_z is not None else "loss (nats)")
    what = (
        "E_q[log q - beta log p~] + log Z  (= KL(q||p) once beta = 1)"
        if log_z is not None
        else "E_q[log q - beta log p~]"
    )
    ax.set_title(what, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_snapshots(
    snapshots: Sequence[tuple[int, np.ndarray]], target: Any, path: str | os.PathLike, size: int = 100
) -> Path:
    """PNG grid of sample histograms, one panel per ``(step, samples)`` snapshot, one colour scale."""
    target = as_target(target)
    if not snapshots:
        raise ValueError("snapshots: expected at least one (step, samples) pair, got none")
    box = _box_of(target, None)
    panels = [(_histogram(np.asarray(x, dtype=float), box, size), f"step {step}") for step, x in snapshots]
    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    fig = _figure(2.4 * cols + 1.0, 2.3 * rows)
    _density_panels(fig, panels, box, "density (histogram of samples)", cols)
    return _save(fig, path)


class SnapshotWriter:
    """A :func:`~flowkit.toy2d.fit` callback: every ``every`` steps, ``samples`` model samples are
    kept and ``out_dir/snapshots.png`` is rewritten, so the pictures grow while the fit runs."""

    def __init__(self, target: Any, out_dir: str | os.PathLike, every: int, samples: int = 5000):
        from flowkit.validation import check_int

        self.target = as_target(target)
        self.path = Path(out_dir) / "snapshots.png"
        self.every = check_int("every", every, low=1)
        self.samples = check_int("samples", samples, low=1)
        self.snapshots: list[tuple[int, np.ndarray]] = []

    @torch.no_grad()
    def __call__(self, step: int, model, loss: np.ndarray) -> None:
        if step % self.every:
            return
        self.snapshots.append((step, model_sample(model, self.samples)[0].double().cpu().numpy()))
        plot_snapshots(self.snapshots, self.target, self.path)


def save_fit_pictures(
    result, target: Any, out_dir: str | os.PathLike, snapshots: Sequence[tuple[int, np.ndarray]] | None = None
) -> list[Path]:
    """Write ``target.png``, ``model.png``, ``loss.png`` (and ``snapshots.png``) to ``out_dir``.

    Args:
        result: a :class:`~flowkit.toy2d.fit.FitResult`.
        target: the target it was fitted to.
        out_dir: the folder (created).
        snapshots: instead of ``result.snapshots`` (e.g. a :class:`SnapshotWriter`'s).
    """
    target = as_target(target)
    out_dir = Path(out_dir)
    snapshots = result.snapshots if snapshots is None else snapshots
    refine = result.preset.refine if result.preset is not None else None
    label = "distilled model" if refine is not None and refine.method == "distill" else "refine stage"
    paths = [
        plot_target(target, out_dir / "target.png"),
        plot_model(result.model, target, out_dir / "model.png"),
        plot_loss(result.loss, out_dir / "loss.png", target.log_z, result.anneal_end, result.refine_start, label),
    ]
    if snapshots:
        paths.append(plot_snapshots(snapshots, target, out_dir / "snapshots.png"))
    return paths
