"""``flowkit evaluate``: bits/dim of a checkpoint on a data split (of a class-conditional model:
given each image's label, ``-log2 p(x | y) / D``)."""

from __future__ import annotations

import sys

from flowkit.cli import user_input

__all__ = ["register"]


def _run(args) -> int:
    from torch.utils.data import DataLoader

    from flowkit.data import load_splits
    from flowkit.training import evaluate_bpd, load_checkpoint, resolve_device
    from flowkit.training.runtime import cpu_threads, default_threads
    from flowkit.validation import check_int, check_optional_int

    with user_input():
        check_int("--importance-samples", args.importance_samples, low=1)
        check_int("--batch-size", args.batch_size, low=1)
        check_optional_int("--max-batches", args.max_batches, low=1)
        check_optional_int("--threads", args.threads, low=0)
        device = resolve_device(args.device)
    with cpu_threads(default_threads(args.threads, device)):
        model, checkpoint = load_checkpoint(args.checkpoint, device=device)
        config = checkpoint.config
        kwargs = {} if config.get("val_size") is None else {"val_size": config["val_size"]}
        data = load_splits(config["data"], root=args.data_root or config["data_root"], **kwargs)[args.split]
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
        bpd = evaluate_bpd(
            model,
            loader,
            importance_samples=args.importance_samples,
            max_batches=args.max_batches,
            progress=not args.no_progress and sys.stdout.isatty(),
            desc=args.split,
        )
    n = len(data) if args.max_batches is None else min(len(data), args.max_batches * args.batch_size)
    how = (
        "one-sample bound"
        if args.importance_samples == 1
        else f"importance sampling, {args.importance_samples} samples"
    )
    given = f" given the label ({model.num_classes} classes)" if model.num_classes is not None else ""
    print(
        f"{args.split} bpd{given}: {bpd:.4f} ({how}; {n} images of {config['data']}; {checkpoint.model_name} "
        f"from epoch {checkpoint.epoch})"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="bits/dim of a checkpoint on the train/val/test split")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--importance-samples", type=int, default=8, help="1: the one-sample variational bound")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate on this many batches only")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: 1 on the CPU)")
    p.add_argument("--data-root", default=None, help="default: the run's --data-root")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    p.set_defaults(func=_run)
