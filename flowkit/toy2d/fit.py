"""Reverse-KL fit of a normflows model to a 2D target, in one short loop.

Each step draws ``x, log q(x) = model.sample(batch_size)`` and minimises
``loss = mean(log q(x)) - beta_t * mean(log p~(x))`` with ``beta_t = min(1, 0.01 + t / anneal_iters)``
(the seed's annealing; Rezende & Mohamed, 2015). By default the gradient is the
sticking-the-landing path derivative (Roeder et al., 2017), whose noise vanishes as ``q -> p``.
Reverse KL ends in a seed-dependent local optimum (on TwoModes: how the mass splits between the
two modes; one Planar run ends anywhere between KL 0.07 and 0.46), so by default 8 random
restarts train together as one vmapped model until the annealing ends, the 2 with the lowest
exact KL go on, and the best state seen is returned (see :data:`PRESETS`). For importance
sampling, ``refine`` then appends spline couplings that start as the identity and polishes all
layers by the chi^2 divergence (the ``strong`` preset: ESS >= 0.95 on TwoModes). The loss history
stays on the device and is fetched once per ``sync_every`` steps (progress bar, non-finite
check, scores, snapshots), so the loop never waits for the device in between.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from flowkit.errors import NonFiniteLossError
from flowkit.toy2d.flows import IDENTITY_KINDS, build_flow, extend_flow
from flowkit.toy2d.targets import Target2D, get_target

__all__ = ["FitResult", "PRESETS", "REFINE", "fit", "refine_spec"]

# Chosen by measurement: TwoModes, exact KL / ESS from 100k samples after fit(seed=s), 1 thread per
# run, 2 runs at a time on 2 CPU cores (scripts in the closing note of issue 5).
# "fast" (fit()'s and `flowkit fit2d`'s defaults): the seed's 16 Planar flows, 8 restarts, keep 2,
# keep_best, 2000 steps of 512, lr 1e-2, annealing over 800 steps: KL 0.061 / 0.065 / 0.057 / 0.040 /
# 0.093 / 0.032 / 0.092 / 0.097 nats on seeds 0-7 (all <= 0.10; ESS 0.93 / 0.93 / 0.88 / 0.96 / 0.90
# / 0.96 / 0.88 / 0.14, the last a heavy-tailed weight estimate). Without restarts the same 16 Planar
# flows ended at 0.07-0.46 (3000 steps at lr 5e-3: 0.073 / 0.106 / 0.113 / 0.155 / 0.193 / 0.456 /
# 0.093 on seeds 0-6); choosing 1 of 8 restarts at the end of the annealing: 0.138 / 0.065 / 0.042 /
# 0.086 / 0.049 and once 0.160 (keep 1 + keep_best), hence keep 2; 16 restarts were no better
# (0.044 / 0.056 / 0.072 / 0.063) and slower.
# "strong": the fast fit, then refine=REFINE: 2 nflows rational-quadratic spline couplings (hidden
# 32, 8 bins) appended as the identity, all layers trained 1500 more steps at lr 1e-3 (cosine),
# the last 800 a chi^2 (ESS) polish on batches of 2048: ESS 0.956 / 0.971 / 0.979 / 0.988 / 0.988 /
# 0.989 / 0.985 / 0.950 / 0.960 / 0.982 and KL 0.046 / 0.038 / 0.023 / 0.013 / 0.023 / 0.015 / 0.012 /
# 0.042 / 0.043 / 0.028 on seeds 0-9 (all ESS >= 0.95, median 0.98), 160-180 s each. What limits
# the worst seeds is the mass split the Planar stage leaves (seed 0: 43/57, which alone caps the
# ESS at 0.98): no local gradient moves mass across the gap between the modes. Tried, no better on
# seed 0: 4 spline layers (0.967), hidden 64 (0.957), 16 bins (0.961), 2500 refine steps (0.963),
# lr 2e-3 (0.928). A spline stack fitted from scratch drops a mode (KL 0.69 with ESS 0.999 on
# seeds 0 and 1: read ESS with the KL). The earlier strong preset, 32 Planar flows + the chi^2
# polish, reached ESS 0.970 / 0.940 / 0.774 / 0.958 (seeds 4 / 1 / 2 / 0) in ~200 s; tried with
# it and worse or no better: 16 Planar + the polish (0.912, 0.935), lr 5e-3 (0.913, 0.764), a
# slower annealing (0.906, 0.902), no polish (0.946, 0.416, 0.971).
# "seed" is the seed loop's settings. See benchmarks/bench_fit2d.py for the timing against the
# seed's loop and benchmarks/seeds_fit2d.py for the spread over seeds.
REFINE: dict = dict(
    flow="nflows-spline",
    layers=2,
    flow_kwargs=dict(hidden=32),
    iters=1500,
    batch_size=512,
    lr=1e-3,
    anneal_iters=0,
    chi2_from=700,
    late_batch_size=2048,
    late_from=700,
)
PRESETS: dict[str, dict] = {
    "fast": dict(
        flow="planar",
        layers=16,
        iters=2000,
        batch_size=512,
        lr=1e-2,
        anneal_iters=800,
        weight_decay=0.0,
        gradient="path",
        restarts=8,
        keep=2,
        keep_best=True,
    ),
    "strong": dict(
        flow="planar",
        layers=16,
        iters=2000,
        batch_size=512,
        lr=1e-2,
        anneal_iters=800,
        weight_decay=0.0,
        gradient="path",
        restarts=8,
        keep=2,
        keep_best=True,
        refine=REFINE,
    ),
    "seed": dict(
        flow="planar",
        layers=16,
        iters=20000,
        batch_size=40,
        lr=1e-3,
        anneal_iters=10000,
        weight_decay=1e-4,
        schedule="constant",
        gradient="total",
        restarts=1,
        keep_best=False,
    ),
}


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the fitted model, the loss per step and the snapshots."""

    model: torch.nn.Module
    loss: np.ndarray
    seconds: float
    snapshots: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)
    restart: int = 0
    restart_scores: np.ndarray | None = None
    best_step: int | None = None
    refined_from: int | None = None  # with ``refine``: the first step of the refine stage

    def __iter__(self):  # model, loss = fit(...)
        return iter((self.model, self.loss))


