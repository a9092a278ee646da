"""Unnormalised 2D target densities ``p~(x)`` with a known log normaliser ``log Z``.

A :class:`Target2D` gives ``log_prob(x) = log p~(x)`` for ``x`` of shape ``[B, 2]`` (on any
device, in any float dtype), the box ``(x0, x1, y0, y1)`` that holds its mass, ``log_z``
(closed form where one exists, otherwise a midpoint-rule integral of ``p~`` on a fine grid over
the box, cached) and ``sample(n)`` (exact where a sampler exists, otherwise rejection sampling
on the box). With ``log Z`` the reverse KL ``E_q[log q - log p~] + log Z`` is exact up to the
integration error (tested against the closed forms).

The registry wraps normflows' 2D targets (``two-modes``, ``two-moons``, ``circular-gmm``,
``ring-mixture``, ``sinusoidal``, ``sinusoidal-gap``, ``sinusoidal-split``, ``smiley``) and
adds ``eight-gaussians``, ``banana``, ``checkerboard`` and ``gaussian``.

Example:
    >>> from flowkit.toy2d import get_target
    >>> t = get_target("two-modes")
    >>> round(t.log_z, 3)
    0.804
"""

from __future__ import annotations

import math
from collections.abc import Callable

import normflows as nf
import torch

__all__ = [
    "Target2D",
    "NormflowsTarget",
    "GaussianTarget",
    "EightGaussians",
    "Banana",
    "Checkerboard",
    "RingMixtureTarget",
    "get_target",
    "list_targets",
    "register_target",
    "grid_log_z",
]

Box = tuple[float, float, float, float]

# (class name, box, grid, parameters) -> (log Z, max log p~ on the grid)
_GRID_CACHE: dict[tuple, tuple[float, float]] = {}


def _grid_points(box: Box, grid: tuple[int, int], dtype, device) -> tuple[torch.Tensor, float]:
    """Midpoints of a ``grid[0] x grid[1]`` grid over ``box``, as ``[N, 2]``; and the cell area."""
    x0, x1, y0, y1 = box
    nx, ny = grid
    hx, hy = (x1 - x0) / nx, (y1 - y0) / ny
    xs = x0 + hx * (torch.arange(nx, dtype=dtype, device=device) + 0.5)
    ys = y0 + hy * (torch.arange(ny, dtype=dtype, device=device) + 0.5)
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), hx * hy


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
    pts, area = _grid_points(box, grid, dtype, device)
    lse, mx = [], []
    for i in range(0, pts.shape[0], chunk):
        lp = log_prob(pts[i : i + chunk]).to(dtype)
        lse.append(torch.logsumexp(lp, 0))
        mx.append(lp.max())
    return float(torch.logsumexp(torch.stack(lse), 0)) + math.log(area), float(torch.stack(mx).max())


