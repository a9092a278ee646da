"""A class-conditional Glow on the 8x8 digits: "sample me a 3".

`glow(..., num_classes=10)` models p(x | y), the density of an image given its label, in two places:

    x (integers) -> dequantization -> Glow levels, every coupling net also seeing an embedding
    of the label y (nflows' `context`) -> z -> class-conditional prior: u = (z - mu_y) / sigma_y
    -> u ~ N(0, I)

The prior is Glow's class-conditional one (a mean and a scale per class and latent dimension);
both parts start at zero, so a fresh model is the unconditional one.  flowkit's engine trains it
like any other model, with `conditional=True` feeding it the data set's labels
(`flowkit train --data digits --conditional` on the command line).  Afterwards:

* `model.sample(16, temperature=0.7, y=3)` draws sixteen 3s;
* `flowkit.analysis.plot_class_samples` draws one row per class, every row decoding the same
  base noise, so each column keeps its "handwriting" across the classes;
* the model is also a classifier: `argmax_y p(x | y)` (Bayes' rule with equal class priors).

Run:
    python examples/conditional_digits.py --quick --out runs/examples/conditional   # seconds
    python examples/conditional_digits.py --out runs/examples/conditional           # about 2 minutes

OUT holds the run (checkpoints, metrics.json, samples.png, curves.png), class_samples.png (rows =
classes), threes.png and example.json (test bpd given the label, the Bayes classifier's accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowkit.analysis import plot_class_samples
from flowkit.data import dataset_info, load_splits
from flowkit.io import write_json
from flowkit.models import glow
from flowkit.training import TrainConfig, load_checkpoint, train
from flowkit.viz import save_image_grid

SETTINGS = {  # --quick: seconds on a CPU (45 steps: a short warm-up); full: the demo's former Glow and training
    "quick": dict(
        model=dict(num_scales=2, steps_per_scale=1, hidden_channels=16, num_layers=1, dequantization="uniform"),
        train=dict(
            epochs=3,
            lr=2e-3,
            warmup_steps=5,
            batch_size=32,
            max_train_batches=15,
            max_eval_batches=2,
            importance_samples=2,
        ),
    ),
    "full": dict(
        model=dict(num_scales=2, steps_per_scale=4, hidden_channels=32, num_layers=1, dequantization="uniform"),
        train=dict(epochs=40, lr=2e-3, batch_size=64, importance_samples=8),
    ),
}


@torch.no_grad()
def bayes_accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of ``argmax_y log p(x | y)`` on real images (one-sample bound per class)."""
    n = images.shape[0]
    log_p = torch.stack([model.log_prob(images, torch.full((n,), k)) for k in range(model.num_classes)], dim=1)
    return float((log_p.argmax(dim=1) == labels).double().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--out", default="runs/examples/conditional")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out)
    torch.manual_seed(args.seed)

    info = dataset_info("digits")  # 1x8x8 images, 17 levels, 10 classes
    model = glow(info.image_shape, num_levels=info.num_levels, num_classes=info.num_classes, **cfg["model"])
    print(f"conditional Glow: {model.num_parameters():,} parameters, {model.num_classes} classes")

    config = TrainConfig(
        data="digits",
        conditional=True,  # batches are (images, labels): the model learns log p(x | y)
        out=str(out),
        overwrite=True,  # an example replaces its previous run
        seed=args.seed,
        progress=not args.quick,
        sample_temperature=args.temperature,
        **cfg["train"],
    )
    result = train(config, model=model)
    model, _ = load_checkpoint(result.files.best, model=model, device="cpu")  # the best epoch's weights, eval mode
    gen = torch.Generator().manual_seed(args.seed)
    threes = model.sample(16, temperature=args.temperature, generator=gen, y=3)  # "sample me a 3"
    save_image_grid(threes, out / "threes.png", model.num_levels, nrow=8, title=f"y = 3, T = {args.temperature}")
    plot_class_samples(
        model,
        out / "class_samples.png",
        per_class=10,
        temperature=args.temperature,
        seed=args.seed,
        title=f"conditional Glow on the digits: one row per class, same base noise per column (T={args.temperature})",
    )

    test = load_splits("digits")["test"]
    torch.manual_seed(args.seed)
    accuracy = bayes_accuracy(model, test.images.long(), test.labels)
    print(
        f"test bpd given the label ({result.importance_samples} importance samples): {result.test_bpd:.3f}; "
        f"as a classifier, argmax_y p(x | y) on the {len(test)} test digits: {accuracy:.1%}"
    )
    write_json(out / "example.json", {"test_bpd": result.test_bpd, "bayes_accuracy": accuracy})
    print(f"wrote {out / 'class_samples.png'}, {out / 'threes.png'} and the run in {out}")
    return result


if __name__ == "__main__":
    main()
