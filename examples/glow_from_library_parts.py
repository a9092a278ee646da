"""Glow (Kingma & Dhariwal, 2018) assembled by hand from nflows' parts, with flowkit's
variational dequantization and gated-conv coupling networks in front.

    x (integers) -> VariationalDequantization -> L levels of
        [SqueezeTransform -> K x (ActNorm -> OneByOneConvolution -> AffineCouplingTransform) -> split]
    -> z ~ N(0, I)

The levels are joined by nflows' MultiscaleCompositeTransform, which after every level but the
last sends half of the channels straight to the prior.  `flowkit.models.glow(...)` builds the
same model in one call (with shape checks); this file shows what it is made of.

The model trains through flowkit's engine like any other `ImageFlow`:
`train(TrainConfig(...), model=build_glow(...))`.  Its checkpoints have no recipe (it is an
instance), so `load_checkpoint(path, model=build_glow(...))` reloads them; to train it from the
command line instead, name the builder by import path:
`flowkit train --model glow_from_library_parts:build_glow --model-kwargs '{"num_scales": 2, "steps_per_scale": 4, "hidden": 64}'`
(run from this folder).

Run:
    python examples/glow_from_library_parts.py --quick --out runs/examples/glow   # seconds
    python examples/glow_from_library_parts.py --out runs/examples/glow           # a few minutes
    python examples/glow_from_library_parts.py --data mnist --data-root data      # if MNIST is on disk

OUT is the run folder (replaced on each run): checkpoints, metrics.json, samples.png, curves.png.
"""

from __future__ import annotations

import argparse

import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    MultiscaleCompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)

import flowkit
from flowkit.data import dataset_info
from flowkit.layers import (
    GatedConvNet,
    MaskedAffineCoupling,
    VariationalDequantization,
    checkerboard_mask,
    gated_conv_net,
)
from flowkit.training import TrainConfig, train

SETTINGS = {  # --quick: seconds on a CPU; full: a few minutes
    "quick": dict(
        model=dict(num_scales=2, steps_per_scale=1, hidden=16),
        train=dict(epochs=2, batch_size=32, max_train_batches=12, max_eval_batches=1, importance_samples=2),
    ),
    "full": dict(
        model=dict(num_scales=2, steps_per_scale=4, hidden=64),
        train=dict(epochs=60, batch_size=64, importance_samples=8),
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


def build_glow(
    image_shape, num_levels: int, num_scales: int = 2, steps_per_scale: int = 4, hidden: int = 64
) -> flowkit.ImageFlow:
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
    flow = MultiscaleCompositeTransform(num_transforms=num_scales)
    shape = (c, h, w)
    for _ in range(num_scales):
        squeezed = (4 * shape[0], shape[1] // 2, shape[2] // 2)
        shape = flow.add_transform(glow_level(squeezed[0], steps_per_scale, hidden), squeezed)

    # 3. ImageFlow = dequantization + flow + a standard-normal base; gives log_prob, bpd, sample, ...
    return flowkit.ImageFlow(dequantization, flow, image_shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--data", default="digits", help="digits (embedded) or mnist / fashion-mnist (if on disk)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--out", default="runs/examples/glow")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    torch.manual_seed(args.seed)

    info = dataset_info(args.data)
    model = build_glow(info.image_shape, info.num_levels, **cfg["model"])
    print(f"Glow from nflows parts: {model.num_parameters():,} parameters, latent levels {model.level_shapes}")

    # flowkit's engine trains any ImageFlow: ActNorm's data-dependent init on a real batch, Adam on
    # bits/dim (= -log p(x) / (D log 2)) with gradient clipping, validation every epoch, checkpoints,
    # and at the end the tutorial's importance-sampled test bpd of the best checkpoint.
    config = TrainConfig(
        data=args.data,
        data_root=args.data_root,
        out=args.out,
        overwrite=True,  # an example replaces its previous run
        seed=args.seed,
        progress=not args.quick,
        **cfg["train"],
    )
    result = train(config, model=model)
    first, last = result.history[0].train_bpd, result.history[-1].train_bpd
    print(
        f"train bpd {first:.3f} -> {last:.3f} in {result.train_time_s:.1f}s; "
        f"test bpd ({result.importance_samples} importance samples): {result.test_bpd:.3f}"
    )
    print(f"wrote {result.files.samples}, {result.files.metrics_json} and the checkpoints in {result.out}")
    return result


if __name__ == "__main__":
    main()
