"""The image-flow tutorial's analyses, each written as a PNG.

* :func:`plot_dequantization_distribution`: the density over the logit ``z`` that uniform
  dequantization of ``K`` levels (with an optional prior over the levels) induces, one colour
  per level -- ``p(z) = P(x) |dv/dz|`` with ``v = x + u`` and ``x = floor(v)``.
* :func:`plot_dequantization_noise`: histograms of the noise ``u = v - x`` in ``[0, 1)``
  (and of the logits ``z``) that one or more models' dequantization draws for real images:
  flat for uniform dequantization, shaped for the variational one (Ho et al., 2019).
* :func:`plot_interpolation`: images decoded along straight lines between the latents of
  image pairs (:meth:`ImageFlow.interpolate`).
* :func:`plot_shared_final_latent`: for a multiscale flow, rows of samples that share the
  final level's latent while every early split-off gets fresh noise.
* :func:`plot_temperature_sweep`: samples from ``N(0, T^2 I)`` for several ``T``, the same
  base noise in every row.
* :func:`plot_class_samples`: for a class-conditional model, one row of samples per class,
  the same base noise in every row (so each column keeps its "style" across the classes).

Class-conditional models (``ImageFlow.is_conditional``): interpolation runs between two
images of the same class, given that class (pass the images' ``labels``); in the temperature
sweep and the shared-final-latent picture column ``j`` shows class ``j mod K``.

:func:`analyze` runs every analysis that applies to a model (``flowkit analyze`` calls it).
Pictures have a fixed size in pixels (stated in each docstring, at ``dpi=100``), so tests can
check them.  matplotlib is imported inside the functions that draw.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from flowkit.layers.dequantization import Dequantization
from flowkit.models.image_flow import ImageFlow
from flowkit.validation import check_int
from flowkit.viz import DPI, atomic_savefig, new_figure, save_image_grid

__all__ = [
    "dequantization_density",
    "dequantization_noise",
    "plot_dequantization_distribution",
    "plot_dequantization_noise",
    "plot_interpolation",
    "plot_shared_final_latent",
    "plot_temperature_sweep",
    "class_samples",
    "plot_class_samples",
    "same_class_pairs",
    "shared_final_latent_samples",
    "temperature_sweep_samples",
    "analyze",
    "DPI",
]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's generators for the block and restore the caller's random state after it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_model(model, name: str = "model") -> ImageFlow:
    if not isinstance(model, ImageFlow):
        raise TypeError(f"{name}: expected a flowkit ImageFlow, got {type(model).__name__}")
    return model


def _column_labels(model: ImageFlow, num_rows: int, num_cols: int) -> torch.Tensor | None:
    """Labels of a ``num_rows x num_cols`` grid (row by row) for a conditional model: column
    ``j`` is class ``j mod K``; ``None`` for an unconditional model."""
    if model.num_classes is None:
        return None
    return (torch.arange(num_cols, device=model.device) % model.num_classes).repeat(num_rows)


# -- dequantization distribution (the tutorial's figure) ---------------------------------------
def dequantization_density(
    num_levels: int,
    prior: Sequence[float] | None = None,
    z_range: tuple[float, float] = (-4.0, 4.0),
    num_points: int = 801,
    alpha: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density over the logit ``z`` induced by uniform dequantization of ``num_levels`` levels.

    ``p(z) = P(x) * |dv/dz|`` with ``v = x + u``, ``u ~ U[0, 1)``, ``x = floor(v)`` and
    ``z = logit(squeeze(v / K))`` (:class:`~flowkit.layers.ScaledLogit`).

    Args:
        num_levels: ``K``.
        prior: probabilities of the ``K`` levels (normalised here); ``None`` for uniform.
        z_range: interval of ``z`` to evaluate.
        num_points: grid points.
        alpha: the logit squeeze of the dequantization.

    Returns:
        ``(z, density, level)`` arrays of length ``num_points``; ``level`` is the integer
        value each ``z`` decodes to.

    Example:
        >>> z, p, x = dequantization_density(8, num_points=4001, z_range=(-12.0, 12.0))
        >>> bool(abs(float(((p[1:] + p[:-1]) / 2 * np.diff(z)).sum()) - 1.0) < 1e-2)
        True
    """
    check_int("num_levels", num_levels, 2)
    check_int("num_points", num_points, 2)
    lo, hi = (float(v) for v in z_range)
    if not hi > lo:
        raise ValueError(f"z_range: expected (low, high) with high > low, got {z_range!r}")
    if prior is None:
        p = np.full(num_levels, 1.0 / num_levels)
    else:
        p = np.asarray(prior, dtype=np.float64)
        if p.shape != (num_levels,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(
                f"prior: expected {num_levels} non-negative finite weights, got {np.asarray(prior).tolist()!r}"
            )
        p = p / p.sum()
    deq = Dequantization(num_levels=num_levels, alpha=alpha).double()
    z = torch.linspace(lo, hi, num_points, dtype=torch.float64).view(-1, 1, 1, 1)
    x, log_dv_dz = deq.inverse(z)
    level = x.view(-1).numpy()
    density = np.exp(log_dv_dz.numpy()) * p[level]
    return z.view(-1).numpy(), density, level


def plot_dequantization_distribution(
    path: str | os.PathLike,
    num_levels: int = 8,
    prior: Sequence[float] | None = None,
    z_range: tuple[float, float] = (-4.0, 4.0),
    title: str | None = None,
) -> Path:
    """The tutorial's dequantization figure: ``p(z)`` of :func:`dequantization_density`, the
    area over each level's interval of ``z`` filled in its own colour.

    Writes a 600x300 PNG; returns its path.
    """
    z, density, level = dequantization_density(num_levels, prior, z_range)
    from matplotlib import colormaps

    fig = new_figure(6, 3)
    ax = fig.add_subplot()
    ticks = []
    for k in np.unique(level):
        idx = np.flatnonzero(level == k)
        color = colormaps["tab10"](int(k) % 10)
        ax.fill_between(z[idx], density[idx], 0.0, color=color, alpha=0.5, label=str(int(k)))
        ax.plot([z[idx[0]]] * 2, [0, density[idx[0]]], color=color)
        ticks.append(z[idx[0]])
    ticks.append(z[-1])
    ax.plot(z, density, color="black", linewidth=1)
    if num_levels <= 10:  # the tutorial marks every level's boundary; with more levels they crowd
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.1f}" for t in ticks], fontsize=7)
    ax.set_xlim(z[0], z[-1])
    ax.set_ylim(0, density.max() * 1.1)
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    ax.set_title(
        title
        or f"Dequantization distribution for {num_levels} levels" + (" (with prior)" if prior is not None else ""),
        fontsize=9,
    )
    ax.legend(fontsize=6, ncol=2 if num_levels > 8 else 1, loc="upper right")
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=DPI)


