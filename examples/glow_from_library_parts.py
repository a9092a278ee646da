"""Glow (Kingma & Dhariwal, 2018) assembled by hand from nflows' parts, with flowkit's
variational dequantization and gated-conv coupling networks in front.

    x (integers) -> VariationalDequantization -> L levels of
        [SqueezeTransform -> K x (ActNorm -> OneByOneConvolution -> AffineCouplingTransform) -> split]
    -> z ~ N(0, I)

The levels are joined by nflows' MultiscaleCompositeTransform, which after every level but the
last sends half of the channels straight to the prior.  `flowkit.models.glow(...)` builds the
same model in one call (with shape checks); this file shows what it is made of.

Run:
    python examples/glow_from_library_parts.py --quick --out runs/examples/glow   # seconds
    python examples/glow_from_library_parts.py --out runs/examples/glow           # a few minutes
    python examples/glow_from_library_parts.py --data mnist --data-root data      # if MNIST is on disk

Writes OUT/samples.png and OUT/metrics.json, and prints bits/dim.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import flowkit
from flowkit.data import dataset_info, load_splits
from flowkit.io import write_json
from flowkit.layers import (
    GatedConvNet,
    MaskedAffineCoupling,
    VariationalDequantization,
    checkerboard_mask,
    gated_conv_net,
)
from flowkit.training import evaluate
from flowkit.viz import save_image_grid

SETTINGS = {  # --quick: seconds on a CPU; full: a few minutes
    "quick": dict(
        levels=2, steps_per_level=1, hidden=16, train_steps=25, batch_size=32, eval_batches=1, importance_samples=2
    ),
    "full": dict(
        levels=2, steps_per_level=4, hidden=64, train_steps=1500, batch_size=64, eval_batches=None, importance_samples=8
    ),
}


def glow_level(channels: int, steps: int, hidden: int) -> CompositeTransform:
    """One Glow level on an input with `channels / 4` channels: squeeze, then `steps` steps of flow."""
    layers = [SqueezeTransform()]  # (C, H, W) -> (4C, H/2, W/2)
    for i in range(steps):
        # nflows' coupling mask: +1 = transformed, -1 = passed through (and fed to the net);
        # alternate which half is transformed from step to step
        mask = [1 if (j < channels // 2) == (i % 2 == 0) else -1 for j in range(channels)]
        layers += [
            ActNorm(channels),  # per-channel affine, initialised from the first batch
            OneByOneConvolution(channels),  # learned channel mixing (LU-parametrised)
            AffineCouplingTransform(mask, gated_conv_net(hidden_channels=hidden, num_layers=1)),
        ]
    return CompositeTransform(layers)


def build_glow(image_shape, num_levels: int, levels: int, steps_per_level: int, hidden: int) -> flowkit.ImageFlow:
    c, h, w = image_shape
    # 1. Dequantization: integers -> logits.  The noise u ~ q(u | x) is itself a small flow:
    #    four checkerboard couplings whose nets see the image (context_channels=c).
    noise_flow = CompositeTransform(
        [
            MaskedAffineCoupling(
                checkerboard_mask(h, w, invert=(i % 2 == 1)),
                GatedConvNet(c, 2 * c, hidden_channels=16, num_layers=1, context_channels=c),
                num_channels=c,
            )
            for i in range(4)
        ]
    )
    dequantization = VariationalDequantization(noise_flow, num_levels=num_levels)

    # 2. The multiscale flow.  add_transform(level, output_shape) returns the shape that goes
    #    on to the next level (half the channels) or None after the last level.
    flow = MultiscaleCompositeTransform(num_transforms=levels)
    shape = (c, h, w)
    for _ in range(levels):
        squeezed = (4 * shape[0], shape[1] // 2, shape[2] // 2)
        shape = flow.add_transform(glow_level(squeezed[0], steps_per_level, hidden), squeezed)

    # 3. ImageFlow = dequantization + flow + a standard-normal base; gives log_prob, bpd, sample, ...
    return flowkit.ImageFlow(dequantization, flow, image_shape)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--data", default="digits", help="digits (embedded) or mnist / fashion-mnist (if on disk)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="runs/examples/glow")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = dataset_info(args.data)
    splits = load_splits(args.data, root=args.data_root, download=False)
    model = build_glow(info.image_shape, info.num_levels, cfg["levels"], cfg["steps_per_level"], cfg["hidden"]).to(
        device
    )
    train_images = splits["train"].images  # uint8 [N, C, H, W]
    print(f"Glow from nflows parts: {model.num_parameters():,} parameters, latent levels {model.level_shapes}")

    # ActNorm initialises itself from the statistics of the first batch it sees: give it real data.
    model.initialize(train_images[:256].long().to(device))

    # A plain training loop: minimise bits/dim (= -log p(x) / (D log 2)) with Adam.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for _ in tqdm(range(cfg["train_steps"]), desc="train", disable=args.quick):
        x = train_images[torch.randint(0, len(train_images), (cfg["batch_size"],), generator=gen)].long().to(device)
        loss = model.bpd(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    train_time = time.perf_counter() - start

    # Evaluate: the tutorial's importance-sampled bound on the test split.
    test_loader = DataLoader(splits["test"], batch_size=128)
    test_bpd = evaluate(
        model, test_loader, importance_samples=cfg["importance_samples"], max_batches=cfg["eval_batches"]
    )
    samples = model.sample(64, temperature=0.7)
    save_image_grid(samples.cpu(), out / "samples.png", model.num_levels, title="Glow from nflows parts, T=0.7")

    metrics = {
        "parameters": model.num_parameters(),
        "train_steps": cfg["train_steps"],
        "first_train_bpd": losses[0],
        "last_train_bpd": sum(losses[-10:]) / len(losses[-10:]),
        "test_bpd": test_bpd,
        "importance_samples": cfg["importance_samples"],
        "train_time_s": train_time,
    }
    print(
        f"train bpd {metrics['first_train_bpd']:.3f} -> {metrics['last_train_bpd']:.3f} in {train_time:.1f}s; "
        f"test bpd ({cfg['importance_samples']} importance samples): {test_bpd:.3f}"
    )
    write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
