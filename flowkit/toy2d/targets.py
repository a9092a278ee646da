"""Unnormalised 2D target densities ``p~(x)`` and their log normaliser ``log Z``.

A :class:`Target2D` gives ``log_prob(x) = log p~(x)`` for ``x`` of shape ``[B, 2]`` (on any
device, in any float dtype), the box ``(x0, x1, y0, y1)`` that holds its mass, its normaliser
:attr:`~Target2D.normaliser` (a :class:`LogZ`: closed form where one exists, otherwise a
midpoint-rule integral of ``p~`` over the box, cached, with its integration error) and
``sample(n)`` (exact where a sampler exists, otherwise rejection sampling on the box). With
``log Z`` the reverse KL ``E_q[log q - log p~] + log Z`` is exact up to the integration error.

Any density is a target: :func:`as_target` takes a registered name, a :class:`Target2D`, a
normflows target (or any object with ``log_prob(z)``) or a plain callable ``z -> log p~(z)``
and wraps the last two in :class:`LogProbTarget`, which finds a box from the density itself
(or takes one) and integrates ``log Z`` on first use. When no box holds the mass (a density that
does not fall off), ``log Z`` is ``None`` and the metrics report the KL relative to it.

The registry wraps normflows' 2D targets (``two-modes``, ``two-moons``, ``circular-gmm``,
``ring-mixture``, ``sinusoidal``, ``sinusoidal-gap``, ``sinusoidal-split``, ``smiley``) and
adds ``eight-gaussians``, ``banana``, ``checkerboard`` and ``gaussian``.

Example:
    >>> import normflows as nf, torch
    >>> from flowkit.toy2d import as_target, get_target
    >>> round(get_target("two-modes").log_z, 3)
    0.804
    >>> round(as_target(nf.distributions.TwoModes(2, 0.1)).log_z, 3)  # the normflows object itself
    0.804
    >>> t = as_target(lambda z: -0.5 * (z**2).sum(1))  # any z -> log p~(z): log Z = log(2 pi)
    >>> round(t.log_z, 4), t.normaliser.error < 1e-4
    (1.8379, True)
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from typing import Any

import normflows as nf
import torch

__all__ = [
    "Box",
    "LogZ",
    "Target2D",
    "LogProbTarget",
    "GaussianTarget",
    "EightGaussians",
    "Banana",
    "Checkerboard",
    "RingMixtureTarget",
    "as_target",
    "find_box",
    "get_target",
    "grid_log_z",
    "integrate_log_z",
    "list_targets",
    "register_target",
]

Box = tuple[float, float, float, float]

# (density fingerprint, box, grid) -> (LogZ, max log p~ on the grid)
_GRID_CACHE: dict[tuple, tuple[LogZ, float]] = {}


@dataclasses.dataclass(frozen=True)
class LogZ:
    """A target's log normaliser ``log Z = log int p~(x) dx``.

    Attributes:
        value: ``log Z`` in nats, or ``None`` when it could not be computed (then a reverse KL
            is only known relative to it: ``E_q[log q - log p~] = KL(q||p) - log Z``).
        error: estimated absolute error of ``value`` in nats (0 for a closed form).
        method: how it was obtained, or why it could not be.
    """

    value: float | None
    error: float
    method: str


def _grid_points(box: Box, grid: tuple[int, int], dtype, device) -> tuple[torch.Tensor, float]:
    """Midpoints of a ``grid[0] x grid[1]`` grid over ``box``, as ``[N, 2]``; and the cell area."""
    x0, x1, y0, y1 = box
    nx, ny = grid
    hx, hy = (x1 - x0) / nx, (y1 - y0) / ny
    xs = x0 + hx * (torch.arange(nx, dtype=dtype, device=device) + 0.5)
    ys = y0 + hy * (torch.arange(ny, dtype=dtype, device=device) + 0.5)
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), hx * hy


def _grid_log_p(log_prob: Callable, box: Box, grid: tuple[int, int], dtype, device, chunk: int) -> torch.Tensor:
    """``log p~`` at the midpoints of the grid over ``box``, as ``[grid[0], grid[1]]`` (x major)."""
    pts, _ = _grid_points(box, grid, dtype, device)
    return torch.cat([log_prob(pts[i : i + chunk]).to(dtype) for i in range(0, pts.shape[0], chunk)]).reshape(grid)


@torch.no_grad()
def grid_log_z(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    box: Box,
    grid: tuple[int, int] = (512, 512),
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    chunk: int = 1 << 18,
) -> tuple[float, float]:
    """``log Z = log sum_cells p~(midpoint) * cell area`` over ``box`` (midpoint rule).

    Returns ``(log Z, max log p~ over the grid midpoints)``.
    """
    lp = _grid_log_p(log_prob, box, grid, dtype, device, chunk)
    return _log_sum(lp, box), float(lp.max())


def _log_sum(lp: torch.Tensor, box: Box) -> float:
    """``log sum_cells p~ * cell area`` for ``lp = log p~`` at the midpoints of a grid over ``box``."""
    area = (box[1] - box[0]) * (box[3] - box[2]) / lp.numel()
    return float(torch.logsumexp(lp.reshape(-1), 0)) + math.log(area)


@torch.no_grad()
def integrate_log_z(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    box: Box,
    grid: tuple[int, int] = (512, 512),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> tuple[LogZ, float]:
    """``log Z`` over ``box`` by the midpoint rule on ``grid``, with an error estimate.

    The error is ``|log Z(grid) - log Z(grid / 2)|`` (the midpoint rule converges at least
    linearly in the cell size, so this bounds the error of the finer grid for a density the grid
    resolves) plus the share of the mass in the outermost ring of cells (mass the box may cut).

    Returns:
        ``(LogZ, max log p~ on the grid)``; ``LogZ.value`` is None when ``p~`` is not finite or
        has no mass on the grid.
    """
    fine = _grid_log_p(log_prob, box, grid, dtype, device, 1 << 18)
    if torch.isnan(fine).any() or torch.isposinf(fine).any():
        return LogZ(None, math.inf, "log p~ is NaN or +inf on the integration grid"), math.nan
    top = float(fine.max())
    if top == -math.inf:
        return LogZ(None, math.inf, f"p~ is 0 everywhere on the box {box}"), top
    value = _log_sum(fine, box)
    coarse = _grid_log_p(log_prob, box, (max(1, grid[0] // 2), max(1, grid[1] // 2)), dtype, device, 1 << 18)
    coarse_value = _log_sum(coarse, box)
    inner = fine[1:-1, 1:-1].reshape(-1)
    edge_share = 1.0 - math.exp(float(torch.logsumexp(inner, 0) - torch.logsumexp(fine.reshape(-1), 0)))
    error = abs(value - coarse_value) + max(edge_share, 0.0)
    method = f"midpoint rule on a {grid[0]}x{grid[1]} grid over the box {tuple(round(b, 4) for b in box)}"
    return LogZ(value, error, method), top


@torch.no_grad()
def find_box(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    start: Box = (-4.0, 4.0, -4.0, 4.0),
    *,
    drop: float = 30.0,
    max_half_width: float = 1e3,
    resolution: int = 200,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Box | None:
    """A box that holds the mass of ``p~``: its edges lie where ``p~`` is below ``exp(-drop)`` of
    its maximum on the box.

    Starting from ``start``, each side whose edge still has ``p~`` above that level moves out
    (the box doubles in that direction) until none does; then the box shrinks to the region above
    the level, plus a margin of a tenth of its size. A density narrower than the grid's spacing
    can be missed: give such a target its box.

    Returns:
        the box, or ``None`` when none within ``|x| <= max_half_width`` holds the mass or ``p~``
        is NaN.
    """
    box: Box = (float(start[0]), float(start[1]), float(start[2]), float(start[3]))
    for _ in range(64):
        lp = _grid_log_p(log_prob, box, (resolution, resolution), dtype, device, 1 << 18)
        if torch.isnan(lp).any():
            return None
        top = float(lp.max())
        if math.isinf(top) and top > 0:
            return None
        level = top - drop if math.isfinite(top) else math.inf
        grow = [bool(lp[0].max() >= level), bool(lp[-1].max() >= level)]
        grow += [bool(lp[:, 0].max() >= level), bool(lp[:, -1].max() >= level)]
        if not math.isfinite(top):
            grow = [True] * 4
        if not any(grow):
            return _shrink_box(box, lp > level)
        box = _grow_box(box, grow)
        if max(abs(b) for b in box) > max_half_width:
            return None
    return None


def _grow_box(box: Box, grow: list[bool]) -> Box:
    """``box`` with each side flagged in ``grow`` (x0, x1, y0, y1) moved out by the box's size."""
    x0, x1, y0, y1 = box
    wx, wy = x1 - x0, y1 - y0
    return (x0 - wx * grow[0], x1 + wx * grow[1], y0 - wy * grow[2], y1 + wy * grow[3])


