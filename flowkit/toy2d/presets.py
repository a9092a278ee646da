"""What :func:`flowkit.toy2d.fit` runs, as typed records: a :class:`Preset` is a model to build,
a :class:`Stage` of optimisation, the :class:`Restarts` trained together through it and an
optional :class:`Refine` stage. ``fit(model, target, preset="fast", lr=5e-3, restarts=4)`` takes
a preset by name (:data:`PRESETS`) or as a record and overrides its fields by keyword
(:meth:`Preset.with_overrides`).

What each preset reaches (KL, ESS, time over seeds 0-9) is measured by
``benchmarks/seeds_fit2d.py`` and ``benchmarks/bench_fit2d.py`` and reported in the README's 2D
section, not here.

Example:
    >>> from flowkit.toy2d import PRESETS
    >>> p = PRESETS["fast"].with_overrides(iters=300, restarts=4)
    >>> p.stage.iters, p.restarts.count, p.refine.method
    (300, 4, 'distill')
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

from flowkit.validation import check_bool, check_choice, check_float, check_int, check_optional_int

__all__ = ["DEPRECATED_PRESETS", "PRESETS", "Preset", "Refine", "Restarts", "Stage", "preset_by_name"]


Phase = Literal["teacher", "forward", "reverse", "chi2"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of optimisation: Adam on a sequence of objectives, by step.

    * steps ``[0, forward_iters)``: the importance-weighted forward KL ``KL(p||q)``: maximise
      ``sum_i w_i log q(x_i)``, ``w`` the self-normalised weights ``p~(x) / r(x)`` of samples
      ``x ~ r`` from a proposal ``r``: the teacher (the first stage's model) for the first
      ``teacher_iters`` steps, then the model itself (needs an invertible model);
    * then the annealed reverse KL: ``mean(log q(x) - beta_t log p~(x))``, ``x ~ q``, with
      ``beta_t = min(1, 0.01 + t / anneal_iters)`` (the seed's annealing; Rezende & Mohamed, 2015);
    * from ``chi2_from`` on: ``log mean(w^2)``, ``w = p~(x) / q(x)``, on batches of
      ``chi2_batch_size`` (the chi^2 polish: maximises the effective sample size).

    Attributes:
        iters: steps.
        batch_size: samples per step.
        lr: Adam's learning rate (peak of the schedule).
        anneal_iters: steps over which ``beta`` rises to 1 (0: no annealing).
        weight_decay: Adam's weight decay.
        schedule: ``"cosine"`` (short warm-up, cosine decay to 1% of ``lr``) or ``"constant"``.
        gradient: reverse KL's gradient: ``"path"``, the sticking-the-landing path derivative
            (Roeder et al., 2017), or ``"total"``, the plain reparameterised gradient (the seed's).
        forward_iters: steps of forward KL at the start (0: none).
        teacher_iters: of those, the first ones that sample the teacher.
        chi2_from: first step of the chi^2 polish (``None``: none).
        chi2_batch_size: samples per polish step (``None``: ``batch_size``).
    """

    iters: int
    batch_size: int
    lr: float
    anneal_iters: int = 0
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    gradient: Literal["path", "total"] = "path"
    forward_iters: int = 0
    teacher_iters: int = 0
    chi2_from: int | None = None
    chi2_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_int("iters", self.iters, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_float("lr", self.lr, low=0, low_open=True)
        check_int("anneal_iters", self.anneal_iters, low=0)
        check_float("weight_decay", self.weight_decay, low=0)
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        check_choice("gradient", self.gradient, ("path", "total"))
        check_int("forward_iters", self.forward_iters, low=0, high=self.iters)
        check_int("teacher_iters", self.teacher_iters, low=0, high=self.forward_iters)
        check_optional_int("chi2_from", self.chi2_from, low=self.forward_iters, high=self.iters)
        check_optional_int("chi2_batch_size", self.chi2_batch_size, low=1)

    def phase(self, step: int) -> Phase:
        """The objective at ``step``: ``"teacher"``/``"forward"`` (forward KL with the teacher's or
        the model's samples), ``"reverse"`` (reverse KL) or ``"chi2"`` (the polish)."""
        if step < self.teacher_iters:
            return "teacher"
        if step < self.forward_iters:
            return "forward"
        if self.chi2_from is not None and step >= self.chi2_from:
            return "chi2"
        return "reverse"

    def phase_starts(self) -> list[int]:
        """The steps at which the objective changes (and the first, 0)."""
        return sorted({0, self.teacher_iters, self.forward_iters, self.chi2_from or 0} - {self.iters})

    def beta(self, step: int) -> float:
        """The annealing factor of ``log p~`` at ``step``."""
        return min(1.0, 0.01 + step / self.anneal_iters) if self.anneal_iters else 1.0

    def batch_at(self, step: int) -> int:
        """Samples drawn at ``step``."""
        return (self.chi2_batch_size or self.batch_size) if self.phase(step) == "chi2" else self.batch_size

    @property
    def anneal_end(self) -> int | None:
        """The step at which ``beta`` reaches 1, if the annealing ends inside the stage."""
        return self.anneal_iters if 0 < self.anneal_iters < self.iters else None


@dataclasses.dataclass(frozen=True)
class Restarts:
    """Random restarts: ``count`` models trained together (one vmapped model) until ``select_at``,
    then the ``keep`` with the best ``score`` go on.

    Attributes:
        count: restarts (1: a single model).
        keep: restarts kept after the selection.
        select_at: the selection step (``None``: the end of the annealing).
        score: ``"mass"`` (how far the model's mass per region of a coarse grid is from the
            target's, estimated by importance weights: sees how the mass splits between modes,
            which the later stages cannot change), ``"kl"`` (the reverse KL
            ``E_q[log q - log p~]``) or ``"ess"`` (``-log ESS`` of the importance weights).
        samples: model samples per score.
    """

    count: int = 8
    keep: int = 2
    select_at: int | None = None
    score: Literal["mass", "kl", "ess"] = "kl"
    samples: int = 8192

    def __post_init__(self) -> None:
        check_int("restarts", self.count, low=1)
        check_int("keep", self.keep, low=1)
        check_optional_int("select_at", self.select_at, low=0)
        check_choice("score", self.score, ("mass", "kl", "ess"))
        check_int("select_samples", self.samples, low=2)


def _distill_stage() -> Stage:
    return Stage(iters=800, batch_size=512, lr=1e-3, forward_iters=800, teacher_iters=300)


@dataclasses.dataclass(frozen=True)
class Refine:
    """The second stage, from the best ``candidates`` of the first (the best by effective sample
    size, among those that kept the modes, is returned).

    ``"distill"``: a new invertible flow learns the target from the first stage's model, the
    teacher: its base is a mixture of ``components`` Gaussians placed by importance-weighted
    k-means on the teacher's samples (so it starts with the target's mass in each region: how
    the mass splits between modes, which reverse KL cannot repair, is right from the start), then
    ``layers`` coupling layers of ``flow`` (starting as the identity) and the base are trained by
    ``stage`` (forward KL with the teacher's then its own samples, then optionally reverse KL
    and a chi^2 polish). A mixture base needs no bridge of mass between modes, which a flow from
    one Gaussian cannot avoid.

    ``"extend"``: ``layers`` identity-initialised layers appended to the first stage's model
    (:func:`~flowkit.toy2d.extend_flow`), all trained on by ``stage`` (reverse KL / chi^2 only: the
    model keeps its non-invertible layers).

    Attributes:
        method: ``"distill"`` or ``"extend"``.
        flow: the kind of the new layers (``nflows-spline``; distill also ``spline``, ``affine``).
        layers: new coupling layers.
        hidden: hidden units of their nets.
        bins: spline bins.
        components: Gaussians in the distilled model's base.
        candidates: how many of the first stage's best models are refined (in lockstep).
        stage: the optimisation (its steps follow the first stage's).
    """

    method: Literal["distill", "extend"] = "distill"
    flow: str = "nflows-spline"
    layers: int = 2
    hidden: int = 32
    bins: int = 8
    components: int = 8
    candidates: int = 1
    stage: Stage = dataclasses.field(default_factory=_distill_stage)

    def scaled(self, iters: int) -> Refine:
        """This refine stage with ``iters`` steps, its phases (teacher, forward, chi^2) scaled alike."""
        check_int("refine iters", iters, low=1)
        st = self.stage

        def scale(step: int) -> int:
            return round(step * iters / st.iters)

        stage = dataclasses.replace(
            st,
            iters=iters,
            forward_iters=scale(st.forward_iters),
            teacher_iters=scale(st.teacher_iters),
            chi2_from=None if st.chi2_from is None else scale(st.chi2_from),
        )
        return dataclasses.replace(self, stage=stage)

    def __post_init__(self) -> None:
        from flowkit.toy2d.flows import IDENTITY_KINDS, INVERTIBLE_KINDS

        check_choice("refine.method", self.method, ("distill", "extend"))
        check_choice("refine.flow", self.flow, INVERTIBLE_KINDS if self.method == "distill" else IDENTITY_KINDS)
        check_int("refine.layers", self.layers, low=1)
        check_int("refine.hidden", self.hidden, low=1)
        check_int("refine.bins", self.bins, low=2)
        check_int("refine.components", self.components, low=1)
        check_int("refine.candidates", self.candidates, low=1)
        if not isinstance(self.stage, Stage):
            raise TypeError(f"refine.stage: expected a Stage, got {type(self.stage).__name__}")
        if self.method == "extend" and self.stage.forward_iters:
            raise ValueError(
                f"refine.stage.forward_iters: expected 0 with method='extend' (its model need not invert), "
                f"got {self.stage.forward_iters}"
            )


def _first_stage() -> Stage:
    return Stage(iters=1500, batch_size=512, lr=1e-2, anneal_iters=600)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything :func:`~flowkit.toy2d.fit` runs.

    Attributes:
        flow: the model built when ``fit`` is given none (``build_flow(flow, layers)``).
        layers: its layers.
        stage: the first stage.
        restarts: restarts trained together through the first stage (a given model instance
            is fitted alone).
        keep_best: return the best state seen after the selection (scored every ``sync_every``
            steps: KL, or ESS during a polish), not the last.
        refine: the refine stage, or ``None``.
        given_lr: the first stage's ``lr`` when ``fit`` is given a model instance (``None``:
            ``stage.lr``). Such a fit has no refine stage: the first stage is the whole fit, and
            the 16-Planar restarts reach a low KL sooner at a higher rate (``fast``: 2e-2 instead
            of 1e-2; ``benchmarks/bench_fit2d.py --runs seed,given``).
    """

    flow: str = "planar"
    layers: int = 16
    stage: Stage = dataclasses.field(default_factory=_first_stage)
    restarts: Restarts = dataclasses.field(default_factory=Restarts)
    keep_best: bool = True
    refine: Refine | None = None
    given_lr: float | None = None

    def __post_init__(self) -> None:
        from flowkit.toy2d.flows import FLOW_KINDS

        check_choice("flow", self.flow, tuple(FLOW_KINDS))
        check_int("layers", self.layers, low=1)
        check_bool("keep_best", self.keep_best)
        if self.given_lr is not None:
            check_float("given_lr", self.given_lr, low=0, low_open=True)
        for name, value, cls in (("stage", self.stage, Stage), ("restarts", self.restarts, Restarts)):
            if not isinstance(value, cls):
                raise TypeError(f"{name}: expected a {cls.__name__}, got {type(value).__name__}")
        if self.refine is not None and not isinstance(self.refine, Refine):
            raise TypeError(f"refine: expected None or a Refine, got {type(self.refine).__name__}")
        check_optional_int("select_at", self.restarts.select_at, low=0, high=self.stage.iters)
        if self.stage.teacher_iters:
            raise ValueError(
                f"stage.teacher_iters: expected 0 in the first stage (it has no teacher), got {self.stage.teacher_iters}"
            )

    @property
    def select_at(self) -> int:
        """The step at which the restarts are selected."""
        if self.restarts.select_at is not None:
            return self.restarts.select_at
        return min(self.stage.iters, self.stage.anneal_iters)

    @property
    def total_iters(self) -> int:
        """Steps of both stages."""
        return self.stage.iters + (self.refine.stage.iters if self.refine is not None else 0)

    def with_overrides(self, **overrides: Any) -> Preset:
        """This preset with fields replaced by name: any :class:`Stage` field (``iters``, ``lr``, ...),
        ``restarts`` (the count), ``keep``, ``select_at``, ``score``, ``select_samples``, ``flow``,
        ``layers``, ``keep_best``, ``given_lr`` and ``refine`` (``True``: :class:`Refine` defaults, ``False``/``None``:
        none, or a :class:`Refine`).

        Raises:
            TypeError: an unknown name.
        """
        unknown = sorted(set(overrides) - set(OVERRIDES))
        if unknown:
            raise TypeError(f"fit: unknown option {unknown[0]!r}; expected one of {', '.join(sorted(OVERRIDES))}")
        stage = {k: v for k, v in overrides.items() if OVERRIDES[k] == "stage"}
        restarts = {_RESTART_FIELDS[k]: v for k, v in overrides.items() if OVERRIDES[k] == "restarts"}
        own = {k: v for k, v in overrides.items() if OVERRIDES[k] == "preset"}
        if "refine" in own:
            own["refine"] = _as_refine(own["refine"])
        return dataclasses.replace(
            self,
            stage=dataclasses.replace(self.stage, **stage),
            restarts=dataclasses.replace(self.restarts, **restarts),
            **own,
        )


def _as_refine(value: Any) -> Refine | None:
    if value is True:
        return Refine()
    if value is None or value is False:
        return None
    if isinstance(value, Refine):
        return value
    raise TypeError(f"refine: expected True, False, None or a Refine, got {type(value).__name__}")


_RESTART_FIELDS = {
    "restarts": "count",
    "keep": "keep",
    "select_at": "select_at",
    "score": "score",
    "select_samples": "samples",
}
OVERRIDES: dict[str, str] = {
    **{f.name: "stage" for f in dataclasses.fields(Stage)},
    **{k: "restarts" for k in _RESTART_FIELDS},
    **{k: "preset" for k in ("flow", "layers", "keep_best", "refine", "given_lr")},
}


#: old preset names kept for one release: ``"seed"`` (read next to ``seed=``/``--seed`` as a
#: random seed) is ``"seed-loop"``
DEPRECATED_PRESETS: dict[str, str] = {"seed": "seed-loop"}


class _PresetTable(dict):
    """:data:`PRESETS`: a dict of the current names; an old name (:data:`DEPRECATED_PRESETS`)
    still looks up its new preset, with a ``DeprecationWarning``, but is not listed."""

    def __missing__(self, key: str) -> Preset:
        if key not in DEPRECATED_PRESETS:
            raise KeyError(key)
        return preset_by_name(key, stacklevel=3)


def _strong_stage() -> Stage:
    return Stage(iters=2000, batch_size=512, lr=1e-3, forward_iters=1500, teacher_iters=500)


PRESETS: dict[str, Preset] = _PresetTable(
    {
        # fit()'s and `flowkit fit2d`'s default: the seed's 16 Planar flows, 8 restarts through the
        # annealing, then the best distilled into a Gaussian mixture + 2 spline couplings (a given
        # model instance: 8 perturbed copies of it as restarts, no distillation; see fit)
        "fast": Preset(refine=Refine(), given_lr=2e-2),
        # for importance sampling: a longer first stage, a longer distillation, then a reverse-KL polish
        "strong": Preset(
            stage=Stage(iters=2000, batch_size=512, lr=1e-2, anneal_iters=800), refine=Refine(stage=_strong_stage())
        ),
        # the seed's own loop: 20,000 steps of 40 samples at lr 1e-3, total gradient, one model
        "seed-loop": Preset(
            stage=Stage(
                iters=20000,
                batch_size=40,
                lr=1e-3,
                anneal_iters=10000,
                weight_decay=1e-4,
                schedule="constant",
                gradient="total",
            ),
            restarts=Restarts(count=1, keep=1),
            keep_best=False,
        ),
    }
)


def preset_by_name(name: str, *, stacklevel: int = 2) -> Preset:
    """The preset called ``name`` in :data:`PRESETS`; an old name in :data:`DEPRECATED_PRESETS`
    gives its new preset with a ``DeprecationWarning`` (attributed ``stacklevel`` frames up, as
    in :func:`warnings.warn`).

    Raises:
        ValueError: an unknown name.

    Example:
        >>> preset_by_name("seed-loop").stage.iters
        20000
    """
    if name in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[name]
        warnings.warn(
            f"preset {name!r} is deprecated and will be removed in the next release; use {new!r}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        name = new
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(sorted(PRESETS))} or a Preset, got {name!r}")
    return PRESETS[name]
