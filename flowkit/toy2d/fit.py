"""Reverse-KL fit of a normflows model to a 2D target, in stages.

:func:`fit` runs a :class:`~flowkit.toy2d.presets.Preset` in this order:

1. **start** (:func:`_start_models`): the given model, or ``restarts.count`` models built from
   the preset or a builder, initialised on the fit's own random stream (:func:`_random_stream`);
2. **first stage** (:func:`_run_stage`): all restarts trained together (one vmapped model) by
   the annealed reverse KL (:mod:`flowkit.toy2d.objectives`); at the end of the annealing the
   ``keep`` best by exact score go on (:func:`_select`); with ``keep_best`` each keeps the best
   state seen (:func:`_track_best`); the survivors are ranked (:func:`_ranked`);
3. **refine** (:func:`_refine`): the best is *distilled* (:func:`_student`: a new invertible flow
   on a Gaussian-mixture base placed by importance-weighted k-means on its samples, trained by
   the importance-weighted forward KL with the first model as teacher, then with its own
   samples, optionally polished by reverse KL / chi^2) or *extended* by identity-initialised
   layers; the best candidate wins.

Why: reverse KL ends in a seed-dependent local optimum, above all in how the mass splits between
modes (on TwoModes, 40/60 is common), which no later local step repairs and which a flow from
one Gaussian cannot separate cleanly (it keeps a bridge of mass between modes). The restarts find
the modes; the importance weights know each region's true share of mass, so the distilled model
starts from it; its mixture base needs no bridge. The loss history stays on the device and is
fetched once per ``sync_every`` steps (progress, non-finite check, scores, snapshots,
callback), so the loop never waits for the device in between.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import normflows as nf
import numpy as np
import torch

from flowkit.errors import NonFiniteLossError
from flowkit.toy2d.flows import build_flow, extend_flow, gaussian_mixture_base, model_sample
from flowkit.toy2d.objectives import chi2, forward_kl, log_p, reverse_kl, scores
from flowkit.toy2d.presets import PRESETS, Preset, Refine, Stage, preset_by_name
from flowkit.toy2d.runners import Single, Stacked, make_runner, reselect
from flowkit.toy2d.targets import Target2D, as_target
from flowkit.validation import check_int

__all__ = ["FitResult", "fit"]

Runner = Single | Stacked
Callback = Callable[[int, torch.nn.Module, np.ndarray], None]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns (``model, loss = fit(...)`` unpacks the first two).

    Attributes:
        model: the fitted normflows model (with restarts, the chosen one).
        loss: its loss per step (the annealed objective; at ``beta = 1``, ``KL(q||p) - log Z``).
        seconds: wall time of the fit.
        snapshots: ``(step, samples [n, 2])`` taken every ``snapshot_every`` steps.
        restart: which restart the model comes from.
        restart_scores: the restarts' scores at the selection (``None`` without restarts).
        best_step: the step of the returned state (``keep_best``), else ``None``.
        anneal_end: the step at which the annealing ended (``beta`` reached 1), if it did.
        refine_start: the first step of the refine stage, if there was one.
        preset: the settings that ran (overrides applied).
    """

    model: torch.nn.Module
    loss: np.ndarray
    seconds: float
    snapshots: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)
    restart: int = 0
    restart_scores: np.ndarray | None = None
    best_step: int | None = None
    anneal_end: int | None = None
    refine_start: int | None = None
    preset: Preset | None = None

    def __iter__(self) -> Iterator[Any]:  # model, loss = fit(...)
        return iter((self.model, self.loss))


@dataclasses.dataclass
class _Candidate:
    """A restart on its way through the stages: its model, loss history and best state seen."""

    restart: int
    model: torch.nn.Module
    losses: list[np.ndarray] = dataclasses.field(default_factory=list)
    best_score: float = math.inf
    best_step: int | None = None
    best_state: dict | None = None

    @property
    def loss(self) -> np.ndarray:
        return np.concatenate(self.losses) if self.losses else np.zeros(0)

    def forget_best(self) -> None:
        self.best_score, self.best_step, self.best_state = math.inf, None, None

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


ProgressMode = Literal["bar", "lines"]


