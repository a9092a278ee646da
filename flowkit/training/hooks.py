"""What varies around the training loop, as small hooks (in the spirit of Lightning's callbacks).

The loop (:mod:`flowkit.training.loop`) calls every hook of the run, in order, at six points:

* ``on_fit_start(run)`` and ``on_fit_end(run, result)``;
* ``on_epoch_start(run, epoch, num_batches)`` and ``on_epoch_end(run, record)``;
* ``on_step_end(run, step)`` after every step (nothing is read from the device here);
* ``on_sync(run, epoch, stats)`` every :data:`~flowkit.training.loop.SYNC_EVERY` steps and at
  the end of each epoch, with the step statistics read from the device once (:class:`StepStats`).

A hook overrides the methods it needs; :class:`Hook` makes the others no-ops.  The default
hooks of a run (:func:`default_hooks`): stop on non-finite losses, write checkpoints, write
metrics, log to TensorBoard (``tensorboard=True``), print one line per epoch and show a
progress bar, and draw the pictures at the end.  ``train(config, hooks=[...])`` appends yours.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
from typing import TYPE_CHECKING, Any

from flowkit.errors import NonFiniteLossError, UserError
from flowkit.io import atomic_write_text, write_json
from flowkit.training.checkpoint import check_finite, save_checkpoint
from flowkit.training.config import TrainConfig
from flowkit.training.folder import remove_run
from flowkit.training.records import EpochRecord, TrainResult

if TYPE_CHECKING:
    from flowkit.training.run import Run

__all__ = [
    "CheckpointWriter",
    "EpochLog",
    "Hook",
    "MetricsWriter",
    "Pictures",
    "ProgressBar",
    "StepStats",
    "StopOnNonFinite",
    "TensorBoardLogger",
    "default_hooks",
]


@dataclasses.dataclass(frozen=True)
class StepStats:
    """Step statistics of the current epoch, read from the device.

    ``train_bpd``: mean bits/dim of the steps taken so far (this process's share until the end
    of the epoch, then over all processes); ``skipped``: steps skipped this epoch;
    ``max_in_a_row``: the longest run of consecutive non-finite steps of the whole run.
    """

    train_bpd: float
    skipped: int
    max_in_a_row: int


class Hook:
    """Base class: every method does nothing; override the ones you need."""

    def on_fit_start(self, run: Run) -> None:
        pass

    def on_epoch_start(self, run: Run, epoch: int, num_batches: int) -> None:
        pass

    def on_step_end(self, run: Run, step: int) -> None:
        pass

    def on_sync(self, run: Run, epoch: int, stats: StepStats) -> None:
        pass

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        pass

    def on_fit_end(self, run: Run, result: TrainResult) -> None:
        pass


class StopOnNonFinite(Hook):
    """The non-finite policy: steps with a NaN/inf loss or gradient are skipped (the loop masks
    the optimizer update on the device); after ``max_in_a_row`` of them in a row, stop with
    :class:`NonFiniteLossError`.

    The count is read at every ``on_sync``, so the stop comes up to ``SYNC_EVERY`` steps after
    the limit is reached; those steps cannot harm the model (skipped steps change nothing, and
    the limit is checked before any checkpoint is written).
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row

    def on_sync(self, run: Run, epoch: int, stats: StepStats) -> None:
        if stats.max_in_a_row < self.max_in_a_row:
            return
        last = run.files.last
        raise NonFiniteLossError(
            f"training stopped in epoch {epoch + 1}: {stats.max_in_a_row} steps in a row had a non-finite loss or "
            f"gradient (the limit, max_nonfinite, is {self.max_in_a_row}; {run.skipped_steps + stats.skipped} "
            "skipped in all); the last finite checkpoint is "
            f"{last if last.is_file() else 'none (no epoch finished)'}. Try a lower --lr or a smaller --grad-clip."
        )


class CheckpointWriter(Hook):
    """Writes ``last.pt`` after every epoch and ``best.pt`` when the validation bpd improved
    (rank 0; every rank checks the state is finite first, so all stop together if not).  With
    ``overwrite``, the old run's files go just before the first checkpoint of the new one."""

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        checkpoint = run.checkpoint()
        check_finite(checkpoint, run.files.last)
        if run.ctx.is_main and run.replace_old_run:
            remove_run(run.files)
        run.replace_old_run = False
        if run.ctx.is_main:
            save_checkpoint(checkpoint, run.files.last)
            if run.best_epoch == record.epoch:
                save_checkpoint(checkpoint, run.files.best)
        run.ctx.barrier()
        run.saved_epoch = record.epoch


def _write_metrics(run: Run, summary: dict[str, Any]) -> None:
    rows = [h.to_dict() for h in run.history]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[f.name for f in dataclasses.fields(EpochRecord)])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.files.metrics_csv, text.getvalue())
    write_json(run.files.metrics_json, {**summary, "history": rows})


