"""``flowkit train``: train an image flow (see :func:`flowkit.training.train`).

``--model`` is a registry name (glow, simple, vardeq, multiscale) or an import path
``package.module:function`` called as ``function(image_shape, num_levels, **model_kwargs)``;
the current folder is on the import path.  ``--conditional`` trains a class-conditional model
on the data set's labels (the builder also gets ``num_classes``).  ``--resume`` continues the run in ``--out`` with
its stored options: only the ones in :data:`~flowkit.training.MAY_CHANGE_ON_RESUME`
(``--epochs``, ``--device``, ``--threads``, ...) may be given differently.  A folder that
already holds a run is refused unless ``--resume`` or ``--overwrite`` is given.

On several processes: ``torchrun --nproc_per_node=N -m flowkit train ...`` (DistributedDataParallel;
``--batch-size`` is the global batch, split evenly over the N processes; rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from typing import Any

from flowkit.cli import user_input

__all__ = ["register", "config_from_args", "flag"]

# TrainConfig fields whose flag is not "--" + the field name with dashes
_FLAGS = {"sample_temperature": "--temperature", "progress": "--no-progress"}


def flag(field: str) -> str:
    """The ``flowkit train`` flag of a :class:`~flowkit.training.TrainConfig` field."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"num_scales\": 2}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_scales\": 2}}', got {text!r}")
    return value


def _given(args) -> dict[str, Any]:
    """The options given on the command line (flags left out are None: argparse sentinels)."""
    from flowkit.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in vars(args).items() if name in fields and value is not None}


def config_from_args(args):
    """The :class:`~flowkit.training.TrainConfig` the parsed ``flowkit train`` flags describe:
    the given flags over the defaults, or with ``--resume`` over the stored run's options."""
    from flowkit.training import TrainConfig, resume_config

    given = _given(args)
    if not given.get("resume"):
        if args.memory_saving:
            given["model_kwargs"] = {**given.get("model_kwargs", {}), "memory_saving": True}
        return TrainConfig(**given)
    out = given.pop("out", TrainConfig.out)
    if args.memory_saving and "model_kwargs" not in given:
        given["model_kwargs"] = resume_config(out, label=flag).model_kwargs
    if args.memory_saving:
        given["model_kwargs"] = {**given["model_kwargs"], "memory_saving": True}
    return resume_config(out, label=flag, **given)


def _report(result) -> None:
    test = (
        "skipped"
        if result.test_bpd is None
        else f"{result.test_bpd:.4f} (importance sampling, {result.importance_samples} samples)"
    )
    procs = f" on {result.world_size} processes" if result.world_size > 1 else ""
    best = "none finite" if result.best_val_bpd is None else f"{result.best_val_bpd:.4f} (epoch {result.best_epoch})"
    given = " given the label" if result.config.get("conditional") else ""
    print(
        f"\n{result.model_name} on {result.config['data']}: {result.num_parameters:,} parameters, {result.epochs} epochs"
        f"{procs} in {result.train_time_s:.1f}s; best val bpd{given} {best}; test bpd{given} {test}"
    )
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss or gradient")
    print(f"files in {result.out}: " + ", ".join(p.name for p in result.files.run_files() if p.exists()))


def _run(args) -> int:
    from flowkit.training import TrainingInterrupted, resolve_device, train
    from flowkit.training.distributed import env_rank
    from flowkit.training.runtime import default_threads

    with user_input():
        config = config_from_args(args)
        config.validate()
        config.threads = default_threads(config.threads, resolve_device(config.device))
    try:
        result = train(config)
    except TrainingInterrupted as err:  # the command line prints it (one line) and exits 130
        how = f"; continue with: flowkit train --out {shlex.quote(str(err.out))} --resume" if err.checkpoint else ""
        raise KeyboardInterrupt(f"{err}{how}") from None
    if env_rank() == 0:  # under torchrun: rank 0 reports
        _report(result)
    return 0