class Target2D(torch.nn.Module):
    """Base class: an unnormalised density ``p~`` on R^2 with its ``log Z``.

    Subclasses implement :meth:`_log_prob`; they may set ``closed_form_log_z`` (a float) and
    override :meth:`_sample_exact`. ``box`` must hold all but a negligible part of the mass.
    Move a target with ``.to(device)``: samples are drawn on that device.
    """

    name: str = "target"
    box: Box = (-3.0, 3.0, -3.0, 3.0)
    grid: tuple[int, int] = (512, 512)
    closed_form_log_z: float | None = None

    def __init__(self) -> None:
        super().__init__()
        # decides the device/dtype of samples; follows .to()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

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
    def cache_key(self) -> tuple:
        """Identifies the density (class and parameters) for the ``log Z`` cache."""
        return (type(self).__name__, self.name)

    def _grid_stats(self) -> tuple[float, float]:
        key = (self.cache_key(), tuple(self.box), tuple(self.grid))
        if key not in _GRID_CACHE:
            _GRID_CACHE[key] = grid_log_z(self.log_prob, self.box, self.grid, device=self._anchor.device)
        return _GRID_CACHE[key]

    @property
    def log_z(self) -> float:
        """``log Z = log int p~(x) dx``: closed form if known, else the cached grid integral."""
        if self.closed_form_log_z is not None:
            return float(self.closed_form_log_z)
        return self._grid_stats()[0]

    @property
    def log_z_is_exact(self) -> bool:
        """True when :attr:`log_z` is a closed form (not a grid integral)."""
        return self.closed_form_log_z is not None

    def numeric_log_z(self) -> float:
        """The grid integral of ``p~`` over :attr:`box` (even when a closed form exists)."""
        return self._grid_stats()[0]

    # -- sampling ------------------------------------------------------------------------
    @property
    def can_sample(self) -> bool:
        return True

    def _sample_exact(self, n: int) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws from ``p = p~ / Z`` as ``[num_samples, 2]`` on the target's device.

        Exact samplers where the target has one; otherwise rejection sampling from the uniform
        distribution on :attr:`box` with bound ``1.25 * max p~`` (max over the integration grid).
        """
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples: expected a non-negative int, got {num_samples!r}")
        exact = self._sample_exact(num_samples)
        if exact is not None:
            return exact
        log_bound = self._grid_stats()[1] + math.log(1.25)
        x0, x1, y0, y1 = self.box
        anchor = self._anchor
        lo = torch.tensor([x0, y0], dtype=anchor.dtype, device=anchor.device)
        span = torch.tensor([x1 - x0, y1 - y0], dtype=anchor.dtype, device=anchor.device)
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


class NormflowsTarget(Target2D):
    """A normflows 2D target (``nf.distributions.TwoModes`` etc.) with a box and a cache key."""

    def __init__(
        self,
        name: str,
        target,
        box: Box,
        params: dict,
        grid: tuple[int, int] = (512, 512),
        log_z: float | None = None,
        sampler: bool = False,
    ):
        super().__init__()
        self.name = name
        self.target = target  # a Module is registered (moves with .to), a PriorDistribution is not
        self.box = tuple(float(b) for b in box)
        self.grid = grid
        self.params = dict(params)
        self.closed_form_log_z = log_z
        self._use_own_sampler = sampler

    def cache_key(self) -> tuple:
        return (type(self.target).__name__, tuple(sorted(self.params.items())))

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.log_prob(x)

    def _sample_exact(self, n: int) -> torch.Tensor | None:
        if not self._use_own_sampler:
            return None
        return self.target.sample(n).to(self._anchor.device)


class GaussianTarget(Target2D):
    """``log p~(x) = -0.5 (x - m)^T S^-1 (x - m)``; ``log Z = log(2 pi) + 0.5 log det S``."""

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


class RingMixtureTarget(NormflowsTarget):
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
        b = 2.0 + 8 * s
        super().__init__("ring-mixture", target, (-b, b, -b, b), {"n_rings": n_rings}, log_z=math.log(z))


def _two_modes(loc: float = 2.0, scale: float = 0.1) -> Target2D:
    b = abs(loc) + 10 * scale
    return NormflowsTarget(
        "two-modes", nf.distributions.TwoModes(loc, scale), (-b, b, -b, b), {"loc": loc, "scale": scale}
    )


def _two_moons() -> Target2D:
    return NormflowsTarget("two-moons", nf.distributions.TwoMoons(), (-4.0, 4.0, -4.0, 4.0), {})


def _circular_gmm(n_modes: int = 8) -> Target2D:
    t = nf.distributions.CircularGaussianMixture(n_modes=n_modes)
    b = 2.0 + 7 * float(t.scale)
    return NormflowsTarget("circular-gmm", t, (-b, b, -b, b), {"n_modes": n_modes}, log_z=0.0, sampler=True)


def _sinusoid(cls, name):
    def make(scale: float = 0.4, period: float = 4.0) -> Target2D:
        # envelope -0.5 (|x|_4 / (20 scale))^4 < -30 beyond 20 scale 60^(1/4)
        bx = 20 * scale * 60**0.25
        by = min(bx, 4.0 + 8 * scale)
        return NormflowsTarget(
            name, cls(scale, period), (-bx, bx, -by, by), {"scale": scale, "period": period}, grid=(2048, 256)
        )

    return make


def _smiley(scale: float = 0.1) -> Target2D:
    b = 2.0 + 16 * scale
    return NormflowsTarget("smiley", nf.distributions.Smiley(scale), (-b, b, -b, b), {"scale": scale})


_REGISTRY: dict[str, Callable[..., Target2D]] = {}


def register_target(name: str, factory: Callable[..., Target2D]) -> None:
    """Add ``factory(**kwargs) -> Target2D`` to the registry under the kebab-case ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"name: a target called {name!r} is already registered")
    _REGISTRY[name] = factory


for _name, _factory in [
    ("two-modes", _two_modes),
    ("two-moons", _two_moons),
    ("circular-gmm", _circular_gmm),
    ("ring-mixture", RingMixtureTarget),
    ("sinusoidal", _sinusoid(nf.distributions.Sinusoidal, "sinusoidal")),
    ("sinusoidal-gap", _sinusoid(nf.distributions.Sinusoidal_gap, "sinusoidal-gap")),
    ("sinusoidal-split", _sinusoid(nf.distributions.Sinusoidal_split, "sinusoidal-split")),
    ("smiley", _smiley),
    ("eight-gaussians", EightGaussians),
    ("banana", Banana),
    ("checkerboard", Checkerboard),
    ("gaussian", GaussianTarget),
]:
    register_target(_name, _factory)


def list_targets() -> list[str]:
    """Names accepted by :func:`get_target`."""
    return sorted(_REGISTRY)


def get_target(name: str | Target2D, **kwargs) -> Target2D:
    """Build a registered target, e.g. ``get_target("two-modes", loc=2.0, scale=0.1)``.

    A :class:`Target2D` passed as ``name`` is returned unchanged (kwargs must be empty).
    """
    if isinstance(name, Target2D):
        if kwargs:
            raise ValueError(f"kwargs: a ready Target2D takes no keyword arguments, got {sorted(kwargs)}")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown target {name!r}; expected one of {', '.join(list_targets())}")
    return _REGISTRY[name](**kwargs)