class _Progress:
    """A tqdm bar on a terminal, else a line per tenth of the run (a log is not flooded)."""

    def __init__(self, total: int, mode: ProgressMode | None):
        self.total, self.mode, self.t0 = total, mode, time.perf_counter()
        self.next_line = 0
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="fit2d", leave=False)

    def update(self, step: int, loss: float, note: str) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_description(f"fit2d{note}", refresh=False)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.mode == "lines" and (step >= self.next_line or step == self.total):
            elapsed = time.perf_counter() - self.t0
            print(f"fit2d: step {step}/{self.total} loss {loss:.4f}{note} ({elapsed:.0f}s)", flush=True)
            self.next_line = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class _Session:
    """What the stages share: the target, the device, the hooks and what they collect."""

    target: Target2D
    device: torch.device
    sync_every: int
    keep_best: bool
    progress: _Progress
    snapshot_every: int
    snapshot_samples: int
    callback: Callback | None
    samples: int  # model samples per score
    snapshots: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)

    def after_chunk(self, step: int, current: torch.nn.Module, loss: np.ndarray, note: str) -> None:
        """Progress, snapshots and the callback after a synced chunk; snapshots and the callback
        run on a forked random state, so they leave the fit's random stream as it was."""
        self.progress.update(step, float(loss[-1]), note)
        snap = self.snapshot_every and step % self.snapshot_every == 0
        if not snap and self.callback is None:
            return
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            if snap:
                with torch.no_grad():
                    self.snapshots.append((step, model_sample(current, self.snapshot_samples)[0].float().cpu().numpy()))
            if self.callback is not None:
                self.callback(step, current, loss)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _random_stream(seed: int | torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run the block on the fit's own random stream, seeded from ``seed`` (an int, a
    ``torch.Generator``, or ``None``: one draw from torch's global generator); the global random
    state is forked, so the caller's is as it was afterwards."""
    if isinstance(seed, torch.Generator):
        start = int(torch.randint(0, 2**62, (), generator=seed, device=seed.device))
    elif seed is None:
        start = int(torch.randint(0, 2**62, ()))
    else:
        start = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(check_int("seed", seed))))
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.random.default_generator.manual_seed(start)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(start)
        yield


