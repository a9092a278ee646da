"""``flowkit sample``: a grid of samples from a checkpoint, as a PNG.

A class-conditional checkpoint (``flowkit train --conditional``) samples a chosen class:
``--label 3`` draws ``--n`` images of class 3; ``--labels 0,1,2`` (or no label at all) draws
one row per class, ``--n`` images each (default 8).
"""

from __future__ import annotations

import argparse

from flowkit.cli import check_output, user_input

__all__ = ["register"]

DEFAULT_N = 64
DEFAULT_PER_CLASS = 8


def _label_list(text: str) -> list[int]:
    try:
        labels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels like 0,1,2, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError(f"expected at least one class label, got {text!r}")
    return labels


def _check_classes(args, model, path: str) -> list[int] | None:
    """The classes to draw (one row each) or ``None`` for a plain grid; ``ValueError`` for a label
    that is out of range or given to an unconditional model."""
    flag, asked = ("--label", [args.label]) if args.label is not None else ("--labels", args.labels)
    if model.num_classes is None:
        if asked is not None:
            raise ValueError(
                f"{flag}: {path} holds an unconditional model (trained without --conditional), which cannot "
                "sample a chosen class"
            )
        return None
    if asked is None:
        return list(range(model.num_classes))
    for label in asked:
        if not 0 <= label < model.num_classes:
            raise ValueError(
                f"{flag}: {label} is not a class of this model (it has {model.num_classes} classes, "
                f"0..{model.num_classes - 1})"
            )
    return asked


def _run(args) -> int:
    import torch

    from flowkit.analysis import plot_class_samples
    from flowkit.training import load_checkpoint, resolve_device
    from flowkit.validation import check_float, check_optional_int
    from flowkit.viz import save_image_grid

    with user_input():
        check_optional_int("--n", args.n, low=1)
        check_float("--temperature", args.temperature, low=0, low_open=True)
        device = resolve_device(args.device)
    check_output(args.out)
    model, checkpoint = load_checkpoint(args.checkpoint, device=device)
    with user_input():
        classes = _check_classes(args, model, args.checkpoint)
    title = f"{checkpoint.model_name}, epoch {checkpoint.epoch}, T={args.temperature}"
    if classes is None or args.label is not None:
        n = DEFAULT_N if args.n is None else args.n
        gen = torch.Generator(device=device).manual_seed(args.seed)
        images = model.sample(n, temperature=args.temperature, generator=gen, y=args.label)
        title += "" if args.label is None else f", class {args.label}"
        path = save_image_grid(images, args.out, model.num_levels, title=title)
        what = f"{n} samples" + ("" if args.label is None else f" of class {args.label}")
    else:
        n = DEFAULT_PER_CLASS if args.n is None else args.n
        path, _ = plot_class_samples(
            model, args.out, n, args.temperature, classes, args.seed, shared_noise=False, title=title
        )
        what = f"{n} samples of each of the classes {','.join(map(str, classes))} (one row per class)"
    print(f"wrote {what} (temperature {args.temperature}) to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint into a PNG grid")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"number of images (default {DEFAULT_N}); with one row per class: per class (default {DEFAULT_PER_CLASS})",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="scale of the latent standard deviation")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--label", type=int, default=None, help="conditional models: draw every image of this class")
    which.add_argument(
        "--labels",
        type=_label_list,
        default=None,
        metavar="L1,L2,...",
        help="conditional models: one row per class (default: every class)",
    )
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_run)
