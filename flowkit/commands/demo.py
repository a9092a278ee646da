"""``flowkit demo`` (``make demo``): train a small Glow on the embedded 8x8 digits on the CPU.

Prints a table with the test bits/dim (importance-sampled), the parameter count and the time,
next to the digits' independent-pixel baseline (a per-pixel histogram with add-one smoothing,
fitted on the training split), and writes samples, curves, metrics and checkpoints under
``runs/demo/``.  Running the demo again replaces an earlier demo run in ``--out``; a folder
holding any other run is refused, as ``flowkit train`` refuses it.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["register", "DEMO_MODEL_KWARGS", "DEMO_EPOCHS", "DEMO_LR"]

# tuned by measurement on the 2-core CPU this project is developed on (see the README)
DEMO_MODEL_KWARGS = {
    "num_scales": 2,
    "steps_per_scale": 4,
    "hidden_channels": 32,
    "num_layers": 1,
    "dequantization": "uniform",
}
DEMO_EPOCHS = 40
DEMO_LR = 2e-3


def _is_demo_run(out: str) -> bool:
    """``out`` holds a run the demo wrote (its metrics.json says so), which the demo may replace."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(out) / "metrics.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return config.get("data") == "digits" and config.get("model_kwargs") == DEMO_MODEL_KWARGS


def _run(args) -> int:
    from flowkit.data import dataset_info, load_splits
    from flowkit.training import TrainConfig, independent_pixel_bpd, train

    config = TrainConfig(
        data="digits",
        model="glow",
        model_kwargs=dict(DEMO_MODEL_KWARGS),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=64,
        seed=args.seed,
        device=args.device,
        out=args.out,
        importance_samples=args.importance_samples,
        max_train_batches=args.max_train_batches,
        sample_temperature=args.temperature,
        progress=not args.no_progress,
        # the demo's model is tiny: extra intra-op threads cost more in synchronisation than
        # they gain, and a busy CPU makes them spin (3x-30x slower steps measured on 2 cores)
        threads=args.threads,
        overwrite=_is_demo_run(args.out),
    )
    kw = config.model_kwargs
    print(
        f"flowkit demo: Glow ({kw['num_scales']} levels x {kw['steps_per_scale']} steps, GatedConvNet "
        f"{kw['hidden_channels']} hidden, {kw['dequantization']} dequantization) on sklearn's 8x8 digits "
        f"(17 levels), {config.epochs} epochs on {config.device}\n",
        flush=True,
    )
    t0 = time.perf_counter()
    result = train(config)  # a non-finite stop is reported by the command line (exit 1)
    wall = time.perf_counter() - t0

    info = dataset_info("digits")
    splits = load_splits("digits")
    baseline = independent_pixel_bpd(splits["train"].images, splits["test"].images, info.num_levels)
    test = result.test_bpd
    rows = [
        ("independent-pixel baseline", "histogram/pixel", f"{64 * (info.num_levels - 1):,}", "-", f"{baseline:.3f}"),
        (
            f"glow (L={kw['num_scales']}, K={kw['steps_per_scale']})",
            f"{result.epochs} epochs",
            f"{result.num_parameters:,}",
            f"{result.train_time_s:.0f}s train / {wall:.0f}s all",
            "-" if test is None else f"{test:.3f}",
        ),
    ]
    head = ("model", "fit", "parameters", "time", f"test bpd (IS {config.importance_samples})")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )

    print("\n" + line(head) + "\n" + "  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    if test is not None:
        verdict = "below" if test < baseline else "NOT below"
        print(
            f"\ntest bpd {test:.3f} is {verdict} the independent-pixel baseline {baseline:.3f} "
            f"({baseline - test:+.3f} bits/dim; best val bpd {result.best_val_bpd:.3f} at epoch {result.best_epoch})"
        )
    files = result.files
    print(f"\nfiles in {result.out}/:")
    print(f"  samples.png   {config.num_samples} samples at temperature {config.sample_temperature}: {files.samples}")
    print(f"  curves.png    train/val bits/dim per epoch: {files.curves}")
    print("  metrics.csv / metrics.json, best.pt / last.pt")
    print(f"more: flowkit sample --checkpoint {files.best} --n 64 --temperature 0.7 --out grid.png")
    return 0 if test is None or test < baseline else 1


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small Glow on the embedded digits (make demo)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument("--lr", type=float, default=DEMO_LR)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--importance-samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-train-batches", type=int, default=None, help="batches per epoch (quick runs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for this run (0: torch's default)")
    p.set_defaults(func=_run)
