"""``flowkit analyze``: the tutorial's analyses of a trained checkpoint, as PNGs (:mod:`flowkit.analysis`)."""

from __future__ import annotations

from pathlib import Path

from flowkit.cli import check_output, user_input
from flowkit.io import write_json

__all__ = ["register"]


def _temperatures(text: str) -> list[float]:
    import argparse

    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,0.7,1.0, got {text!r}") from None
    if not temps or any(not t > 0 for t in temps):
        raise argparse.ArgumentTypeError(f"expected positive temperatures, got {text!r}")
    return temps


def _run(args) -> int:
    import torch

    from flowkit.analysis import analyze, same_class_pairs
    from flowkit.data import load_splits
    from flowkit.training import load_checkpoint, resolve_device
    from flowkit.validation import check_int

    with user_input():
        check_int("--num-images", args.num_images, low=2)
        device = resolve_device(args.device)
    check_output(args.out, folder=True)
    model, checkpoint = load_checkpoint(args.checkpoint, device=device)
    config = checkpoint.config
    data = args.data or config.get("data", "digits")
    root = args.data_root or config.get("data_root", "data")
    split = load_splits(data, root=root, download=False)[args.split]
    images, labels = split.images[: args.num_images].long(), split.labels[: args.num_images]
    with user_input():
        if images.shape[0] < 2:
            raise ValueError(f"--num-images: need at least 2 images, the {args.split} split gave {images.shape[0]}")
        if tuple(images.shape[1:]) != tuple(checkpoint.image_shape):
            raise ValueError(
                f"--data: {data} has images {tuple(images.shape[1:])}, the model takes {checkpoint.image_shape}"
            )
        if model.is_conditional:  # interpolation runs within a class: two of the images must share one
            same_class_pairs(images, labels)
    torch.manual_seed(args.seed)
    files = analyze(
        model,
        images,
        args.out,
        temperatures=args.temperatures,
        seed=args.seed,
        name=checkpoint.model_name,
        labels=labels if model.is_conditional else None,
    )
    index = {name: str(path) for name, path in files.items()}
    write_json(Path(args.out) / "analysis.json", {"checkpoint": str(args.checkpoint), "files": index})
    for name, path in index.items():
        print(f"{name:<36} {path}")
    print(f"wrote {len(index)} pictures under {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="the tutorial's analyses of a checkpoint as PNGs "
        "(dequantization, interpolation, temperature, multiscale latents; one row per class if conditional)",
    )
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt written by `flowkit train`")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--data", default=None, help="data set for the real images (default: the checkpoint's)")
    p.add_argument("--data-root", default=None, help="where torchvision data lives (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--num-images", type=int, default=32, help="real images for noise histograms and interpolation")
    p.add_argument(
        "--temperatures",
        type=_temperatures,
        default=[0.3, 0.5, 0.7, 0.9, 1.0],
        help="comma-separated temperatures of the sweep",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.set_defaults(func=_run)