# -- learned dequantization noise ---------------------------------------------------------------
@torch.no_grad()
def dequantization_noise(
    model: ImageFlow | Dequantization, images: torch.Tensor, repeats: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``u`` and logits ``z`` a model's dequantization draws for ``images``.

    ``z = dequantization(x)`` (``repeats`` draws per image) and ``u = v - x`` with
    ``v = logit^-1(z)`` the dequantized value in ``[x, x + 1)``.

    Args:
        model: an :class:`ImageFlow` (its ``dequantization`` is used, after padding the
            images as the model does) or a :class:`~flowkit.layers.Dequantization`.
        images: integer images ``[B, C, H, W]``.
        repeats: noise draws per image.

    Returns:
        ``(u, z)``: two flat float64 CPU tensors of ``repeats * images.numel()`` values
        (padded images: ``u`` of the padding pixels included).
    """
    check_int("repeats", repeats, 1)
    if isinstance(model, ImageFlow):
        deq = model.dequantization
        x = model.pad(model._check_images(images, "images"))
    elif isinstance(model, Dequantization):
        deq = model
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a tensor of integer images, got {type(images).__name__}")
        x = images.to(deq._dtype_ref.device)
    else:
        raise TypeError(f"model: expected an ImageFlow or a Dequantization, got {type(model).__name__}")
    was_training = deq.training
    deq.eval()
    try:
        us, zs = [], []
        for _ in range(repeats):
            z, _ = deq(x)
            v, _ = deq.logit.inverse(z)
            us.append((v - x.to(v.dtype)).reshape(-1).double().cpu())
            zs.append(z.reshape(-1).double().cpu())
    finally:
        deq.train(was_training)
    return torch.cat(us), torch.cat(zs)


def plot_dequantization_noise(
    models: Mapping[str, ImageFlow | Dequantization] | ImageFlow,
    images: torch.Tensor,
    path: str | os.PathLike,
    repeats: int = 8,
    bins: int = 64,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Histograms of dequantization noise ``u`` (left) and logits ``z`` (right), one row per model.

    The tutorial compares uniform with variational dequantization this way: uniform noise is
    flat on ``[0, 1)``; a learned ``q(u | x)`` is smooth and shaped by the data.

    Args:
        models: ``{"uniform": model_a, "variational": model_b}`` (or one model).
        images: integer images ``[B, C, H, W]`` (real data: the noise depends on ``x``).
        path: PNG to write; 800 x (40 + 220 * rows) pixels.
        repeats: noise draws per image.
        bins: histogram bins.

    Returns:
        ``(path, stats)`` with ``stats[name] = {"u_mean", "u_std", "z_mean", "z_std"}``
        (a uniform ``u`` has mean 0.5 and std ``1/sqrt(12) = 0.289``).
    """
    if isinstance(models, (ImageFlow, Dequantization)):
        models = {"model": models}
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models: expected a non-empty mapping name -> model, got {type(models).__name__}")
    check_int("bins", bins, 2)
    data = {name: dequantization_noise(m, images, repeats) for name, m in models.items()}
    stats = {
        name: {"u_mean": float(u.mean()), "u_std": float(u.std()), "z_mean": float(z.mean()), "z_std": float(z.std())}
        for name, (u, z) in data.items()
    }
    rows = len(data)
    fig = new_figure(8, (40 + 220 * rows) / DPI)
    axes = fig.subplots(rows, 2, squeeze=False)
    for r, (name, (u, z)) in enumerate(data.items()):
        ax_u, ax_z = axes[r]
        ax_u.hist(u.numpy(), bins=bins, range=(0.0, 1.0), density=True, color="C0", alpha=0.6, edgecolor="C0")
        ax_u.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax_u.set_xlim(0, 1)
        ax_u.set_title(
            f"{name}: noise u (mean {stats[name]['u_mean']:.3f}, std {stats[name]['u_std']:.3f})", fontsize=8
        )
        ax_z.hist(z.numpy(), bins=4 * bins, density=True, color="C1", alpha=0.6, edgecolor="C1")
        ax_z.set_title(f"{name}: dequantized logits z", fontsize=8)
        for ax in (ax_u, ax_z):
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=DPI), stats


