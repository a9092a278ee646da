"""The image-flow tutorial's comparison: simple vs variational dequantization vs multiscale.

Trains the tutorial's three models (`flowkit.tutorial_flow("simple" | "vardeq" | "multiscale")`)
with the same budget through `flowkit.training.train`, then prints the tutorial's table:

    | Model | Val bpd | Test bpd | Inference time | Sampling time | Parameters |

* bits/dim on validation and test with the importance-sampled bound (8 samples by default,
  the tutorial's test metric);
* inference time: one `log_prob` of a batch of 64 images; sampling time: 64 samples (median
  of a few runs, after a warm-up);
* parameters as counted by `model.num_parameters()`.

The table is printed as text and as Markdown (OUT/table.md); OUT/results.json holds the
numbers; each model's run folder holds its checkpoints, samples and curves.  Two analyses of
the tutorial come along: the dequantization noise of simple vs vardeq
(OUT/dequantization_noise.png) and multiscale samples sharing the final latent
(OUT/shared_final_latent.png).

Run:
    python examples/tutorial_comparison.py --quick --out runs/examples/comparison   # under a minute
    python examples/tutorial_comparison.py --out runs/examples/comparison           # digits, ~half an hour on a CPU
    python examples/tutorial_comparison.py --data mnist --epochs 200 --device cuda  # the tutorial's setting (MNIST on disk)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from flowkit import analysis
from flowkit.data import load_splits
from flowkit.io import atomic_write_text
from flowkit.training import TrainConfig, evaluate_bpd, load_checkpoint, train

KINDS = ("simple", "vardeq", "multiscale")
SETTINGS = {  # the same budget for every model
    "quick": dict(
        epochs=1, batch_size=32, max_train_batches=3, max_eval_batches=1, importance_samples=2, timing_repeats=1
    ),
    "full": dict(
        epochs=30, batch_size=64, max_train_batches=None, max_eval_batches=None, importance_samples=8, timing_repeats=5
    ),
}


def seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first run warms up caches and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| Model | Val bpd | Test bpd | Inference time | Sampling time | Parameters |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['val_bpd']:.3f} | {r['test_bpd']:.3f} | {1000 * r['inference_s']:.0f} ms "
            f"| {1000 * r['sampling_s']:.0f} ms | {r['parameters']:,} |"
        )
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    head = (
        f"{'Model':<12} {'Val bpd':>8} {'Test bpd':>9} {'Inference (64)':>15} {'Sampling (64)':>14} {'Parameters':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['val_bpd']:>8.3f} {r['test_bpd']:>9.3f} {1000 * r['inference_s']:>12.0f} ms "
            f"{1000 * r['sampling_s']:>11.0f} ms {r['parameters']:>11,}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="simple vs vardeq vs multiscale, the tutorial's table.")
    parser.add_argument("--quick", action="store_true", help="a few batches per model (seconds each)")
    parser.add_argument("--data", default="digits", help="digits (embedded) or mnist / fashion-mnist (if on disk)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--epochs", type=int, default=None, help="override the setting's epochs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default="runs/examples/comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(args.data, root=args.data_root, seed=0, download=False)
    loaders = {split: DataLoader(splits[split], batch_size=cfg["batch_size"]) for split in ("val", "test")}

    rows, models = [], {}
    for kind in KINDS:
        print(f"\n== {kind} ==")
        result = train(
            TrainConfig(
                data=args.data,
                data_root=args.data_root,
                model=kind,
                epochs=cfg["epochs"],
                batch_size=cfg["batch_size"],
                max_train_batches=cfg["max_train_batches"],
                max_eval_batches=cfg["max_eval_batches"],
                importance_samples=0,  # evaluated below, on val and test alike
                seed=args.seed,
                device=args.device,
                out=str(out / kind),
                overwrite=True,  # an example replaces its previous runs
                progress=not args.quick,
                num_samples=16,
            )
        )
        files = result.files
        model, _ = load_checkpoint(files.best if files.best.is_file() else files.last, device=args.device)
        device = model.device
        torch.manual_seed(args.seed)
        bpd = {
            split: evaluate_bpd(
                model, loader, importance_samples=cfg["importance_samples"], max_batches=cfg["max_eval_batches"]
            )
            for split, loader in loaders.items()
        }
        batch = torch.stack([splits["test"][i][0] for i in range(64)]).to(device)
        with torch.no_grad():
            inference = seconds(lambda: model.log_prob(batch), cfg["timing_repeats"], device)  # noqa: B023 (called at once)
        sampling = seconds(lambda: model.sample(64), cfg["timing_repeats"], device)  # noqa: B023 (called at once)
        rows.append(
            {
                "model": kind,
                "val_bpd": bpd["val"],
                "test_bpd": bpd["test"],
                "inference_s": inference,
                "sampling_s": sampling,
                "parameters": model.num_parameters(),
                "train_time_s": result.train_time_s,
                "epochs": result.epochs,
            }
        )
        models[kind] = model

    # Two of the tutorial's analyses on the trained models.
    images = splits["test"].images[:64].long()
    noise_png, noise_stats = analysis.plot_dequantization_noise(
        {"simple (uniform)": models["simple"], "vardeq (variational)": models["vardeq"]},
        images,
        out / "dequantization_noise.png",
        repeats=2,
    )
    shared_png, _ = analysis.plot_shared_final_latent(
        models["multiscale"], out / "shared_final_latent.png", temperature=0.7
    )

    budget = (
        f"{cfg['epochs']} epoch(s)"
        + (f" x {cfg['max_train_batches']} batches" if cfg["max_train_batches"] else "")
        + f" of {cfg['batch_size']} on {args.data}; bpd with {cfg['importance_samples']} importance samples"
    )
    print(f"\nSame budget for each model: {budget}\n")
    print(text_table(rows))
    md = markdown_table(rows)
    print("\n" + md)
    for name, text in (
        ("table.md", f"Budget: {budget}.\n\n{md}\n"),
        (
            "results.json",
            json.dumps(
                {
                    "budget": budget,
                    "rows": rows,
                    "dequantization_noise": noise_stats,
                    "files": {"noise": str(noise_png), "shared_final_latent": str(shared_png)},
                },
                indent=2,
            ),
        ),
    ):
        atomic_write_text(out / name, text)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {noise_png.name} and {shared_png.name}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
