"""Checkpoints: a typed record of a run's state, written atomically, read safely.

A checkpoint file holds tensors and JSON-able metadata only (it is read with
``torch.load(weights_only=True)``, which runs no pickled code):

* the model's ``state_dict`` and how to rebuild the model, its :class:`ModelRecipe`
  (a registry name or an import path ``"package.module:function"``, its JSON keyword
  arguments, ``image_shape`` and ``num_levels``; a class-conditional model's recipe holds
  ``num_classes`` among the arguments, and the checkpoint records it), or ``None`` for a model passed to
  :func:`~flowkit.training.train` as an instance, which :func:`load_checkpoint` then needs
  again as ``model=``;
* the optimizer and scheduler states, the epoch, the metric history and the run's options;
* with a moving average of the weights (``ema_decay``): ``state_dict`` holds the averaged
  weights (the model that is evaluated, loaded and sampled), ``train_state_dict`` the training
  weights and ``ema`` the average's state (what a resumed run continues from).

:func:`save_checkpoint` never writes NaN/inf and replaces the file in one step
(:func:`flowkit.io.atomic_write_bytes`); :func:`read_checkpoint` turns a missing, empty, truncated, random or foreign
file into one :class:`CheckpointError` sentence.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowkit.errors import NonFiniteLossError, UserError
from flowkit.io import atomic_write_bytes
from flowkit.models import ImageFlow, build_model
from flowkit.training.runtime import resolve_device

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "LoadedCheckpoint",
    "ModelRecipe",
    "load_checkpoint",
    "read_checkpoint",
    "restore_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "flowkit-checkpoint-2"
_FORMAT_1 = "flowkit-checkpoint-1"  # flowkit 0.1: registry models only, the recipe under "model"


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot be used: missing, unreadable, not flowkit's, or not for this model."""


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How to rebuild a model: ``build_model(name, image_shape, num_levels, **kwargs)``.

    Args:
        name: a registry name (``glow``, ...) or an import path ``"package.module:function"``.
        image_shape: ``(C, H, W)`` of the data.
        num_levels: levels per pixel of the data.
        kwargs: the builder's keyword arguments (JSON-able).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_levels: int
    kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self) -> ImageFlow:
        """A fresh model built from the recipe."""
        return build_model(self.name, self.image_shape, self.num_levels, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "num_levels": self.num_levels,
            "kwargs": self.kwargs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecipe:
        return cls(str(data["name"]), tuple(data["image_shape"]), int(data["num_levels"]), dict(data["kwargs"]))


@dataclasses.dataclass
class Checkpoint:
    """What ``last.pt``/``best.pt`` hold (see the module docstring).

    ``recipe`` is None for a model trained as an instance; ``model_class`` names its class
    (``package.module.Class``) so a message can say what to pass.  ``num_classes`` is the
    number of classes of a class-conditional model (None: unconditional).  ``train_state_dict``
    and ``ema`` are set when the run averages its weights (``state_dict`` is then the average).
    """

    state_dict: dict[str, torch.Tensor]
    recipe: ModelRecipe | None
    model_class: str
    image_shape: tuple[int, int, int]
    num_levels: int
    epoch: int = 0
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_val_bpd: float | None = None
    best_epoch: int | None = None
    skipped_steps: int = 0
    train_time_s: float = 0.0
    world_size: int = 1
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    num_classes: int | None = None
    train_state_dict: dict[str, torch.Tensor] | None = None
    ema: dict[str, Any] | None = None

    @property
    def model_name(self) -> str:
        """The recipe's name, or the class of an instance-trained model."""
        return self.recipe.name if self.recipe is not None else self.model_class

    def to_payload(self) -> dict[str, Any]:
        """The dict written with ``torch.save`` (tensors and JSON-able values only)."""
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no copies of the tensors
        payload.update(
            format=CHECKPOINT_FORMAT,
            recipe=None if self.recipe is None else self.recipe.to_dict(),
            image_shape=list(self.image_shape),
        )
        return payload

    @classmethod
    def from_payload(cls, payload: Any, path: str | os.PathLike) -> Checkpoint:
        """The record of a loaded file; :class:`CheckpointError` when it is not a flowkit checkpoint."""
        if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, _FORMAT_1):
            found = payload.get("format") if isinstance(payload, dict) else None
            what = f"has format {found!r}, which this flowkit cannot read" if isinstance(found, str) else "is not one"
            raise CheckpointError(
                f"checkpoint: {path} is not a flowkit checkpoint ({what}; expected a file written by flowkit train)"
            )
        try:
            return cls._from_fields(_upgrade(payload))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint: {path} is damaged (entry {err} is missing or malformed)") from None

    @classmethod
    def _from_fields(cls, payload: dict[str, Any]) -> Checkpoint:
        state = payload["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError("state_dict")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in payload.items() if k in names}
        recipe = payload["recipe"]
        fields.update(
            recipe=None if recipe is None else ModelRecipe.from_dict(recipe),
            image_shape=tuple(payload["image_shape"]),
            num_levels=int(payload["num_levels"]),
        )
        return cls(**fields)


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 payload (flowkit 0.1) in today's layout."""
    if payload["format"] != _FORMAT_1:
        return payload
    recipe = payload["model"]
    best = payload.get("best_val_bpd")
    return {
        **{k: v for k, v in payload.items() if k != "model"},
        "recipe": recipe,
        "model_class": f"{ImageFlow.__module__}.{ImageFlow.__name__}",
        "image_shape": recipe["image_shape"],
        "num_levels": recipe["num_levels"],
        "best_val_bpd": None if best is None or best == float("inf") else best,
    }


@dataclasses.dataclass
class LoadedCheckpoint:
    """:func:`load_checkpoint`'s result: the model (eval mode) and the checkpoint record.

    Unpacks as ``model, checkpoint = load_checkpoint(path)``.
    """

    model: nn.Module
    checkpoint: Checkpoint

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.checkpoint))


