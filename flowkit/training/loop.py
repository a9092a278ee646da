"""The training loop: :func:`train` = :func:`~flowkit.training.run.start_run` + :func:`fit`.

One step (:func:`train_step`) is ``bpd -> backward -> clip -> Adam -> learning-rate schedule
-> weight average`` (the last with ``ema_decay`` only), with no host synchronisation: the step's loss, its finiteness and the skip decision stay on the device.

Non-finite steps.  ``ok = isfinite(loss) and isfinite(grad norm)`` (an AND over the ranks
under DDP) is handed to fused Adam as ``found_inf = not ok``, the mechanism
``torch.amp.GradScaler`` uses: on a non-finite step Adam leaves the parameters, its moments
and its step count exactly as they were, so a skipped step is a step that never happened,
as when the loop used to read ``float(loss)`` and ``continue``.  The loss sum, the number of
images and the skip counters accumulate on the device (:class:`StepMeter`) and are read every
:data:`SYNC_EVERY` steps and at the end of the epoch, where the non-finite policy
(:class:`~flowkit.training.hooks.StopOnNonFinite`) looks at them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flowkit.models import ImageFlow
from flowkit.training.config import TrainConfig
from flowkit.training.evaluation import bpd_sum
from flowkit.training.hooks import Hook, StepStats
from flowkit.training.records import EpochRecord, TrainResult
from flowkit.training.run import Run, start_run
from flowkit.training.runtime import cpu_threads, seed_all

__all__ = ["SYNC_EVERY", "StepMeter", "TrainingInterrupted", "fit", "train", "train_epoch", "train_step"]

#: steps between two reads of the step statistics from the device (progress, non-finite policy)
SYNC_EVERY = 25


@dataclasses.dataclass
class StepMeter:
    """Device-side sums of an epoch's steps: loss x images of the good steps, their images,
    the skipped steps, and the current and longest runs of consecutive non-finite steps."""

    loss_sum: torch.Tensor
    images: torch.Tensor
    skipped: torch.Tensor
    in_a_row: torch.Tensor
    max_in_a_row: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device, in_a_row: torch.Tensor | None = None) -> StepMeter:
        run = torch.zeros((), dtype=torch.long, device=device) if in_a_row is None else in_a_row
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        return cls(loss_sum, torch.zeros_like(loss_sum), torch.zeros_like(run), run, run.clone())

    def update(self, loss: torch.Tensor, ok: torch.Tensor, num_images: int) -> None:
        self.loss_sum += torch.where(ok, loss.double() * num_images, 0.0)
        self.images += ok * num_images
        self.skipped += ~ok
        self.in_a_row = torch.where(ok, 0, self.in_a_row + 1)
        torch.maximum(self.max_in_a_row, self.in_a_row, out=self.max_in_a_row)

    def read(self, ctx=None) -> StepStats:
        """The statistics (one host synchronisation); with ``ctx`` the loss is averaged over the ranks."""
        sums = torch.stack([self.loss_sum, self.images])
        if ctx is not None:
            sums = ctx.sum_tensor(sums)
        loss_sum, images, skipped, max_in_a_row = torch.cat(
            [sums, torch.stack([self.skipped, self.max_in_a_row])]
        ).tolist()
        return StepStats(loss_sum / images if images else math.nan, int(skipped), int(max_in_a_row))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the run stopped; ``checkpoint`` (if any) holds the last finished epoch."""

    def __init__(self, out: Path, checkpoint: Path | None, epoch: int, epochs: int):
        self.out, self.checkpoint, self.epoch, self.epochs = out, checkpoint, epoch, epochs
        saved = (
            f"{checkpoint} holds epoch {epoch} of {epochs}" if checkpoint else "nothing was saved (no epoch finished)"
        )
        super().__init__(f"training interrupted; {saved}")


def train_step(run: Run, x: torch.Tensor, meter: StepMeter, y: torch.Tensor | None = None) -> None:
    """One optimisation step on the batch ``x`` (with its labels ``y`` for a conditional model),
    skipped on the device when not finite."""
    loss = (run.step_loss(x) if y is None else run.step_loss(x, y)).mean()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = run.config.grad_clip if run.config.grad_clip > 0 else math.inf
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), max_norm, foreach=True)
    ok = run.ctx.all_true(torch.isfinite(loss) & torch.isfinite(grad_norm))  # skip on every rank, or on none
    # fused Adam: no update where found_inf (see the module docstring)
    run.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
    run.optimizer.step()
    run.scheduler.step()  # per step: warm-up, then lr_decay per epoch
    if run.ema is not None:
        run.ema.update(run.model)
    meter.update(loss.detach(), ok, x.shape[0])


