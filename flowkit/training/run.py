"""Setting up a run: options checked, the model built (or taken), the data loaded, the state
restored on resume.  Everything that can go wrong because of what was asked goes wrong here,
before the first step and before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from flowkit.data import DatasetInfo, ImageDataset, dataset_info, load_splits
from flowkit.errors import UserError
from flowkit.models import ImageFlow, ModelBuildError
from flowkit.training.checkpoint import Checkpoint, CheckpointError, ModelRecipe, read_checkpoint, restore_model
from flowkit.training.config import TrainConfig, conflict_message, default_model
from flowkit.training.distributed import DistributedContext
from flowkit.training.distributed import setup as setup_distributed
from flowkit.training.folder import RunFiles, RunFolderError, check_run_folder
from flowkit.training.hooks import Hook, default_hooks
from flowkit.training.records import EpochRecord
from flowkit.training.runtime import seed_all
from flowkit.training.schedule import WeightAverage, make_scheduler
from flowkit.validation import check_labels

__all__ = ["ConfigError", "Run", "start_run"]


class ConfigError(UserError, ValueError):
    """Options that do not fit together (or do not fit the data or the processes)."""


class TrainingLoss(nn.Module):
    """``forward(x, y) = model.bpd(x, y)``: the training loss as a module's ``forward``, which is
    what DistributedDataParallel calls (and hooks to average the gradients over the ranks).  The
    batches come from a data set checked when it was loaded, so the per-batch check is skipped.
    ``y`` (the labels) is given for a conditional model only."""

    def __init__(self, model: ImageFlow):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            return self.model.bpd(x, validate=False)
        return self.model.bpd(x, y, validate=False)


@dataclasses.dataclass
class Run:
    """A run in progress: its parts and its progress (what a checkpoint stores)."""

    config: TrainConfig
    ctx: DistributedContext
    files: RunFiles
    model: ImageFlow
    recipe: ModelRecipe | None
    step_loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: DistributedSampler
    loaders: dict[str, DataLoader]
    hooks: list[Hook]
    steps_per_epoch: int
    ema: WeightAverage | None = None
    history: list[EpochRecord] = dataclasses.field(default_factory=list)
    best_val_bpd: float | None = None
    best_epoch: int | None = None
    skipped_steps: int = 0
    train_time_s: float = 0.0
    saved_epoch: int = 0
    replace_old_run: bool = False
    final_model: ImageFlow | None = None

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def conditional(self) -> bool:
        """Whether the model learns ``p(x | y)`` (its steps and evaluations take the labels)."""
        return self.model.is_conditional

    @property
    def eval_model(self) -> ImageFlow:
        """The model that is evaluated and saved: the weight average (``ema_decay``), or the model."""
        return self.model if self.ema is None else self.ema.model  # type: ignore[return-value]

    @property
    def epoch(self) -> int:
        """Epochs done."""
        return len(self.history)

    @property
    def model_name(self) -> str:
        return self.recipe.name if self.recipe is not None else _class_name(self.model)

    def call(self, event: str, *args: Any) -> None:
        """Call ``event`` (``on_fit_start``, ...) on every hook, in order."""
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def add_epoch(self, record: EpochRecord) -> None:
        """Record a finished epoch (and whether its validation bpd is the best so far)."""
        self.history.append(record)
        self.skipped_steps += record.skipped_steps
        if math.isfinite(record.val_bpd) and (self.best_val_bpd is None or record.val_bpd < self.best_val_bpd):
            self.best_val_bpd, self.best_epoch = record.val_bpd, record.epoch

    def checkpoint(self) -> Checkpoint:
        """The run's state as a :class:`Checkpoint` record."""
        return Checkpoint(
            state_dict=self.eval_model.state_dict(),
            recipe=self.recipe,
            model_class=_class_name(self.model),
            image_shape=self.model.image_shape,
            num_levels=self.model.num_levels,
            epoch=self.epoch,
            config=self.config.to_dict(),
            history=[h.to_dict() for h in self.history],
            best_val_bpd=self.best_val_bpd,
            best_epoch=self.best_epoch,
            skipped_steps=self.skipped_steps,
            train_time_s=self.train_time_s,
            world_size=self.ctx.world_size,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            num_classes=self.model.num_classes,
            train_state_dict=None if self.ema is None else self.model.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(),
        )

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` says during the run."""
        return {
            "config": self.config.to_dict(),
            "model_name": self.model_name,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.ctx.world_size,
            "best_epoch": self.best_epoch,
            "best_val_bpd": self.best_val_bpd,
            "skipped_steps": self.skipped_steps,
            "train_time_s": self.train_time_s,
        }

    def best_model(self) -> ImageFlow:
        """The model of ``best.pt`` (the run's evaluated model itself when the last epoch was the best)."""
        if self.best_epoch is None or self.best_epoch == self.epoch or not self.files.best.is_file():
            return self.eval_model
        best = copy.deepcopy(self.eval_model)
        restore_model(best, read_checkpoint(self.files.best), self.files.best)
        return best


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _resolve_model_option(config: TrainConfig, model: ImageFlow | None) -> TrainConfig:
    """``config`` with ``model=None`` read as the data set's default model (its registry name,
    and its arguments updated by ``model_kwargs``) when no instance is given; checks the instance."""
    if model is None:
        if config.model is not None:
            return config
        name, kwargs = default_model(config.data)
        return dataclasses.replace(config, model=name, model_kwargs={**kwargs, **config.model_kwargs})
    if not isinstance(model, ImageFlow):
        raise TypeError(f"model: expected a flowkit ImageFlow instance, got {type(model).__name__}")
    if config.model is not None:
        raise ConfigError(
            f"model: give the model either as an instance (train(config, model=...)) or by name in config.model, "
            f"not both (config.model is {config.model!r})"
        )
    return config


def _load_data(config: TrainConfig) -> tuple[DatasetInfo, dict[str, ImageDataset]]:
    kwargs: dict[str, Any] = {"root": config.data_root, "seed": 0}
    if config.val_size is not None:
        kwargs["val_size"] = config.val_size
    try:
        return dataset_info(config.data), load_splits(config.data, **kwargs)
    except ValueError as err:  # the options do not fit the data (val_size)
        raise ConfigError(f"{err} (data {config.data!r})") from None


def _check_fits_data(model: ImageFlow, info: DatasetInfo, config: TrainConfig) -> None:
    if tuple(model.image_shape) != tuple(info.image_shape) or model.num_levels != info.num_levels:
        raise ModelBuildError(
            f"model: {_class_name(model)} takes images {tuple(model.image_shape)} with {model.num_levels} levels, "
            f"but data {config.data!r} has {tuple(info.image_shape)} with {info.num_levels} levels"
        )
    if config.conditional and model.num_classes != info.num_classes:
        got = "is unconditional" if model.num_classes is None else f"has {model.num_classes} classes"
        raise ModelBuildError(
            f"conditional: the data set {config.data!r} has {info.num_classes} classes but the model "
            f"{_class_name(model)} {got}; a builder must pass num_classes on to ImageFlow(..., num_classes=...)"
        )
    if not config.conditional and model.num_classes is not None:
        raise ModelBuildError(
            f"conditional: the model {_class_name(model)} is conditional on {model.num_classes} classes; train it "
            "with conditional=True (--conditional), which feeds it the data set's labels"
        )


def _builder_kwargs(config: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The builder's keyword arguments: the model options, plus the data's ``num_classes`` for a
    conditional run (a ``num_classes`` given in the options must be the data's)."""
    kwargs = dict(config.model_kwargs)
    if not config.conditional:
        return kwargs
    given = kwargs.setdefault("num_classes", info.num_classes)
    if given != info.num_classes:
        raise ConfigError(
            f"model_kwargs: num_classes is {given!r} but the data set {config.data!r} has {info.num_classes} classes; "
            "leave num_classes out (conditional runs take it from the data)"
        )
    return kwargs


def _model_and_recipe(
    config: TrainConfig, model: ImageFlow | None, info: DatasetInfo
) -> tuple[ImageFlow, ModelRecipe | None]:
    if model is not None:
        recipe = None
    else:
        assert config.model is not None  # set by _resolve_model_option
        recipe = ModelRecipe(config.model, info.image_shape, info.num_levels, _builder_kwargs(config, info))
        seed_all(config.seed)
        try:
            model = recipe.build()
        except ModelBuildError as err:
            if config.conditional and "num_classes" in str(err):
                raise ModelBuildError(f"{err} (a conditional run calls the builder with num_classes=K)") from err
            raise
    _check_fits_data(model, info, config)
    return model, recipe


def _loaders(config: TrainConfig, ctx: DistributedContext, splits: dict[str, ImageDataset]):
    """The training sampler and the train/val/test loaders; batches are whole ``(images, labels)``
    tensors cut from the data set in one indexing operation (``ImageDataset[indices]``)."""
    device = ctx.device
    per_rank = config.batch_size // ctx.world_size
    # batch_size is global: rank r takes items r, r+N, ... of the epoch's permutation (seed + epoch)
    sampler: DistributedSampler = DistributedSampler(
        splits["train"], num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=True
    )

    def loader(dataset: ImageDataset, batches: BatchSampler) -> DataLoader:
        pin = device.type == "cuda"
        return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=config.num_workers, pin_memory=pin)

    loaders = {"train": loader(splits["train"], BatchSampler(sampler, per_rank, len(sampler) > per_rank))}
    for name in ("val", "test"):
        # rank r's share of an evaluation split: items r, r + N, r + 2N, ... (no padding)
        shard = splits[name].subset(torch.arange(ctx.rank, len(splits[name]), ctx.world_size))
        loaders[name] = loader(shard, BatchSampler(SequentialSampler(shard), per_rank, False))
    return sampler, loaders


def _batches_per_epoch(config: TrainConfig, loader: DataLoader) -> int:
    """Steps of an epoch: the training batches, at most ``max_train_batches``."""
    return len(loader) if config.max_train_batches is None else min(len(loader), config.max_train_batches)


def _initialize(model: ImageFlow, config: TrainConfig, train: ImageDataset, device: torch.device) -> None:
    """ActNorm's data-dependent init on a real (random) training batch, the same on every rank."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[: config.init_batch_size]
    labels = train.labels[pick].to(device) if model.is_conditional else None
    model.initialize(train.images[pick].long().to(device), labels)


def _check_labels(model: ImageFlow, splits: dict[str, ImageDataset]) -> None:
    """A conditional model's labels are checked once, here (the steps pass ``validate=False``)."""
    if model.num_classes is None:
        return
    for name, split in splits.items():
        check_labels(split.labels, f"labels of the {name} split", model.num_classes, len(split))


def _restore_model(model: ImageFlow, checkpoint: Checkpoint, path: Path) -> None:
    """The training weights of a checkpoint (``state_dict`` is the average when the run keeps one)."""
    if checkpoint.train_state_dict is not None:
        checkpoint = dataclasses.replace(checkpoint, state_dict=checkpoint.train_state_dict)
    restore_model(model, checkpoint, path)


def _restore(run: Run, checkpoint: Checkpoint) -> None:
    if checkpoint.optimizer is None or checkpoint.scheduler is None:
        raise CheckpointError(f"checkpoint: {run.files.last} holds no optimizer state, so the run cannot resume")
    # the skip of non-finite steps needs fused Adam; flowkit 0.1's checkpoints saved the unfused one
    groups = [{**group, "fused": True, "foreach": None} for group in checkpoint.optimizer["param_groups"]]
    run.optimizer.load_state_dict({**checkpoint.optimizer, "param_groups": groups})
    if "gamma" in checkpoint.scheduler:  # a per-epoch StepLR (before the per-step schedule): steps done
        run.scheduler.last_epoch = checkpoint.epoch * run.steps_per_epoch
    else:
        run.scheduler.load_state_dict(checkpoint.scheduler)
    if run.ema is not None:
        if checkpoint.ema is None:
            raise CheckpointError(f"checkpoint: {run.files.last} holds no weight average, so the run cannot resume")
        run.ema.load_state_dict(checkpoint.ema, checkpoint.state_dict)
    run.history = [EpochRecord(**h) for h in checkpoint.history]
    run.best_val_bpd, run.best_epoch = checkpoint.best_val_bpd, checkpoint.best_epoch
    run.skipped_steps, run.train_time_s = checkpoint.skipped_steps, checkpoint.train_time_s
    run.saved_epoch = checkpoint.epoch


def _check_resume(config: TrainConfig, files: RunFiles) -> Checkpoint | None:
    if not config.resume:
        return None
    stored = read_checkpoint(files.last)
    message = conflict_message(stored.config, config, files.last)
    if message:
        raise RunFolderError(message)
    return stored


def start_run(config: TrainConfig, model: ImageFlow | None = None, hooks: Sequence[Hook] = ()) -> Run:
    """Check everything, then build the :class:`Run` (see :func:`~flowkit.training.train`)."""
    config.validate()
    given, config = config, _resolve_model_option(config, model)
    ctx = setup_distributed(config.device)
    try:
        if config.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch_size: {config.batch_size} is the global batch and must divide evenly over the "
                f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
            )
        files = check_run_folder(Path(config.out), resume=config.resume, overwrite=config.overwrite)
        stored = _check_resume(config, files)
        info, splits = _load_data(config)
        try:
            model, recipe = _model_and_recipe(config, model, info)
        except ModelBuildError as err:
            if given.model is None and given.model_kwargs and model is None:
                raise ModelBuildError(
                    f"{err}; without a model name, model_kwargs update the data set's default model "
                    f"({config.model!r}): name the model they are for (e.g. model='glow', --model glow)"
                ) from err
            raise
        _check_labels(model, splits)
        all_hooks = [*default_hooks(config), *hooks]
        return _assemble(config, ctx, files, model, recipe, splits, all_hooks, stored)
    except BaseException:
        ctx.close()
        raise


def _assemble(config, ctx, files, model, recipe, splits, hooks, stored) -> Run:
    """Put the checked parts together: the model on the device (initialised or restored), the
    optimizer, the scheduler and the data loaders."""
    device = ctx.device
    model.to(device)
    if stored is not None:
        _restore_model(model, stored, files.last)
    else:
        _initialize(model, config, splits["train"], device)
    ctx.broadcast_module(model)  # every rank starts from rank 0's parameters and buffers
    # fused Adam takes `found_inf`: a non-finite step is skipped on the device, without a sync (see loop.py)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    sampler, loaders = _loaders(config, ctx, splits)
    steps = _batches_per_epoch(config, loaders["train"])
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.lr_decay, steps)
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    loss = ctx.wrap(TrainingLoss(model))
    run = Run(config, ctx, files, model, recipe, loss, optimizer, scheduler, sampler, loaders, hooks, steps, ema)
    if stored is not None:
        _restore(run, stored)
    run.replace_old_run = config.overwrite  # at the first checkpoint: a run that fails before leaves it as it was
    return run
