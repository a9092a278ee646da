"""``flowkit evaluate``: bits/dim of a checkpoint on a data split."""

from __future__ import annotations

__all__ = ["register"]


def _run(args) -> int:
    from torch.utils.data import DataLoader

    from flowkit.data import load_splits
    from flowkit.training import evaluate, load_checkpoint

    try:
        model, payload = load_checkpoint(args.checkpoint, args.device)
        config = payload["config"]
        kwargs = {} if config.get("val_size") is None else {"val_size": config["val_size"]}
        splits = load_splits(config["data"], root=args.data_root or config["data_root"], **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    data = splits[args.split]
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    bpd = evaluate(
        model,
        loader,
        importance_samples=args.importance_samples,
        max_batches=args.max_batches,
        progress=not args.no_progress,
        desc=args.split,
    )
    n = len(data) if args.max_batches is None else min(len(data), args.max_batches * args.batch_size)
    how = (
        "one-sample bound"
        if args.importance_samples == 1
        else f"importance sampling, {args.importance_samples} samples"
    )
    print(
        f"{args.split} bpd: {bpd:.4f} ({how}; {n} images of {config['data']}; {payload['model']['name']} "
        f"from epoch {payload['epoch']})"
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
    p.add_argument("--data-root", default=None, help="default: the run's --data-root")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