def _shrink_box(box: Box, above: torch.Tensor) -> Box:
    """The part of ``box`` where ``above`` (a grid of cells, x major) holds, plus a margin of a tenth."""
    x0, x1, y0, y1 = box
    nx, ny = above.shape
    cols = torch.nonzero(above.any(1)).reshape(-1)
    rows = torch.nonzero(above.any(0)).reshape(-1)
    hx, hy = (x1 - x0) / nx, (y1 - y0) / ny
    lo_x, hi_x = x0 + hx * int(cols.min()), x0 + hx * (int(cols.max()) + 1)
    lo_y, hi_y = y0 + hy * int(rows.min()), y0 + hy * (int(rows.max()) + 1)
    mx, my = 0.1 * (hi_x - lo_x) + hx, 0.1 * (hi_y - lo_y) + hy
    return (max(x0, lo_x - mx), min(x1, hi_x + mx), max(y0, lo_y - my), min(y1, hi_y + my))


class _Unfingerprintable(Exception):
    pass


def _freeze(value: Any) -> Any:
    """``value`` as a hashable, comparable record (numbers, strings, small tensors, tuples of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() <= 4096:
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.detach().cpu().reshape(-1).tolist()))
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v) for v in value)
    raise _Unfingerprintable


def _fingerprint(density: Any) -> tuple | None:
    """Identifies a density object by its class and state, for the ``log Z`` cache; None for
    plain functions and objects whose state cannot be compared (those are cached per object)."""
    if not hasattr(density, "log_prob") or not hasattr(density, "__dict__"):
        return None
    items = [(k, v) for k, v in vars(density).items() if not k.startswith("_") and k != "training"]
    if isinstance(density, torch.nn.Module):
        items += list(density.state_dict().items())
    try:
        state = tuple(sorted((k, _freeze(v)) for k, v in items))
    except _Unfingerprintable:
        return None
    return (type(density).__module__, type(density).__qualname__, state)


_WATCHED: set[tuple] = set()  # ("object", id) keys whose object has a finalizer that clears its entries


class Target2D(torch.nn.Module):
    """Base class: an unnormalised density ``p~`` on R^2 with its ``log Z``.

    Subclasses implement :meth:`_log_prob`; they may set ``closed_form_log_z`` (a float) and
    override :meth:`_sample_exact`. ``box`` must hold all but a negligible part of the mass
    (``None``: no box is known, so ``log Z`` cannot be integrated). Move a target with
    ``.to(device)``: samples are drawn on that device.
    """

    name: str = "target"
    box: Box | None = (-3.0, 3.0, -3.0, 3.0)
    grid: tuple[int, int] = (512, 512)
    closed_form_log_z: float | None = None
    max_log_z_error: float = 0.02  # nats; a less accurate integral is not used (KL reported relative)
    aim_log_z_error: float = 1e-3  # nats; finer grids (where a target offers them) until the error is below
    _anchor: torch.Tensor  # buffer (see __init__)

    def __init__(self) -> None:
        super().__init__()
        # decides the device/dtype of samples; follows .to()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._integral: tuple[LogZ, float] | None = None

    # -- density -------------------------------------------------------------------------
    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p~(x)`` (unnormalised) for ``x`` of shape ``[B, 2]``; returns ``[B]``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"x: expected a tensor of shape [batch, 2], got {getattr(x, 'shape', type(x).__name__)}")
        return self._log_prob(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # so a target can be called
        return self.log_prob(x)

    # -- normaliser ----------------------------------------------------------------------
    def cache_key(self) -> tuple | None:
        """Identifies the density (class and parameters) for the ``log Z`` cache shared by
        instances; ``None``: cache on this instance only."""
        return (type(self).__name__, self.name)

    def _integration_grids(self) -> tuple[tuple[int, int], ...]:
        """Grids to try, coarse to fine, until the integration error is below ``max_log_z_error``."""
        return (self.grid,)

    def _compute_integral(self, box: Box) -> tuple[LogZ, float]:
        result: tuple[LogZ, float] = (LogZ(None, math.inf, "no grid"), math.nan)
        for grid in self._integration_grids():
            result = integrate_log_z(self.log_prob, box, grid, device=self._anchor.device)
            if result[0].value is None or result[0].error <= self.aim_log_z_error:
                return result
        log_z, top = result
        if log_z.error <= self.max_log_z_error:
            return result
        reason = f"{log_z.method}: error {log_z.error:.2g} nats > max_log_z_error {self.max_log_z_error}"
        return LogZ(None, log_z.error, reason + " (give the target a tighter box)"), top

    def _grid_stats(self) -> tuple[LogZ, float]:
        """The integral of ``p~`` over the box (cached) and the max of ``log p~`` on its grid."""
        box = self.box
        if box is None:
            return LogZ(None, math.inf, "no box holds the mass of p~ (give one: box=(x0, x1, y0, y1))"), math.nan
        if self._integral is not None:
            return self._integral
        key = self.cache_key()
        full_key = None if key is None else (key, tuple(box), self._integration_grids())
        if full_key is not None and full_key in _GRID_CACHE:
            self._integral = _GRID_CACHE[full_key]
            return self._integral
        self._integral = self._compute_integral(box)
        if full_key is not None:
            _GRID_CACHE[full_key] = self._integral
        return self._integral

    @property
    def normaliser(self) -> LogZ:
        """``log Z`` with its error and how it was obtained (closed form, or the cached integral)."""
        if self.closed_form_log_z is not None:
            return LogZ(float(self.closed_form_log_z), 0.0, "closed form")
        return self._grid_stats()[0]

    @property
    def log_z(self) -> float | None:
        """``log Z = log int p~(x) dx`` (see :attr:`normaliser`); ``None`` when unknown."""
        return self.normaliser.value

    @property
    def log_z_is_exact(self) -> bool:
        """True when :attr:`log_z` is a closed form (not a grid integral)."""
        return self.closed_form_log_z is not None

    def numeric_log_z(self) -> float | None:
        """The grid integral of ``p~`` over :attr:`box` (even when a closed form exists)."""
        return self._grid_stats()[0].value

    # -- sampling ------------------------------------------------------------------------
    @property
    def can_sample(self) -> bool:
        """Whether :meth:`sample` works: an exact sampler, or a box to rejection-sample on."""
        return self.box is not None

    def _sample_exact(self, n: int) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws from ``p = p~ / Z`` as ``[num_samples, 2]`` on the target's device.

        Exact samplers where the target has one; otherwise rejection sampling from the uniform
        distribution on :attr:`box` with bound ``1.25 * max p~`` (max over the integration grid).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples: expected a non-negative int, got {num_samples!r}")
        exact = self._sample_exact(num_samples)
        if exact is not None:
            return exact
        box, top = self.box, self._grid_stats()[1]
        if box is None or not math.isfinite(top):
            raise ValueError(f"target: {self.name} cannot be sampled: {self.normaliser.method}")
        log_bound = top + math.log(1.25)
        anchor = self._anchor
        lo = torch.tensor([box[0], box[2]], dtype=anchor.dtype, device=anchor.device)
        span = torch.tensor([box[1] - box[0], box[3] - box[2]], dtype=anchor.dtype, device=anchor.device)
        out, have = [], 0
        while have < num_samples:
            m = max(4096, 4 * (num_samples - have))
            prop = lo + span * torch.rand(m, 2, dtype=anchor.dtype, device=anchor.device)
            accept = torch.rand(m, dtype=anchor.dtype, device=anchor.device).log() < self.log_prob(prop) - log_bound
            got = prop[accept]
            out.append(got)
            have += got.shape[0]
        return torch.cat(out)[:num_samples]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, box={self.box}"


def _sinusoid_box(t: Any) -> tuple[Box, tuple[int, int]]:
    # envelope -0.5 (|x|_4 / (20 scale))^4 < -30 beyond 20 scale 60^(1/4)
    bx = 20 * t.scale * 60**0.25
    by = min(bx, 4.0 + 8 * t.scale)
    return (-bx, bx, -by, by), (2048, 256)


def _square(b: float, grid: tuple[int, int] = (512, 512)) -> tuple[Box, tuple[int, int]]:
    return (-b, b, -b, b), grid


# normflows' 2D densities whose box (and integration grid) is known from their parameters
_NORMFLOWS_BOXES: dict[type, Callable[[Any], tuple[Box, tuple[int, int]]]] = {
    nf.distributions.TwoModes: lambda t: _square(abs(float(t.loc)) + 10 * float(t.scale)),
    nf.distributions.TwoMoons: lambda t: _square(4.0),
    nf.distributions.CircularGaussianMixture: lambda t: _square(2.0 + 7 * float(t.scale)),
    nf.distributions.RingMixture: lambda t: _square(2.0 + 8 * float(t.scale)),
    nf.distributions.Sinusoidal: _sinusoid_box,
    nf.distributions.Sinusoidal_gap: _sinusoid_box,
    nf.distributions.Sinusoidal_split: _sinusoid_box,
    nf.distributions.Smiley: lambda t: _square(2.0 + 16 * float(t.scale)),
}


def _check_box(box: Any) -> Box:
    ok = isinstance(box, (tuple, list)) and len(box) == 4
    ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in box)
    if not ok or not (box[0] < box[1] and box[2] < box[3]):
        raise ValueError(f"box: expected (x0, x1, y0, y1) with x0 < x1 and y0 < y1, got {box!r}")
    return tuple(float(b) for b in box)  # type: ignore[return-value]


def _density_device(density: Any) -> torch.device:
    if isinstance(density, torch.nn.Module):
        for t in list(density.parameters()) + list(density.buffers()):
            return t.device
    return torch.device("cpu")


class LogProbTarget(Target2D):
    """Any 2D density as a target: a normflows ``Target``/``PriorDistribution`` (``TwoModes``...),
    any object with ``log_prob(z)`` (a ``torch.distributions`` distribution, a user's module) or a
    plain callable ``z -> log p~(z)``, for ``z`` of shape ``[batch, 2]`` returning ``[batch]``.

    ``log Z`` is integrated over ``box`` on first use (cached with its error, see
    :attr:`~Target2D.normaliser`). Without a box, normflows' own targets get theirs from their
    parameters, anything else a box found from the density (:func:`find_box`); when none holds
    the mass, ``log Z`` is ``None`` and the metrics report the KL relative to it.

    Args:
        density: the density (checked on a small batch at once).
        box: ``(x0, x1, y0, y1)`` holding the mass (default: known or found).
        name: shown in tables and titles (default: the class or function name).
        log_z: the exact ``log Z`` when known (skips the integral).
        grid: the integration grid (default: 512x512, refined up to 2048x2048 until the error
            estimate is below ``max_log_z_error``).
        sampler: use ``density.sample(n)`` as an exact sampler (else rejection sampling on the box).

    Example:
        >>> import torch
        >>> from flowkit.toy2d import LogProbTarget
        >>> t = LogProbTarget(lambda z: -z.abs().sum(1), name="laplace")  # log Z = log 4
        >>> round(t.log_z, 3), t.normaliser.error < 1e-3
        (1.386, True)
    """

    def __init__(
        self,
        density: Any,
        box: Box | None = None,
        *,
        name: str | None = None,
        log_z: float | None = None,
        grid: tuple[int, int] | None = None,
        sampler: bool = False,
    ):
        super().__init__()
        fn = getattr(density, "log_prob", None)
        if fn is None and callable(density):
            fn = density
        if fn is None or not callable(fn):
            raise TypeError(
                f"target: expected an object with log_prob(z) (e.g. a normflows target) or a callable z -> log p~(z), "
                f"got {type(density).__name__}"
            )
        self.density = density  # a Module is registered (moves with .to), anything else is kept as is
        self._fn = fn
        self.name = name or getattr(density, "__name__", None) or type(density).__name__
        known = _NORMFLOWS_BOXES.get(type(density))
        known_box, known_grid = known(density) if known is not None else (None, None)
        self._given_box = _check_box(box) if box is not None else known_box
        self._found_box: Box | None = None
        self._searched = False
        self.grid = grid or known_grid or (512, 512)
        self._fixed_grid = grid is not None or known_grid is not None or box is not None
        self.closed_form_log_z = None if log_z is None else float(log_z)
        self._use_own_sampler = sampler
        self._dtype = self._probe()

    def _probe(self) -> torch.dtype | None:
        """Call the density on 3 points; returns the dtype it needs (``None``: any float)."""
        device = _density_device(self.density)
        for dtype in (torch.float64, torch.float32):
            z = torch.tensor([[0.5, -0.25], [1.0, 2.0], [-1.5, 0.75]], dtype=dtype, device=device)
            try:
                out = self._fn(z)
            except Exception as err:  # noqa: BLE001 - reported with the density's name below
                if dtype == torch.float32:
                    raise ValueError(f"target: {self.name}.log_prob(z) failed on z of shape [3, 2]: {err}") from err
                continue
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3,):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"target: {self.name}.log_prob(z) returned {got} for z of shape [3, 2]; "
                    "expected a tensor of shape [3] (one log-density per point)"
                )
            return None if dtype == torch.float64 else torch.float32
        return None

    def cache_key(self) -> tuple | None:
        fp = _fingerprint(self.density)
        return ("density", fp) if fp is not None else _object_key(self.density)

    def _integration_grids(self) -> tuple[tuple[int, int], ...]:
        if self._fixed_grid:
            return (self.grid,)
        return ((512, 512), (1024, 1024), (2048, 2048))

    @property
    def box(self) -> Box | None:  # type: ignore[override]
        """The given or known box, else one found from the density (``None``: none holds the mass)."""
        if self._given_box is not None:
            return self._given_box
        if not self._searched:
            self._found_box = find_box(self._log_prob, device=self._anchor.device)
            self._searched = True
        return self._found_box

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._dtype is not None and x.dtype != self._dtype:
            return self._fn(x.to(self._dtype)).to(x.dtype)
        return self._fn(x)

    def _sample_exact(self, n: int) -> torch.Tensor | None:
        if not self._use_own_sampler:
            return None
        return self.density.sample(n).to(self._anchor.device)


def _object_key(obj: Any) -> tuple | None:
    """A cache key for a density known only by identity (a function): ``("object", id)``, its
    cache entries dropped when the object dies (so the id is never reused for another density)."""
    key = ("object", id(obj))
    if key not in _WATCHED:
        try:
            weakref.finalize(obj, _forget, key)
        except TypeError:  # cannot be watched: cache on the target instance only
            return None
        _WATCHED.add(key)
    return key


def _forget(key: tuple) -> None:
    _WATCHED.discard(key)
    for k in [k for k in _GRID_CACHE if k[0] == key]:
        del _GRID_CACHE[k]


class GaussianTarget(Target2D):
    """``log p~(x) = -0.5 (x - m)^T S^-1 (x - m)``; ``log Z = log(2 pi) + 0.5 log det S``."""

    mean: torch.Tensor  # buffer
    chol: torch.Tensor  # buffer

    def __init__(self, mean=(0.0, 0.0), cov=((1.0, 0.0), (0.0, 1.0))):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if mean.shape != (2,) or cov.shape != (2, 2):
            raise ValueError(
                f"mean/cov: expected shapes (2,) and (2, 2), got {tuple(mean.shape)} and {tuple(cov.shape)}"
            )
        if not torch.allclose(cov, cov.T) or torch.linalg.eigvalsh(cov).min() <= 0:
            raise ValueError(f"cov: expected a symmetric positive-definite 2x2 matrix, got {cov.tolist()}")
        self.name = "gaussian"
        self.register_buffer("mean", mean.float())
        self.register_buffer("chol", torch.linalg.cholesky(cov).float())
        self._key = (tuple(mean.tolist()), tuple(cov.reshape(-1).tolist()))
        self.closed_form_log_z = math.log(2 * math.pi) + 0.5 * float(torch.logdet(cov))
        sd = torch.sqrt(torch.diagonal(cov)) * 8
        self.box = (float(mean[0] - sd[0]), float(mean[0] + sd[0]), float(mean[1] - sd[1]), float(mean[1] + sd[1]))

    def cache_key(self) -> tuple:
        return ("gaussian", self._key)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d = (x - self.mean.to(x.dtype)).unsqueeze(-1)
        y = torch.linalg.solve_triangular(self.chol.to(x.dtype), d, upper=False)
        return -0.5 * y.squeeze(-1).pow(2).sum(1)

    def _sample_exact(self, n: int) -> torch.Tensor:
        eps = torch.randn(n, 2, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + eps @ self.chol.T


class EightGaussians(Target2D):
    """Equal mixture of 8 isotropic Gaussians (std ``std``) on a circle of radius ``radius``.

    Normalised, so ``log Z = 0``. (FFJORD's "8gaussians": radius 2*sqrt(2), std 0.5/sqrt(2).)
    """

    name = "eight-gaussians"

    centers: torch.Tensor  # buffer

    def __init__(self, radius: float = 2 * math.sqrt(2), std: float = 0.5 / math.sqrt(2)):
        super().__init__()
        ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        self.register_buffer("centers", (radius * torch.stack([ang.cos(), ang.sin()], 1)).float())
        self.radius, self.std = float(radius), float(std)
        self.closed_form_log_z = 0.0
        b = radius + 7 * std
        self.box = (-b, b, -b, b)

    def cache_key(self) -> tuple:
        return (self.name, self.radius, self.std)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (x.unsqueeze(1) - self.centers.to(x.dtype)).pow(2).sum(-1)
        return torch.logsumexp(-0.5 * d2 / self.std**2, 1) - math.log(8 * 2 * math.pi * self.std**2)

    def _sample_exact(self, n: int) -> torch.Tensor:
        k = torch.randint(0, 8, (n,), device=self.centers.device)
        return self.centers[k] + self.std * torch.randn(n, 2, dtype=self.centers.dtype, device=self.centers.device)


class Banana(Target2D):
    """Twisted Gaussian: ``x1 ~ N(0, 1)``, ``x2 | x1 ~ N(b (x1^2 - 1), s^2)``.

    ``log p~(x) = -x1^2 / 2 - (x2 - b (x1^2 - 1))^2 / (2 s^2)``; ``log Z = log(2 pi s)``.
    """

    name = "banana"

    def __init__(self, curvature: float = 0.5, scale: float = 0.5):
        super().__init__()
        self.b, self.s = float(curvature), float(scale)
        self.closed_form_log_z = math.log(2 * math.pi * self.s)
        # x1 within +-6; x2 within b*(36-1) .. -b plus 7 s
        self.box = (-6.0, 6.0, -self.b - 7 * self.s, 35 * self.b + 7 * self.s)
        self.grid = (512, 1024)

    def cache_key(self) -> tuple:
        return (self.name, self.b, self.s)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        return -0.5 * x1.pow(2) - 0.5 * ((x2 - self.b * (x1.pow(2) - 1)) / self.s).pow(2)

    def _sample_exact(self, n: int) -> torch.Tensor:
        a = self._anchor
        x1 = torch.randn(n, dtype=a.dtype, device=a.device)
        x2 = self.b * (x1.pow(2) - 1) + self.s * torch.randn(n, dtype=a.dtype, device=a.device)
        return torch.stack([x1, x2], 1)


class Checkerboard(Target2D):
    """Uniform density on the 8 dark squares of a 4x4 board on ``[-4, 4]^2``.

    Outside a dark square the density falls off as ``exp(-d^2 / (2 edge^2))`` with ``d`` the
    distance to the nearest dark square, so reverse KL stays finite. ``log Z`` by grid.
    """

    name = "checkerboard"

    lower: torch.Tensor  # buffer

    def __init__(self, edge: float = 0.1):
        super().__init__()
        if edge <= 0:
            raise ValueError(f"edge: expected a positive width, got {edge}")
        self.edge = float(edge)
        b = 4.0 + 8 * self.edge
        self.box = (-b, b, -b, b)
        # lower-left corners of the dark 2x2 squares (cell (a, b) is dark when a + b is even)
        dark = [[-4.0 + 2 * a, -4.0 + 2 * b] for a in range(4) for b in range(4) if (a + b) % 2 == 0]
        self.register_buffer("lower", torch.tensor(dark))

    def cache_key(self) -> tuple:
        return (self.name, self.edge)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.lower.to(x.dtype)
        gap = (lo - x.unsqueeze(1)).clamp(min=0) + (x.unsqueeze(1) - lo - 2).clamp(min=0)  # [B, 8, 2]
        d2 = gap.pow(2).sum(-1).min(1).values
        return -0.5 * d2 / self.edge**2


class RingMixtureTarget(LogProbTarget):
    """normflows ``RingMixture``: ``p~(x) = sum_i exp(-(|x| - r_i)^2 / (2 s^2))``, ``r_i = 2i/n``.

    Closed form: ``Z = sum_i 2 pi (s^2 exp(-r_i^2 / (2 s^2)) + r_i s sqrt(2 pi) Phi(r_i / s))``.
    """

    def __init__(self, n_rings: int = 2):
        target = nf.distributions.RingMixture(n_rings=n_rings)
        s = target.scale
        z = 0.0
        for i in range(n_rings):
            r = 2 / n_rings * (i + 1)
            phi = 0.5 * (1 + math.erf(r / s / math.sqrt(2)))
            z += 2 * math.pi * (s**2 * math.exp(-(r**2) / (2 * s**2)) + r * s * math.sqrt(2 * math.pi) * phi)
        super().__init__(target, name="ring-mixture", log_z=math.log(z))


def _normflows(name: str, cls: type, sampler: bool = False, log_z: float | None = None) -> Callable[..., Target2D]:
    """A registry factory: ``cls(**kwargs)`` wrapped under ``name``."""

    def make(*args: Any, **kwargs: Any) -> Target2D:
        return LogProbTarget(cls(*args, **kwargs), name=name, sampler=sampler, log_z=log_z)

    make.__doc__ = f"normflows ``{cls.__name__}`` as the target {name!r}."
    return make


_REGISTRY: dict[str, Callable[..., Target2D]] = {}


def register_target(name: str, factory: Callable[..., Target2D]) -> None:
    """Add ``factory(**kwargs) -> Target2D`` to the registry under the kebab-case ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"name: a target called {name!r} is already registered")
    _REGISTRY[name] = factory


def _two_modes(loc: float = 2.0, scale: float = 0.1) -> Target2D:
    return LogProbTarget(nf.distributions.TwoModes(loc, scale), name="two-modes")


def _circular_gmm(n_modes: int = 8) -> Target2D:
    t = nf.distributions.CircularGaussianMixture(n_modes=n_modes)
    return LogProbTarget(t, name="circular-gmm", sampler=True, log_z=0.0)


def _sinusoid(cls: type, name: str) -> Callable[..., Target2D]:
    def make(scale: float = 0.4, period: float = 4.0) -> Target2D:
        return LogProbTarget(cls(scale, period), name=name)

    return make


_BUILTIN: list[tuple[str, Callable[..., Target2D]]] = [
    ("two-modes", _two_modes),
    ("two-moons", _normflows("two-moons", nf.distributions.TwoMoons)),
    ("circular-gmm", _circular_gmm),
    ("ring-mixture", RingMixtureTarget),
    ("sinusoidal", _sinusoid(nf.distributions.Sinusoidal, "sinusoidal")),
    ("sinusoidal-gap", _sinusoid(nf.distributions.Sinusoidal_gap, "sinusoidal-gap")),
    ("sinusoidal-split", _sinusoid(nf.distributions.Sinusoidal_split, "sinusoidal-split")),
    ("smiley", lambda scale=0.1: LogProbTarget(nf.distributions.Smiley(scale), name="smiley")),
    ("eight-gaussians", EightGaussians),
    ("banana", Banana),
    ("checkerboard", Checkerboard),
    ("gaussian", GaussianTarget),
]
for _name, _factory in _BUILTIN:
    register_target(_name, _factory)


def list_targets() -> list[str]:
    """Names accepted by :func:`get_target`."""
    return sorted(_REGISTRY)


_OPEN_DOOR = (
    "or pass the density itself: a Target2D, a normflows target or any object with log_prob(z), "
    "or a callable z -> log p~(z) (flowkit.toy2d.LogProbTarget wraps the last two)"
)


def get_target(name: str | Target2D, **kwargs: Any) -> Target2D:
    """Build a registered target, e.g. ``get_target("two-modes", loc=2.0, scale=0.1)``.

    A :class:`Target2D` passed as ``name`` is returned unchanged (kwargs must be empty).
    """
    if isinstance(name, Target2D):
        if kwargs:
            raise ValueError(f"kwargs: a ready Target2D takes no keyword arguments, got {sorted(kwargs)}")
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name: unknown target {name!r}; expected one of {', '.join(list_targets())}, {_OPEN_DOOR}")
    return _REGISTRY[name](**kwargs)


def as_target(target: Any, *, box: Box | None = None) -> Target2D:
    """Any target as a :class:`Target2D`: a registered name, a ``Target2D`` (returned as is), a
    normflows target or any object with ``log_prob(z)``, or a callable ``z -> log p~(z)`` (the
    last two wrapped in :class:`LogProbTarget`, with ``box`` if given).

    Raises:
        ValueError: an unknown name, or a density that fails on a small batch.
        TypeError: anything else.
    """
    if isinstance(target, (Target2D, str)):
        if box is not None:
            raise ValueError(f"box: {target!r} has its own box; pass box only with a density to wrap")
        if isinstance(target, str) and target not in _REGISTRY:
            raise ValueError(
                f"target: unknown target {target!r}; expected one of {', '.join(list_targets())}, {_OPEN_DOOR}"
            )
        return get_target(target)
    if hasattr(target, "log_prob") or callable(target):
        return LogProbTarget(target, box)
    raise TypeError(
        f"target: expected a registered name ({', '.join(list_targets())}), a Target2D, a normflows target or any "
        f"object with log_prob(z), or a callable z -> log p~(z) (flowkit.toy2d.LogProbTarget wraps the last two); "
        f"got {type(target).__name__}"
    )
