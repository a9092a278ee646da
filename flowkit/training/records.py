"""What a run reports: one :class:`EpochRecord` per epoch and the :class:`TrainResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from flowkit.training.folder import RunFiles

__all__ = ["EpochRecord", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean train bits/dim of the steps taken, validation bits/dim (one-sample
    bound), the learning rate used, the skipped (non-finite) steps and the run's training
    time so far."""

    epoch: int
    train_bpd: float
    val_bpd: float
    lr: float
    skipped_steps: int
    time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    """What :func:`~flowkit.training.train` returns (also written to ``out/metrics.json``).

    Attributes:
        out: the run folder.
        files: its files (``files.best``, ``files.last``, ``files.samples``, ...).
        model_name: the recipe's name (``glow``, ``pkg.mod:function``) or the instance's class.
        epochs: epochs done in all (a resumed run counts the earlier ones).
        history: one :class:`EpochRecord` per epoch.
        best_epoch, best_val_bpd: the epoch with the lowest validation bits/dim (``best.pt``);
            None when no epoch had a finite one.
        test_bpd: importance-sampled test bits/dim of ``best.pt`` (None when
            ``importance_samples == 0``), with ``importance_samples`` samples.
        num_parameters: parameters of the model.
        world_size: processes that trained it (torchrun).
        train_time_s: seconds spent in training epochs (all of them, across resumes).
        skipped_steps: steps skipped for a non-finite loss or gradient (all epochs).
        config: the options the run used (``TrainConfig.to_dict()``).
    """

    out: str
    files: RunFiles
    model_name: str
    epochs: int
    history: list[EpochRecord]
    best_epoch: int | None
    best_val_bpd: float | None
    test_bpd: float | None
    importance_samples: int
    num_parameters: int
    world_size: int
    train_time_s: float
    skipped_steps: int
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``history`` as a list of dicts, ``files`` as ``{name: path}``)."""
        summary = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        summary.update(history=[h.to_dict() for h in self.history], files=self.files.to_dict())
        return summary
