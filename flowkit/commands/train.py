"""``flowkit train``: train an image flow (see :func:`flowkit.training.train`).

On several processes: ``torchrun --nproc_per_node=N -m flowkit train ...`` (DistributedDataParallel;
``--batch-size`` is the global batch, split evenly over the N processes; rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "config_from_args"]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"levels\": 2}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"levels\": 2}}', got {text!r}")
    return value


def config_from_args(args):
    """The :class:`~flowkit.training.TrainConfig` the parsed ``flowkit train`` flags describe."""
    from flowkit.training import TrainConfig

    model_kwargs = dict(args.model_kwargs)
    if getattr(args, "memory_saving", False):
        model_kwargs["memory_saving"] = True
    return TrainConfig(
        data=args.data,
        model=args.model,
        model_kwargs=model_kwargs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        device=args.device,
        out=args.out,
        resume=args.resume,
        importance_samples=args.importance_samples,
        data_root=args.data_root,
        val_size=args.val_size,
        num_workers=args.num_workers,
        max_train_batches=args.max_train_batches,
        max_eval_batches=args.max_eval_batches,
        sample_temperature=args.temperature,
        progress=not args.no_progress,
    )


def _run(args) -> int:
    from flowkit.distributed import env_rank
    from flowkit.training import NonFiniteLossError, train

    rank = env_rank()
    try:
        result = train(config_from_args(args))
    except NonFiniteLossError as err:
        if rank == 0:
            print(f"error: {err}")
        return 1
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}" if rank == 0 else f"error (rank {rank}): {err}")
        return 2
    if rank != 0:  # under torchrun: rank 0 reports
        return 0
    test = (
        "skipped"
        if result["test_bpd"] is None
        else f"{result['test_bpd']:.4f} (importance sampling, {result['importance_samples']} samples)"
    )
    procs = f" on {result['world_size']} processes" if result["world_size"] > 1 else ""
    print(
        f"\n{args.model} on {args.data}: {result['num_parameters']:,} parameters, {result['epochs']} epochs{procs} in "
        f"{result['train_time_s']:.1f}s; best val bpd {result['best_val_bpd']:.4f} (epoch {result['best_epoch']}); test bpd {test}"
    )
    if result["skipped_steps"]:
        print(f"skipped {result['skipped_steps']} steps with a non-finite loss or gradient")
    print("files: " + ", ".join(result["files"].values()))
    return 0


def register(sub) -> None:
    from flowkit.training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train an image flow (checkpoints, metrics, samples and curves in --out)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=d.data, help="digits | mnist | fashion-mnist | cifar10")
    p.add_argument("--model", default=d.model, help="glow | simple | vardeq | multiscale")
    p.add_argument(
        "--model-kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help='builder options as JSON, e.g. \'{"levels": 2, "steps_per_level": 4}\'',
    )
    p.add_argument(
        "--memory-saving",
        action="store_true",
        help="glow: invertible backprop, rebuild activations in backward instead of storing them "
        "(adds memory_saving=true to the model kwargs)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="total epochs (with --resume: train until this many)")
    p.add_argument("--out", default=d.out, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt on the same trajectory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch; under torchrun each of N processes takes batch-size/N (must divide)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--lr-decay", type=float, default=d.lr_decay, help="StepLR gamma per epoch")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument(
        "--importance-samples",
        type=int,
        default=d.importance_samples,
        help="samples of the final test bpd (0: skip the test evaluation)",
    )
    p.add_argument("--temperature", type=float, default=d.sample_temperature, help="temperature of samples.png")
    p.add_argument("--data-root", default=d.data_root, help="where torchvision data sets live")
    p.add_argument("--val-size", type=int, default=None, help="validation images (default: the data set's)")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--max-train-batches", type=int, default=None, help="batches per epoch (quick runs)")
    p.add_argument("--max-eval-batches", type=int, default=None, help="batches per evaluation (quick runs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=_run)