def _lr_factor(stage: Stage) -> Callable[[int], float]:
    """The learning-rate schedule: constant, or a short linear warm-up then cosine decay to 1%."""
    if stage.schedule == "constant":
        return lambda t: 1.0
    warmup, iters = max(1, stage.iters // 50), stage.iters

    def cosine(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        p = (t - warmup) / max(1, iters - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p))

    return cosine


def _steps(
    runner: Runner,
    opt: torch.optim.Adam,
    target: Target2D,
    stage: Stage,
    steps: range,
    factor: Callable[[int], float],
    teacher: Runner | None = None,
) -> np.ndarray:
    """Optimisation steps ``steps`` of ``stage``, each on the objective of its phase; returns
    their losses ``[steps, models]`` (one sync)."""
    hist = []
    for it in steps:
        for group in opt.param_groups:
            group["lr"] = stage.lr * factor(it)
        opt.zero_grad(set_to_none=True)
        n, phase = stage.batch_at(it), stage.phase(it)
        if phase == "teacher" or phase == "forward":
            proposal = teacher if phase == "teacher" and teacher is not None else runner
            to_backprop, loss = forward_kl(runner, target, n, proposal)
        elif phase == "chi2":
            to_backprop, loss = chi2(runner, target, n, stage.beta(it))
        else:
            to_backprop, loss = reverse_kl(runner, target, n, stage.beta(it), stage.gradient == "path")
        to_backprop.sum().backward()
        opt.step()
        hist.append(loss.reshape(-1))
    return torch.stack(hist).cpu().double().numpy()


def _chunks(stage: Stage, sync_every: int, marks: set[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of the synced chunks of a stage, split at ``marks`` (selection, polish)."""
    bounds = sorted(set(range(0, stage.iters, sync_every)) | {stage.iters} | {m for m in marks if 0 < m < stage.iters})
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _rank_keys(score: Callable[[str], np.ndarray], by: str, alive: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Sort keys (lower is better; ``inf``: never): the KL, or the ``by`` score (``"ess"``,
    ``"mass"``) of the models within ``margin`` nats of the lowest KL. A model that lost a mode
    can score well on its own samples, which cannot see the mode it misses; its KL cannot."""
    kl = np.where(alive, score("kl"), np.inf)
    if by == "kl":
        return kl
    return np.where(kl <= kl.min() + margin, score(by), np.inf)


def _select(runner: Runner, opt: torch.optim.Adam, cands: list[_Candidate], session: _Session, preset: Preset):
    """Keep the ``restarts.keep`` candidates with the best score (dead ones never); returns
    ``(runner, optimizer, kept candidates, the scores of all)``."""
    alive = np.array([np.isfinite(c.loss).all() for c in cands])
    keys = _rank_keys(lambda kind: scores(runner, session.target, session.samples, kind), preset.restarts.score, alive)
    order = [int(i) for i in np.argsort(keys, kind="stable") if np.isfinite(keys[i])]
    kept = order[: preset.restarts.keep] or [int(np.argmax(alive))]
    runner, opt = reselect(runner, opt, kept)
    return runner, opt, [cands[i] for i in kept], keys


def _track_best(runner: Runner, cands: list[_Candidate], session: _Session, kind: str, step: int) -> np.ndarray:
    """Score each candidate now and keep the state of each one's best; returns the scores."""
    now = scores(runner, session.target, session.samples, kind)
    for i, c in enumerate(cands):
        if now[i] < c.best_score and np.isfinite(c.losses[-1]).all():
            c.best_score, c.best_step = float(now[i]), step
            c.best_state = {k: v.detach().clone() for k, v in runner.export(i).state_dict().items()}
    return now


def _current_slot(losses: np.ndarray, alive: np.ndarray, scored: np.ndarray | None) -> int:
    """The restart shown as the fit's current model (progress, snapshots, callback), never a dead
    one: the best by the exact score where the chunk was scored (:func:`_track_best`), else the
    lowest mean loss of the chunk. A batch of a few hundred samples rarely sees the thin bridge
    of mass a Planar flow keeps between two modes (``log p~`` is about -200 there on TwoModes), so
    the lowest batch loss often belongs to the restart with the higher KL."""
    keys = scored if scored is not None else losses.mean(0)
    return int(np.argmin(np.where(alive, keys, np.inf)))


def _check_finite(losses: np.ndarray, first_step: int, lr: float) -> np.ndarray:
    """Which models' chunk losses are all finite; raises when none is."""
    alive = np.isfinite(losses).all(0)
    if not alive.any():
        bad = first_step + int(np.argmax(~np.isfinite(losses).all(1)))
        raise NonFiniteLossError(f"fit: the loss became non-finite at step {bad}; lower lr (got {lr})")
    return alive


def _run_stage(
    cands: list[_Candidate],
    stage: Stage,
    session: _Session,
    offset: int,
    preset: Preset | None = None,
    teacher: Runner | None = None,
) -> tuple[list[_Candidate], np.ndarray | None]:
    """Train ``cands`` together by ``stage`` (global steps ``offset + t``). With ``preset`` (the
    first stage) the restarts are selected at ``preset.select_at``; ``teacher`` (one model per
    candidate) is the proposal of the stage's teacher phase. From the end of the annealing on,
    with ``keep_best``, each candidate's best state is tracked (by KL, or by ESS outside the
    reverse-KL phase; a new phase starts a new best) and restored at the end.

    Returns:
        the candidates left and the selection's scores (``None`` without a selection).
    """
    runner = make_runner([c.model for c in cands])
    opt = torch.optim.Adam(runner.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    factor = _lr_factor(stage)
    select_at = preset.select_at if preset is not None and len(cands) > 1 else None
    track_from = min(stage.anneal_iters, stage.iters)
    phase_starts = set(stage.phase_starts())
    restart_scores = None
    for start, stop in _chunks(stage, session.sync_every, {select_at or 0} | phase_starts):
        if start == select_at and preset is not None:
            runner, opt, cands, restart_scores = _select(runner, opt, cands, session, preset)
        if start in phase_starts:  # scores of different objectives do not compare: a new best
            for c in cands:
                c.forget_best()
        losses = _steps(runner, opt, session.target, stage, range(start, stop), factor, teacher)
        for c, column in zip(cands, losses.T, strict=True):
            c.losses.append(column)
        alive = _check_finite(losses, offset + start, stage.lr)
        scored = None
        if session.keep_best and stop >= track_from:
            kind = "kl" if stage.phase(stop - 1) == "reverse" else "ess"
            scored = _track_best(runner, cands, session, kind, offset + stop)
        slot = _current_slot(losses, alive, scored)
        note = f" (restarts {', '.join(str(c.restart) for c in cands)})" if len(cands) > 1 else ""
        session.after_chunk(offset + stop, runner.export(slot), cands[slot].loss, note)
    if select_at is not None and select_at >= stage.iters and preset is not None:  # select at the very end
        runner, opt, cands, restart_scores = _select(runner, opt, cands, session, preset)
    for i, c in enumerate(cands):
        c.model = runner.export(i)
        if session.keep_best:
            c.restore_best()
    return cands, restart_scores


def _ranked(cands: list[_Candidate], session: _Session, by: str) -> list[_Candidate]:
    """``cands`` best first by :func:`_rank_keys` on fresh samples; dead candidates last."""
    if len(cands) == 1:
        return cands
    alive = np.array([np.isfinite(c.loss).all() for c in cands])

    def score(kind: str) -> np.ndarray:
        return np.array([scores(Single(c.model), session.target, session.samples, kind)[0] for c in cands])

    keys = _rank_keys(score, by, alive)
    return [cands[i] for i in np.argsort(keys, kind="stable")]


@torch.no_grad()
def _student(teacher: torch.nn.Module, refine: Refine, session: _Session) -> torch.nn.Module:
    """The distilled model: a Gaussian-mixture base placed by importance-weighted k-means on the
    teacher's samples, then ``refine.layers`` new coupling layers of ``refine.flow``."""
    x, log_q = model_sample(teacher, session.samples)
    log_w = torch.nan_to_num(log_p(session.target, x) - log_q, nan=-math.inf)
    if not torch.isfinite(log_w).any():
        raise NonFiniteLossError("fit: the teacher's importance weights are all zero or non-finite; nothing to distill")
    base = gaussian_mixture_base(x, torch.softmax(log_w.double(), 0), refine.components)
    extra = {"identity_init": True} if refine.flow == "nflows-spline" else {}
    flows = build_flow(refine.flow, refine.layers, hidden=refine.hidden, bins=refine.bins, **extra).flows
    student = type(teacher)(q0=base, flows=list(flows), p=getattr(teacher, "p", None))
    return student.to(device=x.device, dtype=x.dtype)


def _refine(cands: list[_Candidate], refine: Refine, session: _Session, offset: int) -> list[_Candidate]:
    """The refine stage on the best ``refine.candidates``: each distilled into a new model (its
    teacher) or extended by identity-initialised layers, then all trained together; returned
    best first (by ESS, among those that kept the modes)."""
    chosen = cands[: refine.candidates]
    teacher = make_runner([c.model for c in chosen]) if refine.method == "distill" else None
    for c in chosen:
        if refine.method == "distill":
            c.model = _student(c.model, refine, session).train()
        else:
            c.model = extend_flow(c.model, refine.flow, refine.layers, hidden=refine.hidden, bins=refine.bins)
        c.forget_best()
    chosen, _ = _run_stage(chosen, refine.stage, session, offset, teacher=teacher)
    return _ranked(chosen, session, "ess")


def _start_models(model: Any, preset: Preset) -> list[torch.nn.Module]:
    """The models the fit starts from: the given instance (and ``restarts.count - 1`` perturbed
    copies of it), or ``restarts.count`` from a builder or the preset."""
    count = preset.restarts.count
    if isinstance(model, torch.nn.Module):
        models = [model] + [_perturbed_copy(model) for _ in range(count - 1)]
    elif model is None:
        models = [build_flow(preset.flow, preset.layers) for _ in range(count)]
    elif callable(model):
        models = [model() for _ in range(count)]
    else:
        raise TypeError(f"model: expected a normflows NormalizingFlow or a builder of one, got {type(model).__name__}")
    for m in models:
        if not (isinstance(m, torch.nn.Module) and hasattr(m, "q0") and hasattr(m, "flows")):
            raise TypeError(f"model: expected a normflows NormalizingFlow (q0, flows), got {type(m).__name__}")
    return models


@torch.no_grad()
def _perturbed_copy(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """A copy of ``model`` with each parameter tensor moved by noise of ``scale`` times its own
    spread (a tensor with no spread, e.g. a zero bias, is left as it is): a restart near the
    given initialisation, not a clone of it (reverse KL's outcome depends on the start)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        if p.is_floating_point() and p.numel() > 1:
            p.add_(scale * p.std() * torch.randn_like(p))
    return twin


def _resolve_preset(preset: str | Preset, model: Any, overrides: dict[str, Any]) -> Preset:
    """The preset by name or record, with the overrides. A given model instance keeps its
    architecture: no refine stage unless ``refine`` is given (its restarts are copies of it),
    and its first stage runs at the preset's ``given_lr`` unless ``lr`` is given."""
    if isinstance(preset, str):
        preset = preset_by_name(preset, stacklevel=4)  # warns at the caller of fit
    if not isinstance(preset, Preset):
        raise TypeError(
            f"preset: expected a name ({', '.join(sorted(PRESETS))}) or a Preset, got {type(preset).__name__}"
        )
    if not isinstance(model, torch.nn.Module):
        return preset.with_overrides(**overrides)
    plan = preset.with_overrides(**{"refine": None, **overrides})  # the user's model keeps its architecture
    if plan.given_lr is not None and "lr" not in overrides:
        plan = plan.with_overrides(lr=plan.given_lr)
    return plan


def _resolve_target(target: Any, model: torch.nn.Module) -> Target2D:
    """The target given, else the model's own ``p`` (a normflows ``NormalizingFlow(..., p=target)``)."""
    if target is None:
        target = getattr(model, "p", None)
        if target is None:
            raise ValueError(
                "target: none given and the model has no p; pass a target (a name such as 'two-modes', a Target2D, "
                "a normflows target or a callable z -> log p~(z)) or build the model with p=..."
            )
    return as_target(target)


def _progress_mode(progress: bool | ProgressMode) -> ProgressMode | None:
    if progress is True:
        return "bar" if sys.stderr.isatty() else "lines"
    if progress is False or progress is None:
        return None
    if progress not in ("bar", "lines"):
        raise ValueError(f"progress: expected True, False, 'bar' or 'lines', got {progress!r}")
    return progress


def fit(
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    target: Any = None,
    preset: str | Preset = "fast",
    *,
    seed: int | torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | ProgressMode = False,
    sync_every: int = 50,
    snapshot_every: int = 0,
    snapshot_samples: int = 5000,
    callback: Callback | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit a normflows model to a 2D target by (annealed) reverse KL, in the stages of ``preset``.

    Args:
        model: a normflows ``NormalizingFlow``, fitted in place with its own architecture (no
            refine stage unless ``refine`` is given): its restarts are perturbed copies of it,
            each on its own random stream (``restarts=1``: it alone; a single Planar fit ends
            anywhere between KL 0.05 and 0.7 on TwoModes, by its noise alone), and it ends in
            the best one's state; a zero-argument builder of one (one per restart); or ``None``
            (``build_flow(preset.flow, preset.layers)``).
        target: a registered name, a :class:`~flowkit.toy2d.targets.Target2D`, a normflows
            target or any object with ``log_prob(z)``, or a callable ``z -> log p~(z)``;
            ``None``: the model's own ``p`` (``NormalizingFlow(q0, flows, p=target)``).
        preset: a name in :data:`~flowkit.toy2d.presets.PRESETS` (``fast``, ``strong``,
            ``seed-loop``: the seed's own loop; ``seed`` is its deprecated old name) or a :class:`~flowkit.toy2d.presets.Preset`.
        seed: the fit's random stream (initialisation of built models, samples): an int, a
            ``torch.Generator``, or ``None`` (one draw from torch's global generator, so
            ``torch.manual_seed`` makes the fit repeatable). The fit runs on a fork of the global
            random state: the caller's stream is left as it was (but for that one draw).
        device: where to fit; default: the model's device. The target is moved there.
        progress: ``True`` (a bar on a terminal, else a line per tenth of the run), ``"bar"``,
            ``"lines"`` or ``False``.
        sync_every: steps between host syncs (loss fetch, non-finite check, scores, callback).
        snapshot_every: if > 0, keep ``snapshot_samples`` model samples every that many steps
            (a multiple of ``sync_every`` is best: snapshots are taken at syncs).
        snapshot_samples: samples per snapshot.
        callback: ``callback(step, model, loss_so_far)`` after each synced chunk (with restarts,
            the one with the lowest recent loss).
        **overrides: fields of the preset by name (``iters``, ``batch_size``, ``lr``,
            ``anneal_iters``, ``gradient``, ``chi2_from``, ``restarts``, ``keep``, ``refine``, ...;
            see :meth:`~flowkit.toy2d.presets.Preset.with_overrides`).

    Returns:
        :class:`FitResult` (with a refine stage its model is the refined one).

    Raises:
        NonFiniteLossError: (a ``FloatingPointError``) when the loss becomes non-finite (lower ``lr``).

    Example:
        >>> import normflows as nf
        >>> from flowkit import toy2d
        >>> nfm = nf.NormalizingFlow(nf.distributions.DiagGaussian(2), [nf.flows.Planar((2,)) for _ in range(4)],
        ...                          p=nf.distributions.TwoModes(2, 0.1))
        >>> result = toy2d.fit(nfm, iters=60, anneal_iters=20, batch_size=64, progress=False, seed=0)
        >>> result.model is nfm, result.loss.shape
        (True, (60,))
    """
    plan = _resolve_preset(preset, model, overrides)
    check_int("sync_every", sync_every, low=1)
    check_int("snapshot_every", snapshot_every, low=0)
    check_int("snapshot_samples", snapshot_samples, low=1)
    mode = _progress_mode(progress)
    given = model if isinstance(model, torch.nn.Module) else None
    if device is None:
        ref = next(given.parameters(), None) if given is not None else None
        device = ref.device if ref is not None else torch.device("cpu")
    device = torch.device(device)
    t0 = time.perf_counter()
    with _random_stream(seed, device):
        models = _start_models(model, plan)
        target = _resolve_target(target, models[0])
        for m in models:
            m.to(device).train()
        target.to(device)
        session = _Session(
            target=target,
            device=device,
            sync_every=sync_every,
            keep_best=plan.keep_best,
            progress=_Progress(plan.total_iters, mode),
            # snapshots are taken at syncs: every a multiple of sync_every steps
            snapshot_every=max(sync_every, snapshot_every // sync_every * sync_every) if snapshot_every else 0,
            snapshot_samples=snapshot_samples,
            callback=callback,
            samples=plan.restarts.samples,
        )
        try:
            result = _fit_stages(models, plan, session)
        finally:
            session.progress.close()
    if given is not None:
        result.model = _into_given(given, result.model)
    result.seconds = time.perf_counter() - t0
    return result


def _fit_stages(models: list[torch.nn.Module], plan: Preset, session: _Session) -> FitResult:
    """The stages of :func:`fit`, in order."""
    cands = [_Candidate(i, m) for i, m in enumerate(models)]
    cands, restart_scores = _run_stage(cands, plan.stage, session, 0, plan)
    cands = _ranked(cands, session, plan.restarts.score)
    if plan.refine is not None:
        cands = _refine(cands, plan.refine, session, plan.stage.iters)
    top = cands[0]
    return FitResult(
        model=top.model,
        loss=top.loss,
        seconds=0.0,
        snapshots=session.snapshots,
        restart=top.restart,
        restart_scores=restart_scores,
        best_step=top.best_step if session.keep_best else None,
        anneal_end=plan.stage.anneal_end,
        refine_start=plan.stage.iters if plan.refine is not None else None,
        preset=plan,
    )


def _into_given(given: nf.NormalizingFlow, fitted: nf.NormalizingFlow) -> nf.NormalizingFlow:
    """The fit of a given model, in that model: ``given`` takes the state of ``fitted`` (the chosen
    restart, a copy of it) for its own layers; with refine, the result is ``given`` followed by the
    new layers."""
    if fitted is given:
        return given
    own = given.state_dict()
    given.load_state_dict({k: v for k, v in fitted.state_dict().items() if k in own})
    extra = list(fitted.flows)[len(given.flows) :]
    if not extra:
        return given
    return type(fitted)(q0=given.q0, flows=list(given.flows) + extra, p=getattr(fitted, "p", None))
