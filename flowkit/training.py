"""Train, evaluate and checkpoint an :class:`~flowkit.models.ImageFlow` on integer images.

The whole pipeline is :func:`train`, one linear function (in the spirit of rosinality's
glow-pytorch): build the data and the model, initialise ActNorm on a real batch, then per
epoch minimise bits/dim with Adam, clip gradients, decay the learning rate (``StepLR``, as in
the image-flow tutorial: Adam 1e-3, gamma 0.99 per epoch), measure validation bits/dim and
write ``last.pt`` (and ``best.pt`` when the validation bpd improved) atomically.

A checkpoint holds the model's builder name and arguments (so :func:`load_checkpoint` can
rebuild it), its ``state_dict``, the optimizer and scheduler, the epoch and the metric history.
Randomness is a function of ``(seed, epoch)``: the training order is a
``DistributedSampler`` permutation seeded with ``seed + epoch``, and the noise streams
(dequantization, importance sampling) are reseeded from ``(seed, rank, epoch)`` at the start
of every epoch, so ``resume=True`` continues the *same* trajectory as an uninterrupted run.

Distributed training.  Under ``torchrun --nproc_per_node=N -m flowkit train ...`` (see
:mod:`flowkit.distributed`) every process builds the same model, initialises ActNorm on the
same ``init_batch_size`` images and takes rank 0's parameters and buffers; the training step
runs through ``DistributedDataParallel`` (gradients averaged over the ranks in ``backward``,
so parameters stay identical after every step), each rank drawing its own dequantization
noise.  ``batch_size`` is the **global** batch: each rank takes ``batch_size / N`` images of
the same permutation, so step ``s`` sees the same images for any ``N``.  Validation and test
bits/dim are summed over the ranks (``sum bpd``, ``count``); rank 0 alone prints, shows
progress and writes checkpoints, metrics and PNGs (the others wait at a barrier), so ``out``
must be on a file system every rank can read (resume and the final test read it).

Non-finite losses (or gradients) are skipped and counted; after ``max_nonfinite`` in a row
training stops with :class:`NonFiniteLossError`.  A checkpoint with a non-finite tensor is
never written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowkit.distributed import DistributedContext
from flowkit.distributed import setup as setup_distributed
from flowkit.errors import NonFiniteLossError
from flowkit.io import atomic_write_bytes, write_json

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "train",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_device",
    "independent_pixel_bpd",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "flowkit-checkpoint-1"
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class TrainConfig:
    """Options of :func:`train` (the CLI's ``flowkit train`` flags map onto these).

    Args:
        data: data set name for :func:`flowkit.data.load_splits` (``digits``, ``mnist``, ...).
        model: builder name for :func:`flowkit.models.build_model` (``glow``, ``simple``, ...).
        model_kwargs: extra keyword arguments of the builder (JSON-serialisable).
        epochs: total number of epochs (with ``resume``: train until this many are done).
        batch_size: training and evaluation batch size, **global**: with N processes
            (torchrun) each takes ``batch_size / N`` images (must divide evenly).
        lr: Adam learning rate.
        lr_decay: ``StepLR`` factor applied after every epoch (``lr_e = lr * lr_decay**e``).
        grad_clip: max gradient norm (``clip_grad_norm_``); 0 disables clipping.
        seed: seeds the model's initialisation, the training order and the noise.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (under torchrun:
            ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo).
        out: run directory (checkpoints, metrics, PNGs).
        resume: continue from ``out/last.pt``.
        importance_samples: samples of the importance-weighted test bpd at the end of the run
            (0 skips the test evaluation).
        data_root: where torchvision data sets live.
        val_size: validation images (None: the data set's default).
        num_workers: DataLoader workers.
        max_train_batches: stop each epoch after this many batches (quick runs); None: all.
        max_eval_batches: evaluate on at most this many batches; None: all.
        max_nonfinite: stop after this many non-finite losses in a row.
        init_batch_size: images used for ActNorm's data-dependent initialisation.
        num_samples: images in the samples grid; ``sample_temperature`` their temperature.
        progress: show tqdm progress bars (rank 0 only).
    """

    data: str = "digits"
    model: str = "glow"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    lr_decay: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    resume: bool = False
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

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad option."""
        ints = {
            "epochs": (self.epochs, 1),
            "batch_size": (self.batch_size, 1),
            "seed": (self.seed, 0),
            "importance_samples": (self.importance_samples, 0),
            "num_workers": (self.num_workers, 0),
            "max_nonfinite": (self.max_nonfinite, 1),
            "init_batch_size": (self.init_batch_size, 1),
            "num_samples": (self.num_samples, 1),
        }
        for name in ("max_train_batches", "max_eval_batches", "val_size"):
            if getattr(self, name) is not None:
                ints[name] = (getattr(self, name), 1)
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if not (isinstance(self.lr_decay, (int, float)) and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay: expected a float in (0, 1], got {self.lr_decay!r}")
        if not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip: expected a float >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not (isinstance(self.sample_temperature, (int, float)) and self.sample_temperature > 0):
            raise ValueError(f"sample_temperature: expected a positive float, got {self.sample_temperature!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {DEVICES}, got {self.device!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs: expected a dict, got {type(self.model_kwargs).__name__}")
        try:
            json.dumps(self.model_kwargs)
        except TypeError as err:
            raise TypeError(f"model_kwargs: must be JSON-serialisable (it is stored in checkpoints): {err}") from None


# -- small helpers ---------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def _build_model(spec: Mapping[str, Any]) -> nn.Module:
    from flowkit.models import build_model

    return build_model(spec["name"], tuple(spec["image_shape"]), spec["num_levels"], **spec["kwargs"])


def _load_data(config: TrainConfig):
    """``(DatasetInfo, {"train", "val", "test"})`` for ``config.data``."""
    from flowkit.data import dataset_info, load_splits

    kwargs = {"root": config.data_root, "seed": 0}
    if config.val_size is not None:
        kwargs["val_size"] = config.val_size
    return dataset_info(config.data), load_splits(config.data, **kwargs)


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _seed_all(*key: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python from the integers ``key`` (mixed by SeedSequence)."""
    # the trailing constant keeps keys that differ only by trailing zeros apart (SeedSequence pads with zeros)
    seed = int(np.random.SeedSequence([*(int(k) for k in key), 0x5EED]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _shard(dataset, ctx: DistributedContext):
    """Rank ``r``'s share of an evaluation split: items ``r, r + N, r + 2N, ...`` (no padding)."""
    from torch.utils.data import Subset

    return dataset if not ctx.enabled else Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))


class _TrainingLoss(nn.Module):
    """``forward(x) = model.bpd(x)``: the training loss as a module's ``forward``, which is what
    DistributedDataParallel calls (and hooks to average the gradients over the ranks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.bpd(x)


def _nonfinite_entry(tree, prefix: str = "") -> str | None:
    """Name of the first floating tensor in a nested dict/list with a NaN or inf, else None."""
    if isinstance(tree, torch.Tensor):
        return prefix or "tensor" if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = _nonfinite_entry(value, f"{prefix}.{key}" if prefix else str(key))
        if bad:
            return bad
    return None


def _check_finite(payload: Mapping[str, Any], path) -> None:
    for key in ("state_dict", "optimizer"):
        bad = _nonfinite_entry(payload.get(key), key)
        if bad:
            raise NonFiniteLossError(f"refusing to write a non-finite checkpoint to {path}: {bad} has NaN/inf values")


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically (temp file + ``os.replace``); returns the path.

    Raises:
        NonFiniteLossError: a parameter, buffer or optimizer state holds NaN/inf; nothing is
            written and an existing file at ``path`` is left untouched.
    """
    _check_finite(payload, path)
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None):
    """Rebuild the model stored in a checkpoint written by :func:`train`.

    Args:
        path: ``best.pt`` / ``last.pt`` of a run.
        device: where to put the model (``None``: ``auto``).

    Returns:
        ``(model, payload)``: the :class:`~flowkit.models.ImageFlow` in eval mode, and the
        checkpoint's dict (``model`` spec, ``epoch``, ``history``, ``config``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {path} is not a flowkit checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    model = _build_model(payload["model"])
    model.load_state_dict(payload["state_dict"])
    model.to(resolve_device("auto" if device is None else device))
    model.eval()
    return model, payload


def _write_metrics(out: Path, history: list[dict], summary: Mapping[str, Any]) -> None:
    text = io.StringIO()
    fields = list(history[0]) if history else ["epoch"]
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())
    write_json(out / "metrics.json", {**summary, "history": history})


# -- evaluation --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    importance_samples: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """Mean bits/dim of ``model`` over ``loader`` (batches of integer images, or ``(images, labels)``).

    ``importance_samples = M > 1`` uses the importance-weighted bound
    ``-log2((1/M) sum_m p(x + u_m) / q(u_m | x)) / D`` (the tutorial's test metric); ``M = 1``
    the one-sample variational bound.  The model's train/eval mode is restored afterwards.
    """
    total, count = _bpd_sum(model, loader, importance_samples, max_batches, progress, desc)
    if count == 0:
        raise ValueError("loader: no batches to evaluate")
    return total / count


@torch.no_grad()
def _bpd_sum(
    model: nn.Module, loader: Iterable, importance_samples: int, max_batches: int | None, progress: bool, desc: str
) -> tuple[float, int]:
    """``(sum of per-image bpd, number of images)`` over ``loader`` (see :func:`evaluate`)."""
    from tqdm.auto import tqdm

    if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or importance_samples < 1:
        raise ValueError(f"importance_samples: expected an int >= 1, got {importance_samples!r}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress)):
            if max_batches is not None and i >= max_batches:
                break
            x = _images(batch)
            if importance_samples > 1:
                bpd = model.bpd_importance(x, num_samples=importance_samples)
            else:
                bpd = model.bpd(x)
            total += float(bpd.double().sum())
            count += x.shape[0]
    finally:
        model.train(was_training)
    return total, count


def _reduced_mean(ctx: DistributedContext, total: float, count: int, what: str) -> float:
    """``sum total / sum count`` over the ranks."""
    total, count = ctx.all_reduce_sum([total, count])
    if count == 0:
        raise ValueError(f"{what}: no batches to evaluate")
    return total / count


def independent_pixel_bpd(train_images: torch.Tensor, test_images: torch.Tensor, num_levels: int) -> float:
    """Bits/dim of the independent-pixel baseline: a categorical histogram per pixel.

    ``p_d(k) = (count_d(k) + 1) / (N + K)`` estimated on ``train_images`` (add-one
    smoothing), evaluated as ``-mean log2 p_d(x_d)`` on ``test_images`` (both ``[N, C, H, W]``
    integers in ``[0, K)``).  A flow that learns anything about pixel dependencies beats it.
    """
    from flowkit.layers.base import check_image_batch

    check_image_batch(train_images, "train_images", num_levels)
    check_image_batch(test_images, "test_images", num_levels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"test_images: shape {tuple(test_images.shape[1:])} differs from train_images' {tuple(train_images.shape[1:])}"
        )
    train = train_images.reshape(train_images.shape[0], -1).long()
    test = test_images.reshape(test_images.shape[0], -1).long()
    counts = torch.zeros(train.shape[1], num_levels, dtype=torch.float64)
    counts.scatter_add_(1, train.t(), torch.ones(train.t().shape, dtype=torch.float64))
    log2p = torch.log2((counts + 1.0) / (train.shape[0] + num_levels))
    return float(-log2p.gather(1, test.t()).mean())


# -- training ----------------------------------------------------------------------------
def train(config: TrainConfig) -> dict:
    """Train a model as ``config`` says; returns a summary dict (also in ``out/metrics.json``).

    Keys: ``out``, ``epochs``, ``history`` (one dict per epoch), ``best_epoch``,
    ``best_val_bpd``, ``test_bpd`` (importance-sampled, from ``best.pt``; None when
    ``importance_samples == 0``), ``num_parameters``, ``world_size``, ``train_time_s``,
    ``skipped_steps``, ``files`` (paths written).  Under torchrun every rank returns the same
    summary (metrics are reduced over the ranks); only rank 0 writes the files.

    Raises:
        NonFiniteLossError: ``max_nonfinite`` non-finite losses in a row (the checkpoints
            of the last good epoch stay on disk).
    """
    config.validate()
    ctx = setup_distributed(config.device)
    try:
        if config.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size: {config.batch_size} is the global batch and must divide evenly over the "
                f"{ctx.world_size} processes; use a multiple of {ctx.world_size}"
            )
        return _train(config, ctx)
    finally:
        ctx.close()


def _train(config: TrainConfig, ctx: DistributedContext) -> dict:  # noqa: C901 (split into parts: issue 12)
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm

    from flowkit.viz import save_curves, save_image_grid

    device, main = ctx.device, ctx.is_main
    progress = config.progress and main
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if main:
        out.mkdir(parents=True, exist_ok=True)

    info, splits = _load_data(config)
    spec = {
        "name": config.model,
        "image_shape": list(info.image_shape),
        "num_levels": int(info.num_levels),
        "kwargs": dict(config.model_kwargs),
    }
    # batch_size is global: rank r takes items r, r+N, ... of the epoch's permutation (seed + epoch)
    per_rank = config.batch_size // ctx.world_size
    sampler = DistributedSampler(
        splits["train"], num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    loader_kwargs = {"batch_size": per_rank, "num_workers": config.num_workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(splits["train"], sampler=sampler, drop_last=len(sampler) > per_rank, **loader_kwargs)
    val_loader = DataLoader(_shard(splits["val"], ctx), shuffle=False, **loader_kwargs)

    payload = None
    if config.resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {last_path}; run without --resume to start a new run")
        model, payload = load_checkpoint(last_path, device)
        if payload["model"] != spec:
            raise ValueError(
                f"resume: {last_path} holds model {payload['model']}, but this run asks for {spec}; "
                "use the same --model/--model-kwargs/--data or another --out"
            )
        model.train()
    else:
        if main:
            for stale in (last_path, best_path):  # a fresh run never mixes with an older one
                stale.unlink(missing_ok=True)
        _seed_all(config.seed)
        model = _build_model(spec).to(device)
        # ActNorm's data-dependent init on a real (random) training batch, the same on every rank
        pick = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(config.seed))
        init_batch = torch.stack([splits["train"][int(i)][0] for i in pick[: config.init_batch_size]])
        model.initialize(init_batch.to(device))
    ctx.broadcast_module(model)  # every rank starts from rank 0's parameters and buffers
    step_loss = ctx.wrap(_TrainingLoss(model))  # DDP: backward averages the gradients over the ranks

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.lr_decay)
    history: list[dict] = []
    best_val, best_epoch, start_epoch, skipped_total, elapsed = math.inf, None, 0, 0, 0.0
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        history = list(payload["history"])
        best_val, best_epoch = payload["best_val_bpd"], payload["best_epoch"]
        start_epoch, skipped_total, elapsed = payload["epoch"], payload["skipped_steps"], payload["train_time_s"]

    num_params = sum(p.numel() for p in model.parameters())
    summary = {
        "config": dataclasses.asdict(config),
        "model": spec,
        "num_parameters": num_params,
        "world_size": ctx.world_size,
    }
    consecutive = 0
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        _seed_all(config.seed, ctx.rank, 0, epoch)  # this rank's noise for this epoch
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        total, count, skipped = 0.0, 0, 0
        n_batches = (
            len(train_loader) if config.max_train_batches is None else min(len(train_loader), config.max_train_batches)
        )
        bar = tqdm(
            train_loader, total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress
        )
        for step, (x, _) in enumerate(bar):
            if step >= n_batches:
                break
            x = x.to(device, non_blocking=True)
            loss = step_loss(x).mean()
            grad_norm = None
            if ctx.all_true(torch.isfinite(loss)):  # skip on every rank, or on none
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(
                    model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf
                )
            if grad_norm is None or not torch.isfinite(grad_norm):  # gradients are averaged: same on every rank
                skipped += 1
                consecutive += 1
                optimizer.zero_grad(set_to_none=True)
                if consecutive >= config.max_nonfinite:
                    raise NonFiniteLossError(
                        f"training stopped at epoch {epoch + 1}, step {step + 1}: {consecutive} non-finite "
                        f"{'losses' if grad_norm is None else 'gradients'} in a row ({skipped_total + skipped} skipped in all); "
                        f"the last finite checkpoint is {last_path if last_path.is_file() else 'none (no epoch finished)'}. "
                        "Try a lower --lr or a smaller --grad-clip."
                    )
                continue
            optimizer.step()
            consecutive = 0
            step_bpd = float(loss.detach())
            total += step_bpd * x.shape[0]
            count += x.shape[0]
            bar.set_postfix(bpd=f"{step_bpd:.3f}")
        scheduler.step()
        skipped_total += skipped
        total, count = ctx.all_reduce_sum([total, count])
        val_bpd = _reduced_mean(ctx, *_bpd_sum(model, val_loader, 1, config.max_eval_batches, False, "val"), "val")
        elapsed += time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch + 1,
                "train_bpd": total / count if count else math.nan,
                "val_bpd": val_bpd,
                "lr": lr,
                "skipped_steps": skipped,
                "time_s": round(elapsed, 3),
            }
        )
        improved = math.isfinite(val_bpd) and val_bpd < best_val
        if improved:
            best_val, best_epoch = val_bpd, epoch + 1
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": spec,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "best_val_bpd": best_val,
            "best_epoch": best_epoch,
            "skipped_steps": skipped_total,
            "train_time_s": elapsed,
            "config": dataclasses.asdict(config),
            "world_size": ctx.world_size,
        }
        _check_finite(ckpt, last_path)  # on every rank (identical states), so no rank waits for a failed one
        if main:
            save_checkpoint(ckpt, last_path)
            if improved:
                save_checkpoint(ckpt, best_path)
            _write_metrics(
                out,
                history,
                {
                    **summary,
                    "best_epoch": best_epoch,
                    "best_val_bpd": best_val,
                    "skipped_steps": skipped_total,
                    "train_time_s": elapsed,
                },
            )
            print(
                f"epoch {epoch + 1}/{config.epochs}: train {history[-1]['train_bpd']:.4f} bpd, val {val_bpd:.4f} bpd"
                f"{' (best)' if improved else ''}, lr {lr:.2e}, {elapsed:.1f}s",
                flush=True,
            )
        ctx.barrier()

    # final: the best model on the test split (importance-sampled, shared over the ranks), samples and curves
    files = {
        "last": str(last_path),
        "best": str(best_path),
        "metrics_csv": str(out / "metrics.csv"),
        "metrics_json": str(out / "metrics.json"),
    }
    test_bpd = None
    best_model, _ = load_checkpoint(best_path if best_path.is_file() else last_path, device)
    _seed_all(config.seed, ctx.rank, 1)  # the final evaluation's noise
    if config.importance_samples > 0:
        test_loader = DataLoader(_shard(splits["test"], ctx), shuffle=False, **loader_kwargs)
        test_bpd = _reduced_mean(
            ctx,
            *_bpd_sum(best_model, test_loader, config.importance_samples, config.max_eval_batches, progress, "test"),
            "test",
        )
    if main:
        gen = torch.Generator(device=device).manual_seed(config.seed)
        samples = best_model.sample(config.num_samples, temperature=config.sample_temperature, generator=gen)
        files["samples"] = str(
            save_image_grid(
                samples,
                out / "samples.png",
                best_model.num_levels,
                title=f"{config.model} on {config.data}, T={config.sample_temperature}",
            )
        )
        files["curves"] = str(
            save_curves(
                {"train": [h["train_bpd"] for h in history], "val": [h["val_bpd"] for h in history]},
                out / "curves.png",
                title=f"{config.model} on {config.data}",
                x=[h["epoch"] for h in history],
            )
        )
    else:
        files["samples"], files["curves"] = str(out / "samples.png"), str(out / "curves.png")
    result = {
        **summary,
        "out": str(out),
        "epochs": len(history),
        "history": history,
        "best_epoch": best_epoch,
        "best_val_bpd": best_val,
        "test_bpd": test_bpd,
        "importance_samples": config.importance_samples,
        "train_time_s": elapsed,
        "skipped_steps": skipped_total,
        "files": files,
    }
    if main:
        _write_metrics(out, history, {k: v for k, v in result.items() if k != "history"})
    ctx.barrier()
    return result