# -- image grids with row labels ----------------------------------------------------------------
# -- interpolation -----------------------------------------------------------------------------
@torch.no_grad()
def plot_interpolation(
    model: ImageFlow,
    images: torch.Tensor,
    path: str | os.PathLike,
    steps: int = 8,
    num_pairs: int | None = None,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> tuple[Path, torch.Tensor]:
    """One row per image pair ``(images[2i], images[2i+1])``: the images decoded along the
    straight line ``z = (1 - w) z_1 + w z_2`` between their latents (:meth:`ImageFlow.interpolate`).

    The first and last columns reproduce the pair exactly.  The latents of a stochastic
    dequantization depend on its noise; ``seed`` fixes it (the caller's random state is
    left as it was).  A class-conditional model needs the images' ``labels`` (``[N]``); the two
    images of a pair must share their class, which encodes and decodes the whole row.

    Returns:
        ``(path, grid)`` with ``grid`` the ``[pairs * steps, C, H, W]`` integer images.
    """
    model = _check_model(model)
    check_int("steps", steps, 2)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(
            f"images: expected at least two images [N>=2, C, H, W], got {getattr(images, 'shape', images)}"
        )
    pairs = images.shape[0] // 2 if num_pairs is None else check_int("num_pairs", num_pairs, 1)
    if 2 * pairs > images.shape[0]:
        raise ValueError(f"num_pairs: {pairs} pairs need {2 * pairs} images, got {images.shape[0]}")
    classes = _pair_classes(model, labels, images.shape[0], pairs)
    with _seeded(seed, model.device):
        rows = [
            model.interpolate(images[2 * i], images[2 * i + 1], steps=steps, y=classes[i]).cpu() for i in range(pairs)
        ]
    grid = torch.cat(rows)
    out = save_image_grid(grid, path, model.num_levels, steps, title=f"interpolation in latent space ({steps} steps)")
    return out, grid


def _pair_classes(model: ImageFlow, labels, num_images: int, pairs: int) -> list[int | None]:
    """The class of each interpolated pair (``None`` for an unconditional model)."""
    if not model.is_conditional:
        if labels is not None:
            raise ValueError("labels: the model is unconditional; interpolate without labels")
        return [None] * pairs
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (num_images,):
        raise ValueError(
            f"labels: the model is conditional, so interpolation needs the images' labels, a tensor [{num_images}]; "
            f"got {labels if labels is None else tuple(getattr(labels, 'shape', ()))}"
        )
    found = labels.tolist()
    for i in range(pairs):
        if found[2 * i] != found[2 * i + 1]:
            raise ValueError(
                f"labels: images {2 * i} and {2 * i + 1} have classes {found[2 * i]} and {found[2 * i + 1]}; a "
                "conditional model interpolates within one class, so each pair must share its class"
            )
    return [found[2 * i] for i in range(pairs)]


def same_class_pairs(
    images: torch.Tensor, labels: torch.Tensor, max_pairs: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_pairs`` pairs of images that share a class, one pair per class in order of
    first appearance: ``(images [2P, C, H, W], labels [2P])`` for :func:`plot_interpolation`.

    Raises:
        ValueError: no two images share a class.
    """
    rows: list[int] = []
    first: dict[int, int] = {}  # class -> its first image
    for index, label in enumerate(labels.tolist()):
        if label not in first:
            first[label] = index
        elif first[label] not in rows and len(rows) < 2 * max_pairs:  # one pair per class
            rows += [first[label], index]
    if not rows:
        raise ValueError(f"images: no two of the {images.shape[0]} images share a class; give more images")
    picked = torch.tensor(rows)
    return images[picked], labels[picked]


# -- multiscale: shared final latent -------------------------------------------------------------
@torch.no_grad()
def shared_final_latent_samples(
    model: ImageFlow,
    num_rows: int = 3,
    num_cols: int = 8,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples of a multiscale flow in rows that share the final level's latent.

    The flattened latent holds the levels in :attr:`ImageFlow.level_shapes` order (early
    split-offs first, final last); each row draws one final-level latent and gives every
    column fresh early-level noise, all at ``temperature``.  Conditional models: column ``j``
    is class ``j mod K``.

    Returns:
        ``[num_rows * num_cols, C, H, W]`` integer images.

    Raises:
        ValueError: the model has a single level (nothing is split off early).
    """
    model = _check_model(model)
    check_int("num_rows", num_rows, 1)
    check_int("num_cols", num_cols, 1)
    shapes = model.level_shapes
    if len(shapes) < 2:
        raise ValueError(
            f"model: samples sharing the final latent need a multiscale flow with >= 2 levels, "
            f"got one level of shape {shapes[0]}"
        )
    final = math.prod(shapes[-1])
    z = model.sample_latents(num_rows * num_cols, temperature, generator).reshape(num_rows * num_cols, -1)
    shared = model.sample_latents(num_rows, temperature, generator).reshape(num_rows, -1)[:, -final:]
    z[:, -final:] = shared.repeat_interleave(num_cols, dim=0)
    return model.decode(z.reshape(-1, *model.latent_shape), _column_labels(model, num_rows, num_cols))


def plot_shared_final_latent(
    model: ImageFlow,
    path: str | os.PathLike,
    num_rows: int = 3,
    num_cols: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[Path, torch.Tensor]:
    """PNG of :func:`shared_final_latent_samples` (one row per final latent); returns ``(path, images)``."""
    gen = torch.Generator(device=_check_model(model).device).manual_seed(seed)
    images = shared_final_latent_samples(model, num_rows, num_cols, temperature, gen).cpu()
    labels = [f"z_final #{r + 1}" for r in range(num_rows)]
    title = f"each row shares the final latent {tuple(model.level_shapes[-1])}; early levels fresh (T={temperature:g})"
    return save_image_grid(images, path, model.num_levels, num_cols, title=title, row_labels=labels), images


# -- temperature sweep ---------------------------------------------------------------------------
@torch.no_grad()
def temperature_sweep_samples(
    model: ImageFlow, temperatures: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0), num_cols: int = 8, seed: int = 0
) -> torch.Tensor:
    """``model.sample(num_cols, T)`` for each ``T``, re-seeded so that every row uses the same
    base noise ``eps`` (``z = T * eps``).  Returns ``[len(temperatures) * num_cols, C, H, W]``.
    Conditional models: column ``j`` is class ``j mod K``."""
    model = _check_model(model)
    check_int("num_cols", num_cols, 1)
    temps = [float(t) for t in temperatures]
    if not temps or not all(math.isfinite(t) and t > 0 for t in temps):
        raise ValueError(f"temperatures: expected positive finite floats, got {list(temperatures)!r}")
    rows = []
    for t in temps:
        gen = torch.Generator(device=model.device).manual_seed(seed)
        rows.append(model.sample(num_cols, temperature=t, generator=gen, y=_column_labels(model, 1, num_cols)).cpu())
    return torch.cat(rows)


def plot_temperature_sweep(
    model: ImageFlow,
    path: str | os.PathLike,
    temperatures: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0),
    num_cols: int = 8,
    seed: int = 0,
) -> tuple[Path, torch.Tensor]:
    """PNG of :func:`temperature_sweep_samples`, one row per temperature; returns ``(path, images)``."""
    images = temperature_sweep_samples(model, temperatures, num_cols, seed)
    labels = [f"T = {float(t):g}" for t in temperatures]
    return save_image_grid(
        images,
        path,
        model.num_levels,
        num_cols,
        title="samples at temperature T (same base noise per column)",
        row_labels=labels,
    ), images


# -- class-conditional models: one row per class --------------------------------------------------
def _classes(model: ImageFlow, classes: Sequence[int] | None) -> list[int]:
    if not model.is_conditional:
        raise ValueError(
            "model: it is unconditional (built without num_classes), so it has no classes to sample; "
            "build it with num_classes=K (flowkit train --conditional)"
        )
    assert model.num_classes is not None
    if classes is None:
        return list(range(model.num_classes))
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(f"classes: expected a non-empty list of class labels, got {classes!r}")
    return [check_int("classes", k, low=0, high=model.num_classes - 1) for k in classes]


@torch.no_grad()
def class_samples(
    model: ImageFlow,
    per_class: int = 8,
    temperature: float = 0.7,
    classes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    shared_noise: bool = True,
) -> torch.Tensor:
    """``per_class`` samples of each class of a class-conditional model, class by class.

    Args:
        model: a conditional :class:`ImageFlow`.
        per_class: samples per class.
        temperature: of the base noise.
        classes: the classes, in row order (default: all, ``0 .. K-1``).
        generator: for the base noise.
        shared_noise: every class decodes the same ``per_class`` base latents (column ``j``
            keeps its "style" across the rows); ``False``: fresh noise for every image.

    Returns:
        ``[len(classes) * per_class, C, H, W]`` integer images (class ``classes[i]`` in rows
        ``i * per_class ... (i + 1) * per_class - 1``).

    Raises:
        ValueError: the model is unconditional, or a class is out of range.
    """
    model = _check_model(model)
    rows = _classes(model, classes)
    check_int("per_class", per_class, 1)
    labels = torch.tensor(rows, device=model.device).repeat_interleave(per_class)
    if shared_noise:
        u = model.sample_latents(per_class, temperature, generator)
        u = u.repeat(len(rows), *[1] * len(model.latent_shape))
    else:
        u = model.sample_latents(len(labels), temperature, generator)
    return model.decode(u, labels)


def plot_class_samples(
    model: ImageFlow,
    path: str | os.PathLike,
    per_class: int = 8,
    temperature: float = 0.7,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    shared_noise: bool = True,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> tuple[Path, torch.Tensor]:
    """PNG of :func:`class_samples`, one row per class (labelled ``class k`` or with
    ``class_names[k]``), under ``title`` (default: what the picture shows); returns ``(path, images)``."""
    rows = _classes(_check_model(model), classes)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    images = class_samples(model, per_class, temperature, rows, gen, shared_noise).cpu()
    names = [f"class {k}" if class_names is None else str(class_names[k]) for k in rows]
    noise = "same base noise per column" if shared_noise else "fresh noise per image"
    title = title or f"one row per class (T={temperature:g}, {noise})"
    return save_image_grid(images, path, model.num_levels, per_class, title=title, row_labels=names), images


# -- everything at once --------------------------------------------------------------------------
def analyze(
    model: ImageFlow,
    images: torch.Tensor,
    out: str | os.PathLike,
    temperatures: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0),
    repeats: int = 8,
    seed: int = 0,
    name: str = "model",
    labels: torch.Tensor | None = None,
) -> dict[str, Path]:
    """Run every analysis that applies to ``model`` and write the PNGs under ``out``.

    Files: ``dequantization_distribution.png`` (uniform prior) and
    ``dequantization_distribution_prior.png`` (levels weighted by their frequency in
    ``images``), ``dequantization_noise.png``, ``interpolation.png``,
    ``temperature_sweep.png``, for multiscale models ``shared_final_latent.png``, and for
    class-conditional models ``class_samples.png`` (one row of samples per class; the
    interpolation then runs between images of the same class).

    Args:
        model: a (trained) :class:`ImageFlow`.
        images: real integer images ``[N >= 2, C, H, W]`` (noise histograms, interpolation).
        out: output folder.
        temperatures: rows of the temperature sweep.
        repeats: dequantization-noise draws per image.
        seed: seeds the random draws.
        name: the model's label in the noise histogram.
        labels: the images' class labels ``[N]``: needed for a class-conditional model.

    Returns:
        ``{analysis name: path}``.
    """
    model = _check_model(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    k = model.num_levels
    files["dequantization_distribution"] = plot_dequantization_distribution(out / "dequantization_distribution.png", k)
    counts = torch.bincount(images.reshape(-1).long().cpu(), minlength=k).double() + 1.0  # add-one: every level visible
    files["dequantization_distribution_prior"] = plot_dequantization_distribution(
        out / "dequantization_distribution_prior.png",
        k,
        prior=(counts / counts.sum()).tolist(),
        title=f"Dequantization distribution for {k} levels, prior = level frequencies of the data",
    )
    with _seeded(seed, model.device):
        files["dequantization_noise"], _ = plot_dequantization_noise(
            {name: model}, images, out / "dequantization_noise.png", repeats
        )
    files["interpolation"], _ = _plot_pairs(model, images, labels, out / "interpolation.png", seed)
    files["temperature_sweep"], _ = plot_temperature_sweep(
        model, out / "temperature_sweep.png", temperatures, seed=seed
    )
    if len(model.level_shapes) > 1:
        files["shared_final_latent"], _ = plot_shared_final_latent(model, out / "shared_final_latent.png", seed=seed)
    if model.is_conditional:
        files["class_samples"], _ = plot_class_samples(model, out / "class_samples.png", seed=seed)
    return files


def _plot_pairs(model: ImageFlow, images: torch.Tensor, labels, path: Path, seed: int) -> tuple[Path, torch.Tensor]:
    """:func:`plot_interpolation` of the first three pairs (of the same class, for a conditional model)."""
    if not model.is_conditional:
        return plot_interpolation(model, images[: min(6, images.shape[0] // 2 * 2)], path, seed=seed, labels=labels)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (images.shape[0],):
        raise ValueError(
            f"labels: the model is conditional, so analyze needs the images' labels, a tensor [{images.shape[0]}]"
        )
    pairs, pair_labels = same_class_pairs(images, labels, max_pairs=3)
    return plot_interpolation(model, pairs, path, seed=seed, labels=pair_labels)
