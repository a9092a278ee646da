"""``flowkit demo`` (``make demo``): train flowkit's default model for the embedded 8x8 digits on the CPU.

The model and schedule are exactly what ``flowkit train --data digits`` trains with no model
options (:data:`flowkit.training.config.DEFAULT_MODELS`: the tutorial's multiscale flow with one
gated block per coupling net; Adam with a linear warm-up, and a moving average of the weights
that is evaluated, saved and sampled), for :data:`DEMO_EPOCHS` epochs: about a minute on one
CPU thread, test bits/dim (8 importance samples) below 1.90.

Prints a table with the test bits/dim, the parameter count and the time, next to the digits'
independent-pixel baseline (a per-pixel histogram with add-one smoothing, fitted on the
training split), and one line comparing with normflows' Glow: the validation bits/dim it
reached with a 120 s training budget in ``benchmarks/bench_bpd.py`` (:data:`PEER_REFERENCE`, a
figure from that benchmark, labelled as such; training the peer here would double the demo's
time).  Writes samples, curves, metrics and checkpoints under ``runs/demo/``.  Running the demo
again replaces an earlier demo run in ``--out``; a folder holding any other run is refused, as
``flowkit train`` refuses it.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["register", "DEMO_EPOCHS", "PEER_REFERENCE"]

# tuned by measurement on the 2-core CPU this project is developed on (see the README)
DEMO_EPOCHS = 25
#: (peer, training budget in CPU seconds, its validation bits/dim): from
#: ``benchmarks/bench_bpd.py --data digits`` (the README's table), not measured by the demo
PEER_REFERENCE = ("normflows Glow", 120, 2.074)


def _is_demo_run(out: str) -> bool:
    """``out`` holds a run the demo wrote (its metrics.json says so), which the demo may replace."""
    import json
    from pathlib import Path

    from flowkit.training.config import default_model

    try:
        config = json.loads((Path(out) / "metrics.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    name, kwargs = default_model("digits")
    return config.get("data") == "digits" and (config.get("model"), config.get("model_kwargs")) == (name, kwargs)


def _run(args) -> int:
    import json

    from flowkit.data import dataset_info, load_splits
    from flowkit.training import TrainConfig, independent_pixel_bpd, train
    from flowkit.training.config import default_model

    config = TrainConfig(
        data="digits",  # and no model options: flowkit's default for the digits
        epochs=args.epochs,
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
    name, kwargs = default_model("digits")
    print(
        f"flowkit demo: flowkit's default model for the digits, {name} {json.dumps(kwargs)}, on sklearn's 8x8 "
        f"digits (17 levels): Adam lr {config.lr:g}, {config.warmup_steps} warm-up steps, weight average "
        f"{config.ema_decay:g}, batch {config.batch_size}, {config.epochs} epochs on {config.device}\n",
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
            f"{name} (flowkit default)",
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
    peer, budget, peer_bpd = PEER_REFERENCE
    if result.best_val_bpd is not None:
        print(
            f"{peer}, {budget} s budget in benchmarks/bench_bpd.py: {peer_bpd:.3f} val bpd (a figure from the "
            f"benchmark); this run: {result.best_val_bpd:.3f} val bpd after {result.train_time_s:.0f} s "
            f"({result.best_val_bpd - peer_bpd:+.3f})"
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
        help="train flowkit's default model on the embedded digits (make demo)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--importance-samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-train-batches", type=int, default=None, help="batches per epoch (quick runs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for this run (0: torch's default)")
    p.set_defaults(func=_run)
