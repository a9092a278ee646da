"""One image flow built from four sources of layers, verified, then trained.

Every flowkit layer is an nflows `Transform`: `forward(x) -> (z, logabsdet)` maps data to
latent and `logabsdet` has shape [batch].  So layers from different places can sit in one
`CompositeTransform` as long as each speaks that contract:

    integers x  [1, 8, 8]
      1. flowkit   VariationalDequantization      x -> logits (learned noise q(u | x))
      2. tutorial  2 x MaskedAffineCoupling        checkerboard masks, GatedConvNet
      3. nflows    SqueezeTransform                [1, 8, 8] -> [4, 4, 4]
      4. nflows    2 x Glow step                   ActNorm, OneByOneConvolution,
                                                   AffineCouplingTransform(gated_conv_net)
      5. normflows AffineCouplingBlock             its own ConvNet2d, through flowkit.bridge.to_nflows
    latent z  [4, 4, 4] ~ N(0, I)

normflows runs the other way round (its `forward` maps latent -> data);
`flowkit.bridge.to_nflows` turns a normflows flow into an nflows Transform and
`to_normflows` does the reverse.  Nothing else has to know about directions.

Before training, `flowkit.check_transform` proves the assembled flow is a bijection whose
log-det matches the autograd Jacobian -- the check that catches a wrong sign, a wrong mask or
a layer from the other library plugged in backwards.  Then flowkit's engine trains it like any
other `ImageFlow`: `train(TrainConfig(...), model=model)`.

Run:
    python examples/mixing_layers.py --quick --out runs/examples/mixing   # seconds
    python examples/mixing_layers.py --out runs/examples/mixing           # a few minutes

OUT is the run folder (replaced on each run: checkpoints, metrics.json, samples.png,
curves.png); OUT/example.json holds the checks and the test bpd before and after training.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import normflows as nf
import torch
from nflows.transforms import (
    ActNorm,
    AffineCouplingTransform,
    CompositeTransform,
    OneByOneConvolution,
    SqueezeTransform,
)
from torch.utils.data import DataLoader

import flowkit
from flowkit.bridge import NormflowsAsNflows, to_nflows
from flowkit.check import format_reports, perturb_parameters
from flowkit.data import load_splits
from flowkit.io import write_json
from flowkit.layers import (
    GatedConvNet,
    MaskedAffineCoupling,
    VariationalDequantization,
    checkerboard_mask,
    gated_conv_net,
)
from flowkit.training import TrainConfig, evaluate_bpd, train

SETTINGS = {
    "quick": dict(model=dict(hidden=16, glow_steps=1), train=dict(epochs=1, batch_size=32, max_train_batches=20)),
    "full": dict(model=dict(hidden=48, glow_steps=2), train=dict(epochs=100, batch_size=64)),
}
C, H, W, NUM_LEVELS = 1, 8, 8, 17  # sklearn's digits: 1x8x8, values 0..16


def build_mixed_flow(hidden: int, glow_steps: int) -> flowkit.ImageFlow:
    # 1. flowkit: variational dequantization.  Its noise flow is itself made of tutorial
    #    couplings whose networks also see the image (context_channels=C).
    noise_flow = CompositeTransform(
        [
            MaskedAffineCoupling(
                checkerboard_mask(H, W, invert=(i % 2 == 1)),
                GatedConvNet(C, 2 * C, hidden_channels=16, num_layers=1, context_channels=C),
                num_channels=C,
            )
            for i in range(2)
        ]
    )
    dequantization = VariationalDequantization(noise_flow, num_levels=NUM_LEVELS)

    layers = []
    # 2. the tutorial's checkerboard couplings (flowkit.layers), at full resolution
    for i in range(2):
        net = GatedConvNet(C, 2 * C, hidden_channels=hidden, num_layers=1)  # outputs [scale, shift]
        layers.append(MaskedAffineCoupling(checkerboard_mask(H, W, invert=(i % 2 == 1)), net, num_channels=C))

    # 3. nflows: squeeze 2x2 pixels into channels, so channel-wise layers can mix them
    layers.append(SqueezeTransform())
    channels = 4 * C

    # 4. nflows Glow steps, with flowkit's GatedConvNet as the coupling network
    #    (gated_conv_net(...) is the `transform_net_create_fn(in, out)` nflows couplings take)
    for i in range(glow_steps):
        mask = [1 if (j < channels // 2) == (i % 2 == 0) else -1 for j in range(channels)]  # +1: transformed
        layers += [
            ActNorm(channels),
            OneByOneConvolution(channels),
            AffineCouplingTransform(mask, gated_conv_net(hidden_channels=hidden, num_layers=1)),
        ]

    # 5. normflows: a Glow-style affine coupling block (split channels, condition one half on the
    #    other with normflows' own ConvNet2d, merge), wrapped as an nflows Transform.  normflows'
    #    forward maps latent -> data; to_nflows makes its `inverse` our `forward` (data -> latent).
    half = channels // 2
    param_map = nf.nets.ConvNet2d([half, hidden, 2 * half], kernel_size=[3, 3], leaky=0.1)  # last conv zero-init
    layers.append(to_nflows(nf.flows.AffineCouplingBlock(param_map, scale_map="sigmoid", split_mode="channel")))

    flow = CompositeTransform(layers)
    # The flow ends squeezed, so tell ImageFlow the latent's shape (it assumes the image's otherwise).
    return flowkit.ImageFlow(dequantization, flow, (C, H, W), latent_shape=(channels, H // 2, W // 2))


def describe(layer) -> str:
    """``library.ClassName`` of a layer, looking through the bridge."""
    if isinstance(layer, NormflowsAsNflows):
        return f"normflows.{type(layer.flow).__name__} (via flowkit.bridge.to_nflows)"
    return f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}"


def verify(model: flowkit.ImageFlow) -> list:
    """Check the flow and the dequantization with flowkit.check_transform.

    Couplings start as the identity (zero-initialised last conv), where a wrong log-det would
    still read 0; so check a copy whose parameters are nudged away from the initialisation.
    """
    flow = perturb_parameters(copy.deepcopy(model.flow), scale=0.1)
    deq = perturb_parameters(copy.deepcopy(model.dequantization), scale=0.1)
    gen = torch.Generator().manual_seed(0)
    reports = [
        flowkit.check_transform(flow, torch.randn(2, C, H, W, generator=gen), name="mixed flow (64 dims)"),
        flowkit.check_transform(
            deq, torch.randint(0, NUM_LEVELS, (2, C, H, W), generator=gen), name="variational dequantization"
        ),
    ]
    # the flow in float64, where the tolerances are 1e-9 (float64 also catches dtype/device slips)
    reports.append(
        flowkit.check_transform(
            flow.double(), torch.randn(2, C, H, W, generator=gen, dtype=torch.float64), name="mixed flow, float64"
        )
    )
    print(format_reports(reports))
    bad = [r.name for r in reports if not r.ok]
    if bad:
        raise SystemExit(f"verification failed for: {', '.join(bad)}")
    return reports


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Mix flowkit, tutorial, nflows and normflows layers in one flow.")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--out", default="runs/examples/mixing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    torch.manual_seed(args.seed)

    model = build_mixed_flow(**cfg["model"])
    for i, layer in enumerate(model.flow._transforms):
        print(f"  layer {i}: {describe(layer)}")
    reports = verify(model)

    # Train on the embedded digits, exactly like any other ImageFlow; compare the one-sample test
    # bound on 256 test images before and after.
    test_images = load_splits("digits")["test"].images[:256]
    test_loader = DataLoader(test_images, batch_size=128)
    before = evaluate_bpd(model, test_loader, importance_samples=1)
    config = TrainConfig(
        data="digits",
        out=args.out,
        overwrite=True,  # an example replaces its previous run
        seed=args.seed,
        importance_samples=0,  # the before/after comparison below is the test
        progress=not args.quick,
        **cfg["train"],
    )
    result = train(config, model=model)  # the model ends with the last epoch's weights
    after = evaluate_bpd(model, test_loader, importance_samples=1)

    summary = {
        "parameters": model.num_parameters(),
        "checks": [
            {
                "name": r.name,
                "ok": r.ok,
                "roundtrip_error": r.roundtrip_error,
                "jacobian_error": r.jacobian_error,
                "ladj_sum_error": r.ladj_sum_error,
            }
            for r in reports
        ],
        "test_bpd_before": before,
        "test_bpd_after": after,
        "epochs": result.epochs,
        "train_time_s": result.train_time_s,
    }
    print(
        f"{model.num_parameters():,} parameters; test bpd {before:.3f} -> {after:.3f} after "
        f"{result.epochs} epoch(s) ({result.train_time_s:.1f}s)"
    )
    write_json(Path(args.out) / "example.json", summary)
    print(f"wrote {result.files.samples}, {Path(args.out) / 'example.json'} and the run's checkpoints and metrics")
    return summary


if __name__ == "__main__":
    main()