def _add(p, field: str, help: str, default: Any, **kwargs) -> None:
    """An option with a None sentinel default (so a resumed run knows what was given)."""
    p.add_argument(flag(field), dest=field, default=None, help=f"{help} (default: {default})", **kwargs)


def register(sub) -> None:
    from flowkit.training import TrainConfig
    from flowkit.training.config import DEFAULT_MODELS

    d = TrainConfig()
    p = sub.add_parser("train", help="train an image flow (checkpoints, metrics, samples and curves in --out)")
    _add(p, "data", "digits | mnist | fashion-mnist | cifar10", d.data)
    _add(
        p,
        "model",
        "glow | simple | vardeq | multiscale, or an import path package.module:function",
        "the data set's: " + ", ".join(f"{data} {name}" for data, (name, _) in DEFAULT_MODELS.items()),
    )
    _add(
        p,
        "model_kwargs",
        "builder options as JSON, e.g. '{\"num_scales\": 2}' (without --model: they update the default model's)",
        "{}",
        type=_json_dict,
        metavar="JSON",
    )
    p.add_argument(
        "--memory-saving",
        action="store_true",
        help="glow: invertible backprop, rebuild activations in backward instead of storing them "
        "(adds memory_saving=true to the model kwargs)",
    )
    _add(
        p,
        "conditional",
        "class-conditional model p(x | label), trained on the data set's labels (the builder gets num_classes)",
        "off",
        action="store_const",
        const=True,
    )
    _add(p, "epochs", "total epochs (with --resume: train until this many)", d.epochs, type=int)
    _add(p, "out", "run folder", d.out)
    _add(p, "resume", "continue the run in --out with its stored options", "off", action="store_const", const=True)
    _add(p, "overwrite", "replace the run already in --out", "off", action="store_const", const=True)
    _add(p, "seed", "seeds the model, the data order and the noise", d.seed, type=int)
    _add(p, "device", "auto | cpu | cuda", d.device, choices=("auto", "cpu", "cuda"))
    _add(p, "threads", "CPU threads (torch.set_num_threads; 0: torch's default)", "1 on the CPU", type=int, metavar="N")
    _add(p, "batch_size", "global batch; under torchrun each of N processes takes batch-size/N", d.batch_size, type=int)
    _add(p, "lr", "Adam learning rate", d.lr, type=float)
    _add(p, "lr_decay", "learning-rate factor per epoch", d.lr_decay, type=float)
    _add(p, "warmup_steps", "linear learning-rate warm-up over the first N steps (0: off)", d.warmup_steps, type=int)
    _add(
        p,
        "ema_decay",
        "evaluate, save and sample a moving average of the weights with this decay (0: off)",
        d.ema_decay,
        type=float,
    )
    _add(p, "grad_clip", "max gradient norm (0: off)", d.grad_clip, type=float)
    _add(p, "importance_samples", "samples of the final test bpd (0: skip the test)", d.importance_samples, type=int)
    _add(p, "sample_temperature", "temperature of samples.png", d.sample_temperature, type=float, metavar="T")
    _add(p, "data_root", "where torchvision data sets live", d.data_root)
    _add(p, "val_size", "validation images", "the data set's", type=int)
    _add(p, "num_workers", "DataLoader workers", d.num_workers, type=int)
    _add(p, "max_train_batches", "batches per epoch (quick runs)", "all", type=int)
    _add(p, "max_eval_batches", "batches per evaluation (quick runs)", "all", type=int)
    _add(p, "num_samples", "images in samples.png", d.num_samples, type=int)
    _add(p, "max_nonfinite", "stop after this many non-finite steps in a row", d.max_nonfinite, type=int)
    _add(
        p,
        "tensorboard",
        "log epoch metrics for TensorBoard in OUT/tensorboard",
        "off",
        action="store_const",
        const=True,
    )
    _add(
        p,
        "progress",
        "no progress bars (they show only on a terminal)",
        "bars on a terminal",
        action="store_const",
        const=False,
    )
    p.set_defaults(func=_run)