def _mean_bpd(run: Run, model: ImageFlow, split: str, importance_samples: int) -> float:
    """Mean bits/dim of ``model`` on a split (this rank's shard), summed over the ranks."""
    total, count = bpd_sum(model, run.loaders[split], importance_samples, run.config.max_eval_batches, validate=False)
    total, count = run.ctx.sum_tensor(torch.stack([total, total.new_tensor(count)])).tolist()
    return total / count if count else math.nan


def train_epoch(run: Run, epoch: int, meter: StepMeter) -> EpochRecord:
    """Epoch ``epoch`` (0-based): the steps, then the validation bpd; returns its record."""
    t0 = time.perf_counter()
    run.sampler.set_epoch(epoch)
    seed_all(run.config.seed, run.ctx.rank, 0, epoch)  # this rank's noise for this epoch
    run.model.train()
    lr = run.optimizer.param_groups[0]["lr"]
    loader = run.loaders["train"]
    num_batches = run.steps_per_epoch
    run.call("on_epoch_start", epoch, num_batches)
    for step, (x, y) in zip(range(num_batches), loader, strict=False):
        labels = y.to(run.device, non_blocking=True) if run.conditional else None
        train_step(run, x.to(run.device, non_blocking=True), meter, labels)
        run.call("on_step_end", step)
        if (step + 1) % SYNC_EVERY == 0:
            run.call("on_sync", epoch, meter.read())
    stats = meter.read(run.ctx)
    run.call("on_sync", epoch, stats)  # the non-finite policy looks before anything is saved
    val_bpd = _mean_bpd(run, run.eval_model, "val", 1)
    run.train_time_s += time.perf_counter() - t0
    return EpochRecord(epoch + 1, stats.train_bpd, val_bpd, lr, stats.skipped, round(run.train_time_s, 3))


def _test_bpd(run: Run, model: ImageFlow) -> float | None:
    if run.config.importance_samples == 0:
        return None
    seed_all(run.config.seed, run.ctx.rank, 1)  # the final evaluation's noise
    return _mean_bpd(run, model, "test", run.config.importance_samples)


def _result(run: Run, test_bpd: float | None) -> TrainResult:
    return TrainResult(
        out=str(run.files.out),
        files=run.files,
        model_name=run.model_name,
        epochs=run.epoch,
        history=list(run.history),
        best_epoch=run.best_epoch,
        best_val_bpd=run.best_val_bpd,
        test_bpd=test_bpd,
        importance_samples=run.config.importance_samples,
        num_parameters=sum(p.numel() for p in run.model.parameters()),
        world_size=run.ctx.world_size,
        train_time_s=run.train_time_s,
        skipped_steps=run.skipped_steps,
        config=run.config.to_dict(),
    )


def fit(run: Run) -> TrainResult:
    """Train ``run`` to ``config.epochs``, then test the best model; hooks do the rest."""
    run.call("on_fit_start")
    in_a_row = None  # consecutive non-finite steps carry over from one epoch to the next
    for epoch in range(run.epoch, run.config.epochs):
        meter = StepMeter.zeros(run.device, in_a_row)
        run.add_epoch(train_epoch(run, epoch, meter))
        in_a_row = meter.in_a_row
        run.call("on_epoch_end", run.history[-1])
    run.final_model = run.best_model()
    result = _result(run, _test_bpd(run, run.final_model))
    run.call("on_fit_end", result)
    run.ctx.barrier()
    return result


def train(config: TrainConfig, model: ImageFlow | None = None, *, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train an image flow as ``config`` says; returns a :class:`TrainResult` (also in ``out/metrics.json``).

    Args:
        config: the options (:class:`TrainConfig`).
        model: a ready :class:`~flowkit.models.ImageFlow` to train (any nflows Transform
            inside); ``None``: build ``config.model`` (a registry name or an import path).
            An instance is trained in place (it ends with the last epoch's weights; ``best.pt``
            holds the best, the weight average with ``ema_decay``) and its checkpoints have no recipe, so ``load_checkpoint`` needs it
            again as ``model=``.
        hooks: extra :class:`~flowkit.training.hooks.Hook` objects, called after the default ones.

    Under torchrun every rank returns the same result (metrics are reduced over the ranks);
    only rank 0 writes files.

    Raises:
        ValueError, TypeError: a bad option (:meth:`TrainConfig.validate`).
        UserError: the run folder, checkpoint, data set or model cannot be used as asked
            (:class:`RunFolderError`, :class:`CheckpointError`, ...); nothing was written.
        NonFiniteLossError: ``max_nonfinite`` non-finite steps in a row (the checkpoints
            of the last good epoch stay on disk).
        TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``); ``last.pt`` holds the last
            finished epoch, and ``resume=True`` continues from it.
    """
    with cpu_threads(config.threads):
        run = start_run(config, model, hooks)
        try:
            return fit(run)
        except KeyboardInterrupt:
            last = run.files.last if run.saved_epoch else None
            raise TrainingInterrupted(run.files.out, last, run.saved_epoch, run.config.epochs) from None
        finally:
            run.ctx.close()
