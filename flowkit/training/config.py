"""The options of a run (:class:`TrainConfig`) and what a resumed run may change.

A resumed run continues the stored trajectory, so it must use the stored options; only the
ones in :data:`MAY_CHANGE_ON_RESUME` (how long, where and how fast it runs, and what the end
of the run reports) may differ, and the new values are recorded in the checkpoint and in
``metrics.json``.  :func:`resume_config` builds that config from a run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowkit.data import DATASETS
from flowkit.models import check_model_name
from flowkit.training.runtime import DEVICES
from flowkit.validation import check_bool, check_choice, check_float, check_int, check_optional_int

__all__ = [
    "DEFAULT_MODELS",
    "MAY_CHANGE_ON_RESUME",
    "OPTIONS_BEFORE_THEY_EXISTED",
    "TrainConfig",
    "default_model",
    "resume_config",
    "resume_conflicts",
]

#: what ``TrainConfig(model=None)`` trains on each data set: a registry name and its keyword
#: arguments (chosen by benchmarks/bench_bpd.py: lowest validation bits/dim after 30-300 s of
#: training on one CPU thread; see the README)
DEFAULT_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits": ("multiscale", {"num_layers": 1}),
    "mnist": ("multiscale", {"num_layers": 1}),
    "fashion-mnist": ("multiscale", {"num_layers": 1}),
    "cifar10": ("glow", {}),
}

#: the value of an option in a run stored before the option existed (what such a run did)
OPTIONS_BEFORE_THEY_EXISTED: dict[str, Any] = {"warmup_steps": 0, "ema_decay": 0.0}

#: options a resumed run may change; every other one must equal the stored run's
MAY_CHANGE_ON_RESUME = (
    "epochs",
    "out",
    "resume",
    "overwrite",
    "device",
    "threads",
    "num_workers",
    "data_root",
    "progress",
    "tensorboard",
    "max_nonfinite",
    "importance_samples",
    "num_samples",
    "sample_temperature",
)


@dataclasses.dataclass
class TrainConfig:
    """Options of :func:`~flowkit.training.train` (the CLI's ``flowkit train`` flags map onto these).

    Args:
        data: data set name for :func:`flowkit.data.load_splits` (``digits``, ``mnist``, ...).
        model: what to build: a registry name (``glow``, ``simple``, ``vardeq``, ``multiscale``)
            or an import path ``"package.module:function"`` called as
            ``function(image_shape, num_levels, **model_kwargs)``; ``None``: the instance
            passed as ``train(config, model=...)``, or else the data set's default
            (:data:`DEFAULT_MODELS`, :func:`default_model`), which the run records (its
            checkpoints and ``metrics.json`` name the registry model and its arguments).
        model_kwargs: keyword arguments of the builder (JSON-serialisable: stored in checkpoints);
            with ``model=None`` they update the default model's arguments.
        epochs: total number of epochs (with ``resume``: train until this many are done).
        batch_size: training and evaluation batch size, **global**: with N processes
            (torchrun) each takes ``batch_size / N`` images (must divide evenly).
        lr: Adam learning rate.
        lr_decay: factor applied after every epoch (``lr_e = lr * lr_decay**e``).
        warmup_steps: the learning rate rises linearly over the first steps, ``lr * (s + 1) /
            warmup_steps`` at step ``s`` (0: no warm-up); the schedule is per step and is
            stored in checkpoints.
        ema_decay: evaluate (validation, test, ``best.pt``, samples) an exponential moving
            average of the weights, ``avg = d * avg + (1 - d) * weights`` after every step with
            ``d = min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` (so early averages do not
            cling to the initial weights); 0 disables it.  Checkpoints hold the averaged
            weights as the model (what ``load_checkpoint`` and ``flowkit sample`` use) and the
            training weights for resuming.
        grad_clip: max gradient norm (``clip_grad_norm_``); 0 disables clipping.
        seed: seeds the model's initialisation, the training order and the noise.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (under torchrun:
            ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo).
        out: run folder (checkpoints, metrics, PNGs); created at the first checkpoint.
        resume: continue the run in ``out`` from ``out/last.pt``.
        overwrite: replace a run already in ``out``, when the new one writes its first
            checkpoint (without it, and without ``resume``, a folder holding a run is refused
            and left untouched).
        importance_samples: samples of the importance-weighted test bpd at the end of the run
            (0 skips the test evaluation).
        data_root: where torchvision data sets live.
        val_size: validation images (None: the data set's default).
        num_workers: DataLoader workers.
        max_train_batches: stop each epoch after this many batches (quick runs); None: all.
        max_eval_batches: evaluate on at most this many batches; None: all.
        max_nonfinite: stop after this many non-finite losses (or gradients) in a row.
        init_batch_size: images used for ActNorm's data-dependent initialisation.
        num_samples: images in the samples grid; ``sample_temperature`` their temperature.
        progress: show tqdm progress bars (rank 0, and only when stdout is a terminal).
        threads: ``torch.set_num_threads`` for the run (restored after); None or 0: leave it.
        tensorboard: also log the epoch metrics for TensorBoard under ``out/tensorboard``
            (needs the ``tensorboard`` package).
        conditional: train a class-conditional model on the data set's labels: the model is
            built with ``num_classes`` (the data set's) added to its keyword arguments (so a
            builder named by import path must accept ``num_classes``), or a given instance must
            be conditional on that many classes; it learns ``log p(x | y)`` and ``samples.png``
            shows one row per class.
    """

    data: str = "digits"
    model: str | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 0.975
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    importance_samples: int = 8
    data_root: str = "data"
    val_size: int | None = None
    num_workers: int = 0
    max_train_batches: int | None = None
    max_eval_batches: int | None = None
    max_nonfinite: int = 5
    init_batch_size: int = 256
    num_samples: int = 64
    sample_temperature: float = 0.7
    progress: bool = True
    threads: int | None = None
    tensorboard: bool = False
    conditional: bool = False

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad option."""
        for name in ("epochs", "batch_size", "max_nonfinite", "init_batch_size", "num_samples"):
            check_int(name, getattr(self, name), low=1)
        for name in ("seed", "importance_samples", "num_workers", "warmup_steps"):
            check_int(name, getattr(self, name), low=0)
        for name in ("max_train_batches", "max_eval_batches", "val_size"):
            check_optional_int(name, getattr(self, name), low=1)
        check_optional_int("threads", self.threads, low=0)
        check_float("lr", self.lr, low=0, low_open=True)
        check_float("lr_decay", self.lr_decay, low=0, high=1, low_open=True)
        check_float("grad_clip", self.grad_clip, low=0)
        check_float("ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_float("sample_temperature", self.sample_temperature, low=0, low_open=True)
        check_choice("device", self.device, DEVICES)
        check_choice("data", self.data, DATASETS)
        for name in ("resume", "overwrite", "progress", "tensorboard", "conditional"):
            check_bool(name, getattr(self, name))
        if self.resume and self.overwrite:
            raise ValueError("overwrite: a resumed run continues the run in out, it cannot also replace it; choose one")
        if self.model is not None:
            check_model_name(self.model, "model")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise TypeError(f"out: expected a folder path, got {self.out!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs: expected a dict, got {type(self.model_kwargs).__name__}")
        try:
            json.dumps(self.model_kwargs)
        except TypeError as err:
            raise TypeError(f"model_kwargs: must be JSON-serialisable (it is stored in checkpoints): {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-able dict (what checkpoints and ``metrics.json`` record)."""
        return {**dataclasses.asdict(self), "out": str(self.out)}


def default_model(data: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, keyword arguments)`` that ``TrainConfig(data=data, model=None)`` trains.

    Example:
        >>> default_model("cifar10")
        ('glow', {})
    """
    check_choice("data", data, DATASETS)
    name, kwargs = DEFAULT_MODELS[data]
    return name, json.loads(json.dumps(kwargs))  # a copy the caller may change


def _label(field: str) -> str:
    return field


def _stored(stored: Mapping[str, Any], name: str) -> Any:
    return stored[name] if name in stored else OPTIONS_BEFORE_THEY_EXISTED.get(name)


def resume_conflicts(stored: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """Options of ``config`` that differ from the ``stored`` run's and may not change on resume."""
    return [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name not in MAY_CHANGE_ON_RESUME
        and (field.name in stored or field.name in OPTIONS_BEFORE_THEY_EXISTED)
        and _stored(stored, field.name) != getattr(config, field.name)
    ]


def conflict_message(
    stored: Mapping[str, Any], config: TrainConfig, where: str | os.PathLike, label: Callable[[str], str] = _label
) -> str | None:
    """One sentence naming the options that may not change on resume, or None when there are none."""
    fields = resume_conflicts(stored, config)
    if not fields:
        return None
    changes = "; ".join(
        f"{label(f)} is {getattr(config, f)!r} but the run was started with {_stored(stored, f)!r}" for f in fields
    )
    allowed = ", ".join(label(f) for f in MAY_CHANGE_ON_RESUME if f not in ("resume", "overwrite", "out"))
    return (
        f"resume: {changes} (in {where}); a resumed run keeps its options except {allowed}; "
        f"to change the others start a new run (another {label('out')}, or {label('overwrite')})"
    )


def resume_config(out: str | os.PathLike, label: Callable[[str], str] = _label, **changes: Any) -> TrainConfig:
    """The stored options of the run in ``out`` (its ``last.pt``), with ``resume=True`` and ``changes``.

    ``changes`` may set the options of :data:`MAY_CHANGE_ON_RESUME`; any other option given
    must equal the stored one.  ``label`` names an option in messages (the CLI passes its
    flag names).

    Raises:
        RunFolderError: ``out`` holds no ``last.pt``, or ``changes`` changes an option that
            must stay.
        CheckpointError: ``last.pt`` cannot be read.
    """
    from flowkit.training.checkpoint import read_checkpoint
    from flowkit.training.folder import RunFolderError, last_checkpoint

    path = last_checkpoint(Path(out))
    stored = read_checkpoint(path).config
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"changes: {', '.join(unknown)} are not TrainConfig options")
    options = {**OPTIONS_BEFORE_THEY_EXISTED, **{k: v for k, v in stored.items() if k in known}}
    config = TrainConfig(**{**options, **changes})
    # the stored run may have been started with overwrite: that was then, not now
    config.out, config.resume, config.overwrite = str(out), True, changes.get("overwrite", False)
    message = conflict_message(stored, config, path, label)
    if message:
        raise RunFolderError(message)
    return config