def _nonfinite_entry(tree: Any, prefix: str = "") -> str | None:
    """Name of the first floating tensor in a nested dict/list with a NaN or inf, else None."""
    if isinstance(tree, torch.Tensor):
        return prefix or "tensor" if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = _nonfinite_entry(value, f"{prefix}.{key}" if prefix else str(key))
        if bad:
            return bad
    return None


def check_finite(checkpoint: Checkpoint, path: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteLossError` if a parameter, buffer or optimizer state holds NaN/inf."""
    for name in ("state_dict", "train_state_dict", "optimizer"):
        bad = _nonfinite_entry(getattr(checkpoint, name), name)
        if bad:
            raise NonFiniteLossError(f"refusing to write a non-finite checkpoint to {path}: {bad} has NaN/inf values")


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (:func:`flowkit.io.atomic_write_bytes`); returns the path.

    Raises:
        NonFiniteLossError: a parameter, buffer or optimizer state holds NaN/inf; nothing is
            written and an existing file at ``path`` is left untouched.
    """
    check_finite(checkpoint, path)
    buffer = io.BytesIO()
    torch.save(checkpoint.to_payload(), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is a folder; expected a file such as {path / 'best.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint: {path} is empty (0 bytes), not a flowkit checkpoint")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint: {path} is not readable (permissions)")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The :class:`Checkpoint` in ``path``, read with ``weights_only=True`` (no pickled code runs).

    Raises:
        CheckpointError: one sentence for a missing, empty, truncated, random or foreign file.
    """
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to parse an untrusted file means: not a readable checkpoint
        raise CheckpointError(
            f"checkpoint: {path} cannot be read: it is truncated, damaged, or not a file of tensors and plain "
            f"data written by flowkit train ({type(err).__name__})"
        ) from None
    return Checkpoint.from_payload(payload, path)


def _no_recipe_message(path: Path, checkpoint: Checkpoint) -> str:
    return (
        f"checkpoint: {path} holds a model trained as an instance ({checkpoint.model_class}), with no recipe to "
        "rebuild it; pass the same architecture, built as for training: load_checkpoint(path, model=...) "
        "(or train with model='package.module:function' so that checkpoints record how to build it)"
    )


def restore_model(model: nn.Module, checkpoint: Checkpoint, path: str | os.PathLike) -> None:
    """Load ``checkpoint``'s weights into ``model``; :class:`CheckpointError` when they do not fit."""
    shape, levels = getattr(model, "image_shape", checkpoint.image_shape), getattr(model, "num_levels", None)
    if tuple(shape) != tuple(checkpoint.image_shape) or levels not in (None, checkpoint.num_levels):
        raise CheckpointError(
            f"checkpoint: {path} was trained on images {tuple(checkpoint.image_shape)} with {checkpoint.num_levels} "
            f"levels; the given model takes {tuple(shape)} with {levels} levels"
        )
    classes = getattr(model, "num_classes", checkpoint.num_classes)
    if classes != checkpoint.num_classes:

        def say(k: int | None) -> str:
            return "unconditional" if k is None else f"conditional on {k} classes"

        raise CheckpointError(
            f"checkpoint: {path} holds a model {say(checkpoint.num_classes)}; the given model is {say(classes)}"
        )
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError:
        ours, theirs = set(model.state_dict()), set(checkpoint.state_dict)
        missing, extra = sorted(ours - theirs)[:3], sorted(theirs - ours)[:3]
        raise CheckpointError(
            f"checkpoint: {path} does not fit the given {type(model).__name__} (missing {missing}, unexpected "
            f"{extra}, or tensors of other shapes); pass the architecture it was trained with"
        ) from None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device | None = None
) -> LoadedCheckpoint:
    """The model stored in a checkpoint, in eval mode, and the checkpoint record.

    Args:
        path: ``best.pt`` / ``last.pt`` of a run.
        model: load the weights into this instance (needed when the checkpoint has no recipe,
            i.e. the run trained an instance); ``None``: rebuild it from the recipe.
        device: where to put the model (``None``: ``auto``).

    Returns:
        ``LoadedCheckpoint(model, checkpoint)`` (unpacks as ``model, checkpoint = ...``).

    Raises:
        CheckpointError: the file cannot be read, has no recipe and no ``model`` was given, or
            does not fit the given ``model``.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    if model is None:
        if checkpoint.recipe is None:
            raise CheckpointError(_no_recipe_message(path, checkpoint))
        model = checkpoint.recipe.build()
    restore_model(model, checkpoint, path)
    model.to(resolve_device("auto" if device is None else device))
    model.eval()
    return LoadedCheckpoint(model, checkpoint)