def _lr_factor(schedule: str, iters: int, warmup: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "cosine":  # short linear warm-up, then cosine decay to 1% of lr

        def f(t: int) -> float:
            if t < warmup:
                return (t + 1) / warmup
            p = (t - warmup) / max(1, iters - warmup)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))

        return f
    raise ValueError(f"schedule: expected 'cosine' or 'constant', got {schedule!r}")


class _Single:
    """One normflows model behind the interface :class:`_Stacked` also has."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def draw(self, n: int) -> torch.Tensor:
        return self.model.q0(n)[0]

    def push(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _push(self.model, z0)

    def export(self, i: int = 0) -> torch.nn.Module:
        return self.model


def _push(model: torch.nn.Module, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = f_K(...f_1(z0))`` and ``log q(x) = log q0(z0) - sum log|det|`` (normflows' ``sample``)."""
    log_q = model.q0.log_prob(z0)
    x = z0
    for flow in model.flows:
        x, log_det = flow(x)
        log_q = log_q - log_det
    return x, log_q


class _Calls(torch.nn.Module):
    """``forward`` runs one of ``model``'s sampling paths, for ``torch.func.functional_call``."""

    def __init__(self, model: torch.nn.Module, what: str):
        super().__init__()
        self.m, self.what = model, what

    def forward(self, arg):
        return self.m.q0(arg)[0] if self.what == "draw" else _push(self.m, arg)


