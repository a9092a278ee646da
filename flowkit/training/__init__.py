"""Train, evaluate and checkpoint any :class:`~flowkit.models.ImageFlow` on integer images.

``train(config, model=None)`` trains a model named in the config (a registry name such as
``glow``, or an import path ``"package.module:function"``; none: the data set's default,
:func:`~flowkit.training.config.default_model`) or a ready instance (any nflows Transform
inside).  Per epoch it minimises bits/dim with Adam, clips gradients, follows a per-step
learning-rate schedule (an optional linear warm-up, then ``lr_decay`` per epoch, as the
image-flow tutorial's ``StepLR``), optionally keeps a moving average of the weights for
evaluation (``ema_decay``), measures validation bits/dim and writes ``last.pt`` (and
``best.pt`` when the validation bpd improved) atomically; at the end it measures the
importance-sampled test bpd of the best model.  The engine, one part per module:

* :mod:`~flowkit.training.config`: the options (:class:`TrainConfig`) and what a resumed run
  may change (:func:`resume_config`);
* :mod:`~flowkit.training.runtime` and :mod:`~flowkit.training.distributed`: device, CPU
  threads, seeding, the DDP context;
* :mod:`~flowkit.training.folder`: the run folder, which never loses a run;
* :mod:`~flowkit.training.checkpoint`: the typed checkpoint record, atomic save, safe load;
* :mod:`~flowkit.training.run`: setting up a run (every user error surfaces here, before
  anything is written);
* :mod:`~flowkit.training.loop`: the loop and its step, with no host synchronisation per step;
* :mod:`~flowkit.training.schedule`: the per-step learning-rate schedule and the weight average;
* :mod:`~flowkit.training.hooks`: what varies (non-finite policy, checkpoints, metrics,
  TensorBoard, progress, pictures);
* :mod:`~flowkit.training.evaluation`: bits/dim of a model on a data set, and the
  independent-pixel baseline.

Resume.  Randomness is a function of ``(seed, rank, epoch)``: the training order is a
``DistributedSampler`` permutation seeded with ``seed + epoch``, and the noise streams
(dequantization, importance sampling) are reseeded at the start of every epoch, so
``resume=True`` continues the *same* trajectory as an uninterrupted run.

Distributed training.  Under ``torchrun --nproc_per_node=N -m flowkit train ...`` every
process builds the same model, initialises ActNorm on the same ``init_batch_size`` images and
takes rank 0's parameters and buffers; the step runs through ``DistributedDataParallel``
(gradients averaged in ``backward``), each rank drawing its own dequantization noise.
``batch_size`` is the **global** batch: each rank takes ``batch_size / N`` images of the same
permutation, so step ``s`` sees the same images for any ``N``.  Validation and test bits/dim
are summed over the ranks; rank 0 alone prints, shows progress and writes files (the others
wait at a barrier), so ``out`` must be on a file system every rank can read.

Non-finite losses (or gradients) are skipped and counted; after ``max_nonfinite`` in a row
training stops with :class:`NonFiniteLossError`.  A checkpoint with a non-finite tensor is
never written.
"""

from flowkit.errors import NonFiniteLossError
from flowkit.training.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    CheckpointError,
    LoadedCheckpoint,
    ModelRecipe,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from flowkit.training.config import MAY_CHANGE_ON_RESUME, TrainConfig, resume_config
from flowkit.training.evaluation import evaluate, evaluate_bpd, independent_pixel_bpd
from flowkit.training.folder import RunFiles, RunFolderError
from flowkit.training.hooks import Hook, StepStats
from flowkit.training.loop import TrainingInterrupted, train
from flowkit.training.records import EpochRecord, TrainResult
from flowkit.training.run import ConfigError
from flowkit.training.runtime import resolve_device

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "EpochRecord",
    "Hook",
    "LoadedCheckpoint",
    "MAY_CHANGE_ON_RESUME",
    "ModelRecipe",
    "NonFiniteLossError",
    "RunFiles",
    "RunFolderError",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_bpd",
    "independent_pixel_bpd",
    "load_checkpoint",
    "read_checkpoint",
    "resolve_device",
    "resume_config",
    "save_checkpoint",
    "train",
]