class MetricsWriter(Hook):
    """``metrics.csv`` (one row per epoch) and ``metrics.json`` (the options, the summary and
    the history; at the end the whole :class:`TrainResult`), rank 0."""

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if run.ctx.is_main:
            _write_metrics(run, run.summary())

    def on_fit_end(self, run: Run, result: TrainResult) -> None:
        if run.ctx.is_main:
            _write_metrics(run, {k: v for k, v in result.to_dict().items() if k != "history"})


class TensorBoardLogger(Hook):
    """Epoch metrics for TensorBoard in ``out/tensorboard`` (rank 0; needs ``tensorboard``).

    Raises:
        UserError: at construction, when the ``tensorboard`` package is not installed.
    """

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "tensorboard: logging for TensorBoard needs the tensorboard package (pip install tensorboard); "
                "run without --tensorboard (tensorboard=False) otherwise"
            ) from None
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def _write(self, run: Run, values: dict[str, float], step: int) -> None:
        if not run.ctx.is_main:
            return
        if self.writer is None:  # created with the first epoch's files, not before
            self.writer = self._writer_class(log_dir=str(run.files.tensorboard))
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        values = {"bpd/train": record.train_bpd, "bpd/val": record.val_bpd, "lr": record.lr}
        self._write(run, {**values, "skipped_steps": record.skipped_steps}, record.epoch)

    def on_fit_end(self, run: Run, result: TrainResult) -> None:
        if result.test_bpd is not None:
            self._write(run, {"bpd/test": result.test_bpd}, result.epochs)
        if self.writer is not None:
            self.writer.close()


class EpochLog(Hook):
    """One line per epoch on stdout (rank 0): train and validation bpd, lr, time."""

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if not run.ctx.is_main:
            return
        best = " (best)" if run.best_epoch == record.epoch else ""
        skipped = f", {record.skipped_steps} skipped" if record.skipped_steps else ""
        print(
            f"epoch {record.epoch}/{run.config.epochs}: train {record.train_bpd:.4f} bpd, val {record.val_bpd:.4f} bpd"
            f"{best}, lr {record.lr:.2e}{skipped}, {record.time_s:.1f}s",
            flush=True,
        )


class ProgressBar(Hook):
    """A tqdm bar per epoch, only on rank 0 and only when stdout is a terminal (in a log file
    :class:`EpochLog`'s lines are the progress); the bpd shown is refreshed at each sync."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, run: Run, epoch: int, num_batches: int) -> None:
        if run.ctx.is_main and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=num_batches, desc=f"epoch {epoch + 1}/{run.config.epochs}", leave=False)

    def on_step_end(self, run: Run, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_sync(self, run: Run, epoch: int, stats: StepStats) -> None:
        if self.bar is not None and math.isfinite(stats.train_bpd):
            self.bar.set_postfix(bpd=f"{stats.train_bpd:.3f}")

    def on_epoch_end(self, run: Run, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Pictures(Hook):
    """``samples.png`` (``num_samples`` samples of the final model at ``sample_temperature``;
    for a class-conditional model one row per class, ``num_samples // K`` (at least 1) each)
    and ``curves.png`` (train/validation bpd per epoch), rank 0, at the end of the run."""

    def on_fit_end(self, run: Run, result: TrainResult) -> None:
        import torch

        from flowkit.analysis import plot_class_samples
        from flowkit.viz import save_curves, save_image_grid

        if not run.ctx.is_main:
            return
        config, model = run.config, run.final_model or run.model
        title = f"{result.model_name} on {config.data}"
        if model.num_classes is not None:
            per_class = max(1, config.num_samples // model.num_classes)
            plot_class_samples(
                model,
                run.files.samples,
                per_class,
                config.sample_temperature,
                seed=config.seed,
                shared_noise=False,
                title=f"{title}, T={config.sample_temperature}, one row per class",
            )
        else:
            gen = torch.Generator(device=run.device).manual_seed(config.seed)
            samples = model.sample(config.num_samples, temperature=config.sample_temperature, generator=gen)
            title_t = f"{title}, T={config.sample_temperature}"
            save_image_grid(samples, run.files.samples, model.num_levels, title=title_t)
        history = run.history
        curves = {"train": [h.train_bpd for h in history], "val": [h.val_bpd for h in history]}
        save_curves(curves, run.files.curves, title=title, x=[h.epoch for h in history])


def default_hooks(config: TrainConfig) -> list[Hook]:
    """The hooks every run has, in the order they are called (see the module docstring)."""
    hooks: list[Hook] = [StopOnNonFinite(config.max_nonfinite), CheckpointWriter(), MetricsWriter()]
    if config.tensorboard:
        hooks.append(TensorBoardLogger())
    if config.progress:
        hooks.append(ProgressBar())
    return [*hooks, EpochLog(), Pictures()]