class _Stacked:
    """``len(models)`` models of one architecture trained in lockstep (random restarts).

    Their parameters are stacked along a new leading dimension and the model runs once per step
    under ``torch.func.vmap``, so the Python overhead of the (small) flow is paid once, not once
    per restart: 8 stacked 16-layer Planar models cost ~1.9x one model per step on a CPU core
    (48.6 vs 25.0 ms per path-gradient step of 512 samples).
    Models that ``vmap`` cannot run (data-dependent indexing, e.g. spline bins) run one after
    the other instead (``vectorized`` is False). Each restart keeps its own Adam state (Adam is
    element-wise), so the restarts do not interact.
    """

    def __init__(self, models: list[torch.nn.Module]):
        from torch.func import functional_call, stack_module_state, vmap

        self.models = models
        params, buffers = stack_module_state(models)
        self.params = {f"m.{k}": v for k, v in params.items()}
        self.buffers = {f"m.{k}": v for k, v in buffers.items()}
        template = copy.deepcopy(models[0]).to("meta")
        draw, push = _Calls(template, "draw"), _Calls(template, "push")
        self._draw = lambda n: vmap(lambda p, b: functional_call(draw, (p, b), (n,)), randomness="different")(
            self.params, self.buffers
        )
        self._push = vmap(lambda p, b, z: functional_call(push, (p, b), (z,)))
        self.vectorized = True
        try:
            with torch.no_grad():
                self.push(self.draw(2))
        except Exception:  # noqa: BLE001 - anything vmap rejects: fall back to a plain loop
            self.vectorized = False
            self.params = {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.named_parameters()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def draw(self, n: int) -> torch.Tensor:
        if not self.vectorized:
            return torch.stack([m.q0(n)[0] for m in self.models])
        return self._draw(n)

    def push(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.vectorized:
            xs, log_qs = zip(*(_push(m, z) for m, z in zip(self.models, z0, strict=False)), strict=False)
            return torch.stack(xs), torch.stack(log_qs)
        return self._push(self.params, self.buffers, z0)

    def state_of(self, name: str, i: int, opt: torch.optim.Optimizer) -> dict:
        """Restart ``i``'s optimizer state for its parameter ``name``."""
        if not self.vectorized:
            return opt.state.get(self.params[f"{i}.{name}"], {})
        state = opt.state.get(self.params[f"m.{name}"], {})
        return {k: (v[i].clone() if v.dim() > 0 else v.clone()) for k, v in state.items()}

    @torch.no_grad()
    def export(self, i: int) -> torch.nn.Module:
        """Restart ``i`` as its own model (its module, with the current parameters copied in)."""
        model = self.models[i]
        if self.vectorized:
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                t.copy_((self.params[f"m.{name}"] if f"m.{name}" in self.params else self.buffers[f"m.{name}"])[i])
        return model


def _log_p(target: Target2D, x: torch.Tensor) -> torch.Tensor:
    """``log p~(x)`` for ``x`` of shape ``[..., batch, d]`` (the target takes ``[batch, d]``)."""
    return target.log_prob(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


def _loss(
    runner, target: Target2D, n: int, beta: float, path: bool, chi2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The annealed reverse-KL loss ``mean(log q(x) - beta log p~(x))`` per model (``[]`` or ``[restarts]``).

    With ``path``, the sticking-the-landing surrogate (Roeder et al., 2017):
    ``grad = (dx/dphi)^T g``, ``g = d/dx [log q(x) - beta log p~(x)]`` with the parameters held
    fixed, so the score term ``E_q[grad_phi log q]`` (zero in expectation, but the main noise
    near the optimum) is dropped. ``grad_x log q`` needs no inverse: ``grad_x log q = J^-T
    grad_z0 log q`` with ``J = dx/dz0`` from ``d`` backward passes (cheap in 2D), so it works for
    non-invertible flows (tanh Planar) too.

    With ``chi2``, the first is ``log mean(w^2)``, ``w = p~(x)^beta / q(x)`` (reparameterised): the
    chi^2 divergence ``E_q[w^2] / E_q[w]^2 = 1 + chi^2(p||q) = 1 / ESS`` up to ``2 log Z``, so
    minimising it maximises the effective sample size (Dieng et al., 2017); the loss value
    reported stays the KL loss.

    Returns:
        ``(to_backprop, loss)``: backpropagate the sum of the first; the second is the loss value.
    """
    z0 = runner.draw(n)
    if path and not z0.requires_grad:  # a fixed base: z0 is a leaf
        z0.requires_grad_(True)
    x, log_q = runner.push(z0)
    if chi2:
        log_w = beta * _log_p(target, x) - log_q
        return torch.logsumexp(2 * log_w, -1) - math.log(n), -log_w.detach().mean(-1)
    if not path:
        loss = (log_q - beta * _log_p(target, x)).mean(-1)
        return loss, loss.detach()
    g_z0 = torch.autograd.grad(log_q.sum(), z0, retain_graph=True)[0]
    rows = [torch.autograd.grad(x[..., i].sum(), z0, retain_graph=True)[0] for i in range(x.shape[-1])]
    jac = torch.stack(rows, -2)  # jac[..., b, i, j] = dx_i / dz0_j
    g_q = torch.linalg.solve_ex(jac.transpose(-1, -2), g_z0.unsqueeze(-1))[0].squeeze(
        -1
    )  # no raise: a singular J shows as a non-finite loss
    x_fixed = x.detach().requires_grad_(True)
    log_p = _log_p(target, x_fixed)
    g_p = torch.autograd.grad(log_p.sum(), x_fixed)[0]
    surrogate = (x * (g_q - beta * g_p)).sum(-1).mean(-1)
    return surrogate, (log_q.detach() - beta * log_p.detach()).mean(-1)


def fit(  # noqa: C901 (split into stages: issue 13)
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    target: Target2D | str = "two-modes",
    *,
    iters: int = PRESETS["fast"]["iters"],
    batch_size: int = PRESETS["fast"]["batch_size"],
    lr: float = PRESETS["fast"]["lr"],
    anneal_iters: int | None = PRESETS["fast"]["anneal_iters"],
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    gradient: str = "path",
    path_from: int = 0,
    late_batch_size: int | None = None,
    late_from: int | None = None,
    restarts: int | None = None,
    select_at: int | None = None,
    select_samples: int = 8192,
    keep: int = PRESETS["fast"]["keep"],
    keep_best: bool = PRESETS["fast"]["keep_best"],
    chi2_from: int | None = None,
    refine: dict | bool | None = None,
    device: torch.device | str | None = None,
    seed: int | None = 0,
    progress: bool = True,
    sync_every: int = 100,
    snapshot_every: int = 0,
    snapshot_samples: int = 20_000,
    callback: Callable[[int, torch.nn.Module, np.ndarray], None] | None = None,
) -> FitResult:
    """Fit ``model`` to ``target`` by (annealed) reverse KL with Adam.

    Args:
        model: a normflows ``NormalizingFlow`` (``sample(n) -> (x, log q)``), or a zero-argument
            builder of one (needed for ``restarts > 1``, called after seeding); default: the
            seed's 16 Planar flows on a trainable ``DiagGaussian(2)``.
        target: a :class:`~flowkit.toy2d.targets.Target2D` or a registered name.
        iters: optimisation steps.
        batch_size: samples from ``q`` per step.
        lr: Adam learning rate (peak, with ``schedule="cosine"``).
        anneal_iters: ``beta_t = min(1, 0.01 + t / anneal_iters)``; ``None`` or 0: ``beta = 1``.
        weight_decay: Adam weight decay (the seed used 1e-4).
        schedule: ``"cosine"`` (warm-up over 2% of the steps, decay to 1% of ``lr``) or
            ``"constant"``.
        gradient: ``"path"``: the sticking-the-landing path derivative (Roeder et al., 2017;
            drops the zero-mean score term, so the noise vanishes as ``q -> p``; needs a
            reparameterised base with ``log_prob``); ``"total"``: the plain reparameterised
            gradient of the loss (the seed's).
        path_from: with ``gradient="path"``, the steps before this one use the total gradient
            (e.g. while annealing), the rest the path gradient.
        late_batch_size: batch size from step ``late_from`` on (default: ``batch_size``); a
            larger late batch polishes the fit at ``beta = 1``.
        late_from: first step of ``late_batch_size`` (default: ``path_from``).
        restarts: random restarts (models from the builder; default 8 when ``fit`` builds the
            models, 1 for a model instance) trained together until
            ``select_at``; vectorised with ``torch.func.vmap`` where the model allows (Planar,
            Radial), else run one after the other. Reverse KL ends in a seed-dependent local
            optimum (on TwoModes: the two modes' weights), so picking the lowest KL among
            restarts is what makes a fit reliable.
        select_at: the step at which the ``keep`` restarts with the lowest reverse KL (scored on
            ``select_samples`` fresh samples; non-finite ones never) go on; default: the end of
            the annealing.
        select_samples: samples per score (the score ``mean(log q - log p~)`` is ``KL - log Z``).
        keep: restarts that go on after ``select_at``; the best of them is returned.
        keep_best: score the kept restarts every ``sync_every`` steps from ``select_at`` on and
            return the best (restart, step) seen, not the last step (by KL; by ESS during the
            ``chi2_from`` polish, where only polished states compete).
        chi2_from: from this step on minimise ``log E_q[w^2]`` (the chi^2 divergence, i.e.
            maximise the effective sample size) instead of the reverse KL; a polish after the
            reverse KL has found the modes. The kept restart with the lowest KL is polished
            (ESS alone cannot see a lost mode).
        refine: after the fit, append layers that start as the identity
            (:func:`~flowkit.toy2d.flows.extend_flow`) and fit again from the fitted model, all
            parameters together. ``True``: :data:`REFINE` (2 nflows spline couplings, 1500 steps
            at lr 1e-3, the chi^2 polish from its step 700 on batches of 2048); a dict overrides
            those: ``flow``, ``layers``, ``flow_kwargs`` and this function's ``iters``,
            ``batch_size``, ``lr``, ``anneal_iters`` (0: the target is reached already),
            ``weight_decay``, ``schedule``, ``gradient``, ``path_from``, ``late_batch_size``,
            ``late_from``, ``keep_best``, ``chi2_from`` (steps counted from the refine stage's
            start). The first fit keeps the
            modes it found (with restarts); the splines then reshape each mode, which Planar
            flows cannot do finely (a spline stack fitted from scratch drops a mode instead).
            The loss, snapshots and ``best_step`` run over both stages.
        device: where to fit; default: the model's device. The target is moved there.
        seed: seeds torch's global generators (``torch.manual_seed``) if not None.
        progress: show a tqdm bar (updated every ``sync_every`` steps).
        sync_every: steps between host syncs (loss fetch, non-finite check, callback).
        snapshot_every: if > 0, keep ``snapshot_samples`` model samples every that many steps
            (rounded to a multiple of ``sync_every``). Snapshots and ``callback`` run on a forked
            random state, so they do not change the fit.
        snapshot_samples: samples per snapshot.
        callback: ``callback(step, model, loss_so_far)`` after each synced chunk.

    Returns:
        :class:`FitResult` with the model (in place, on ``device``; with restarts, the chosen
        one) and its loss per step.

    Raises:
        NonFiniteLossError: (a ``FloatingPointError``) when the loss becomes non-finite (lower ``lr``).
    """
    late_batch_size = batch_size if late_batch_size is None else late_batch_size
    if restarts is None:
        restarts = 1 if isinstance(model, torch.nn.Module) else PRESETS["fast"]["restarts"]
    checks = (
        ("iters", iters, 1),
        ("batch_size", batch_size, 1),
        ("late_batch_size", late_batch_size, 1),
        ("path_from", path_from, 0),
        ("sync_every", sync_every, 1),
        ("restarts", restarts, 1),
        ("keep", keep, 1),
        ("select_samples", select_samples, 2),
    )
    for name, v, lo in checks:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if gradient not in ("path", "total"):
        raise ValueError(f"gradient: expected 'path' or 'total', got {gradient!r}")
    late_from = path_from if late_from is None else late_from
    if not isinstance(late_from, int) or late_from < 0:
        raise ValueError(f"late_from: expected None or an int >= 0, got {late_from!r}")
    if select_at is None:
        select_at = min(iters, anneal_iters or 0)
    if not isinstance(select_at, int) or not 0 <= select_at <= iters:
        raise ValueError(f"select_at: expected an int in [0, iters={iters}], got {select_at!r}")
    if chi2_from is not None and (not isinstance(chi2_from, int) or not 0 <= chi2_from <= iters):
        raise ValueError(f"chi2_from: expected None or an int in [0, iters={iters}], got {chi2_from!r}")
    refine = refine_spec(refine)
    if seed is not None:
        torch.manual_seed(seed)
    if model is None:

        def factory() -> torch.nn.Module:
            return build_flow("planar", 16)

    elif isinstance(model, torch.nn.Module):
        if restarts > 1:
            raise ValueError(
                f"restarts={restarts} needs model=None or a zero-argument builder (e.g. lambda: "
                "build_flow('planar', 16)) so that each restart has its own initialisation; got a model instance"
            )
        factory = None
    elif callable(model):
        factory = model
    else:
        raise TypeError(f"model: expected a normflows NormalizingFlow or a builder of one, got {type(model).__name__}")
    models = [model] if factory is None else [factory() for _ in range(restarts)]
    for m in models:
        if not (isinstance(m, torch.nn.Module) and hasattr(m, "sample") and hasattr(m, "q0") and hasattr(m, "flows")):
            raise TypeError(f"model: expected a normflows NormalizingFlow (q0, flows, sample), got {type(m).__name__}")
    target = get_target(target)
    if device is None:
        p = next(models[0].parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    for m in models:
        m.to(device)
    target.to(device)
    from tqdm.auto import tqdm

    dev = torch.device(device)
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    runner: _Stacked | _Single = _Stacked(models) if restarts > 1 else _Single(models[0])
    opt = torch.optim.Adam(runner.parameters(), lr=lr, weight_decay=weight_decay)
    factor = _lr_factor(schedule, iters, max(1, iters // 50))
    hist = torch.full((iters, restarts), float("nan"), device=device)  # stays on the device; fetched per chunk
    out = np.full((iters, restarts), np.nan)
    idx = list(range(restarts))  # the restart in each slot of the runner
    col, scores = 0, None  # the restart being followed (callbacks, progress); the selection scores
    snaps: list[tuple[int, np.ndarray]] = []
    every = max(sync_every, (snapshot_every // sync_every) * sync_every) if snapshot_every else 0
    marks = {select_at} | ({chi2_from} if chi2_from is not None else set()) if restarts > 1 else set()
    bounds = sorted(set(range(0, iters, sync_every)) | {iters} | {m for m in marks if m < iters})
    for m in models:
        m.train()
    t0 = time.perf_counter()
    best: tuple[float, int, int, dict | None] = (np.inf, iters, 0, None)  # keep_best: (score, step, restart, state)
    best_by_ess = False
    bar = tqdm(total=iters, desc="fit2d" if restarts == 1 else f"fit2d x{restarts}", disable=not progress, leave=False)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        if len(idx) == restarts > 1 and start >= select_at:
            runner, opt, idx, scores = _select(runner, opt, target, select_samples, out[:start], min(keep, restarts))
            bar.set_description(f"fit2d (restarts {', '.join(map(str, idx))})")
        if len(idx) > 1 and chi2_from is not None and start >= chi2_from:  # the polish goes on with the lowest KL alone
            runner, opt, kept, _ = _select(runner, opt, target, select_samples, out[:start, idx], 1)
            idx = [idx[kept[0]]]
            bar.set_description(f"fit2d (restart {idx[0]})")
        rows = torch.tensor(idx, device=device)
        for it in range(start, stop):
            for group in opt.param_groups:
                group["lr"] = lr * factor(it)
            beta = min(1.0, 0.01 + it / anneal_iters) if anneal_iters else 1.0
            opt.zero_grad(set_to_none=True)
            n = late_batch_size if it >= late_from else batch_size
            chi2 = chi2_from is not None and it >= chi2_from
            to_backprop, loss = _loss(runner, target, n, beta, gradient == "path" and it >= path_from, chi2)
            to_backprop.sum().backward()
            opt.step()
            hist[it, rows] = loss
        out[start:stop] = hist[start:stop].cpu().numpy()  # one sync per chunk
        chunk = out[start:stop, idx]
        alive = np.isfinite(chunk).all(0)
        if not alive.any():
            bad = start + int(np.argmax(~np.isfinite(chunk).all(1)))
            bar.close()
            raise NonFiniteLossError(f"fit: the loss became non-finite at step {bad}; lower lr (got {lr})")
        slot = int(np.argmin(np.where(alive, chunk.mean(0), np.inf)))  # lowest recent loss, never a dead one
        col = idx[slot]
        bar.update(stop - start)
        bar.set_postfix(loss=f"{out[stop - 1, col]:.3f}")
        if keep_best and stop >= select_at:
            polishing = chi2_from is not None and stop > chi2_from  # scored by ESS, not KL, from here on
            if polishing and not best_by_ess:
                best, best_by_ess = (np.inf, iters, 0, None), True
            now = np.where(alive, np.atleast_1d(_scores(runner, target, select_samples, polishing)), np.inf)
            j = int(np.argmin(now))
            if now[j] < best[0]:
                best = (
                    float(now[j]),
                    stop,
                    idx[j],
                    {k: v.detach().clone() for k, v in runner.export(j).state_dict().items()},
                )
        if (every and stop % every == 0) or callback is not None:
            current = runner.export(slot)
            # on a forked RNG: snapshots and callbacks (e.g. evaluations) leave the fit's random stream as it was
            with torch.random.fork_rng(devices=rng_devices):
                if every and stop % every == 0:
                    with torch.no_grad():
                        snaps.append((stop, current.sample(snapshot_samples)[0].float().cpu().numpy()))
                if callback is not None:
                    callback(stop, current, out[:stop, col])
    bar.close()
    if len(idx) == restarts > 1:  # select_at == iters: choose at the end
        runner, opt, idx, scores = _select(runner, opt, target, select_samples, out, 1)
    if best[3] is not None:  # the lowest score seen after select_at, of any restart kept
        col = best[2]
        model = models[col]
        model.load_state_dict(best[3])
    elif len(idx) > 1:  # several restarts kept to the end: the lowest final score
        col = idx[int(np.argmin(_scores(runner, target, select_samples, chi2_from is not None and chi2_from < iters)))]
        model = runner.export(idx.index(col))
    else:
        col, model = idx[0], runner.export(0)
    result = FitResult(
        model, out[:, col].copy(), time.perf_counter() - t0, snaps, col, scores, best[1] if keep_best else None
    )
    if refine is not None:
        result = _refine(
            result,
            target,
            refine,
            device=device,
            progress=progress,
            sync_every=sync_every,
            snapshot_every=snapshot_every,
            snapshot_samples=snapshot_samples,
            callback=callback,
        )
    return result


_REFINE_OPTS = (
    "iters",
    "batch_size",
    "lr",
    "anneal_iters",
    "weight_decay",
    "schedule",
    "gradient",
    "path_from",
    "late_batch_size",
    "late_from",
    "keep_best",
    "chi2_from",
)


def refine_spec(refine: dict | bool | None) -> dict | None:
    """The refine stage's settings: ``refine`` (``None``/``False``: none, ``True``: :data:`REFINE`,
    a dict: overrides) merged into :data:`REFINE` and checked, so :func:`fit` fails before its
    first stage, not after it."""
    if refine is None or refine is False:
        return None
    if refine is True:
        return dict(REFINE)
    if not isinstance(refine, dict):
        raise TypeError(
            f"refine: expected None, True or a dict (flow, layers, flow_kwargs and fit options), got {type(refine).__name__}"
        )
    unknown = sorted(set(refine) - {"flow", "layers", "flow_kwargs", *_REFINE_OPTS})
    if unknown:
        raise ValueError(
            f"refine: unknown keys {unknown}; expected flow, layers, flow_kwargs or one of {', '.join(_REFINE_OPTS)}"
        )
    spec = {**REFINE, **refine}
    if spec["flow"] not in IDENTITY_KINDS:
        raise ValueError(
            f"refine['flow']: expected one of {', '.join(IDENTITY_KINDS)} (layers that can start as the identity), "
            f"got {spec['flow']!r}"
        )
    for key in ("iters", "layers", "batch_size", "late_batch_size"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"refine['{key}']: expected an int >= 1, got {v!r}")
    for key in ("chi2_from", "late_from", "path_from"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= spec["iters"]):
            raise ValueError(
                f"refine['{key}']: expected None or an int in [0, refine iters={spec['iters']}], got {v!r}"
            )
    if not isinstance(spec["flow_kwargs"], dict):
        raise TypeError(f"refine['flow_kwargs']: expected a dict, got {type(spec['flow_kwargs']).__name__}")
    return spec


def _refine(first: FitResult, target: Target2D, spec: dict, callback, **common) -> FitResult:
    """The ``refine`` stage of :func:`fit`: extend ``first.model`` and fit again, one history."""
    opts = {k: v for k, v in spec.items() if k in _REFINE_OPTS}
    model = extend_flow(first.model, spec["flow"], spec["layers"], **spec["flow_kwargs"])
    n1 = len(first.loss)
    cb = (
        None if callback is None else (lambda step, m, loss: callback(n1 + step, m, np.concatenate([first.loss, loss])))
    )
    second = fit(model, target, restarts=1, seed=None, callback=cb, **opts, **common)
    return FitResult(
        second.model,
        np.concatenate([first.loss, second.loss]),
        first.seconds + second.seconds,
        first.snapshots + [(n1 + step, x) for step, x in second.snapshots],
        first.restart,
        first.restart_scores,
        None if second.best_step is None else n1 + second.best_step,
        n1,
    )


@torch.no_grad()
def _scores(runner: _Stacked | _Single, target: Target2D, n: int, ess: bool = False) -> np.ndarray:
    """Per restart, on ``n`` fresh samples: ``mean(log q(x) - log p~(x)) = KL(q||p) - log Z`` (+ noise).

    With ``ess``: ``-log ESS`` with ``ESS = (sum w)^2 / (n sum w^2)``, ``w = p~(x) / q(x)``.
    """
    x, log_q = runner.push(runner.draw(n))
    log_w = _log_p(target, x) - log_q
    if ess:
        return (torch.logsumexp(2 * log_w, -1) - 2 * torch.logsumexp(log_w, -1) + math.log(n)).cpu().numpy()
    return (-log_w).mean(-1).cpu().numpy()


def _select(runner: _Stacked, opt: torch.optim.Adam, target: Target2D, n: int, past: np.ndarray, keep: int):
    """Keep the ``keep`` restarts with the lowest reverse KL; they go on with their own Adam states.

    Returns:
        ``(runner, optimizer, kept restarts (best first), scores of all restarts)``.
    """
    scores = _scores(runner, target, n)
    scores = np.where(np.isfinite(scores) & np.isfinite(past).all(0), scores, np.inf)
    kept = [int(i) for i in np.argsort(scores, kind="stable")[:keep] if np.isfinite(scores[i])] or [
        int(np.argmin(scores))
    ]
    models = [runner.export(i) for i in kept]
    group = opt.param_groups[0]
    new_runner = _Stacked(models) if len(kept) > 1 else _Single(models[0])
    new = torch.optim.Adam(new_runner.parameters(), lr=group["lr"], weight_decay=group["weight_decay"])
    for name, param in models[0].named_parameters():
        states = [runner.state_of(name, i, opt) for i in kept]
        if isinstance(new_runner, _Single):
            new.state[param] = states[0]
        elif new_runner.vectorized:
            new.state[new_runner.params[f"m.{name}"]] = {
                k: (torch.stack([st[k] for st in states]) if states[0][k].dim() > 0 else states[0][k])
                for k in states[0]
            }
        else:
            for j, st in enumerate(states):
                new.state[new_runner.params[f"{j}.{name}"]] = st
    return new_runner, new, kept, scores
