"""``flowkit sample``: a grid of samples from a checkpoint, as a PNG."""

from __future__ import annotations

from flowkit.cli import check_output, user_input

__all__ = ["register"]


def _run(args) -> int:
    import torch

    from flowkit.training import load_checkpoint, resolve_device
    from flowkit.validation import check_float, check_int
    from flowkit.viz import save_image_grid

    with user_input():
        check_int("--n", args.n, low=1)
        check_float("--temperature", args.temperature, low=0, low_open=True)
        device = resolve_device(args.device)
    check_output(args.out)
    model, checkpoint = load_checkpoint(args.checkpoint, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature, generator=gen)
    path = save_image_grid(
        images,
        args.out,
        model.num_levels,
        title=f"{checkpoint.model_name}, epoch {checkpoint.epoch}, T={args.temperature}",
    )
    print(f"wrote {args.n} samples (temperature {args.temperature}) to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint into a PNG grid")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--temperature", type=float, default=0.7, help="scale of the latent standard deviation")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_run)
