"""Write your own flow layer as an nflows Transform, and prove it correct before training.

The contract (flowkit/layers/base.py):
  * forward(x, context=None) -> (z, logabsdet): data -> latent, logabsdet = log|det dz/dx|, shape [batch]
  * inverse(z, context=None) -> (x, logabsdet): latent -> data, logabsdet = log|det dx/dz|
  * so forward's and inverse's log-dets add up to 0 at matching points.

`flowkit.check_transform(layer, x)` measures all three things numerically: the round trip
inverse(forward(x)) = x, the log-det against log|det J| of the autograd Jacobian (in float64),
and forward + inverse log-dets = 0.  Below, one correct layer passes and two subtly broken
copies are caught -- each bug would otherwise train "fine" and report a wrong likelihood.

Once proved, the layer trains inside an `ImageFlow` through flowkit's engine like any other:
`train(TrainConfig(...), model=model)`.

Run:
    python examples/custom_layer.py --quick --out runs/examples/custom   # seconds
    python examples/custom_layer.py --out runs/examples/custom           # a few minutes

OUT is the run folder (replaced on each run: checkpoints, metrics.json, samples.png,
curves.png); OUT/example.json holds the checks, the learned slopes and the test bpd before and
after training.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from nflows.transforms import CompositeTransform, Transform
from torch import nn
from torch.utils.data import DataLoader

import flowkit
from flowkit.check import format_reports, perturb_parameters
from flowkit.data import load_splits
from flowkit.io import write_json
from flowkit.layers import Dequantization, GatedConvNet, MaskedAffineCoupling, checkerboard_mask
from flowkit.layers.base import sum_except_batch
from flowkit.training import TrainConfig, evaluate_bpd, train

SETTINGS = {
    "quick": dict(model=dict(hidden=16, couplings=2), train=dict(epochs=1, batch_size=32, max_train_batches=20)),
    "full": dict(model=dict(hidden=32, couplings=6), train=dict(epochs=100, batch_size=64)),
}


class LeakyReLUFlow(Transform):
    """Invertible leaky ReLU with a learned slope per channel.

    ``z = x`` where ``x >= 0`` and ``z = a_c x`` where ``x < 0``, ``a_c = exp(log_slope_c) > 0``;
    ``log|det dz/dx| = sum over negative x of log a_c``.  Starts as the identity (``a = 1``).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.log_slope = nn.Parameter(torch.zeros(num_channels))

    def _log_slope(self, x: torch.Tensor) -> torch.Tensor:
        # [C] -> [1, C, 1, 1, ...] so it broadcasts over [B, C, ...]
        return self.log_slope.view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, inputs, context=None):
        log_a = self._log_slope(inputs)
        negative = inputs < 0
        z = torch.where(negative, inputs * log_a.exp(), inputs)
        logabsdet = sum_except_batch(negative * log_a)  # [batch], born from the input
        return z, logabsdet

    def inverse(self, inputs, context=None):
        log_a = self._log_slope(inputs)
        negative = inputs < 0  # a > 0 keeps the sign, so z < 0 exactly where x < 0
        x = torch.where(negative, inputs * (-log_a).exp(), inputs)
        return x, -sum_except_batch(negative * log_a)


class WrongSignInverse(LeakyReLUFlow):
    """Bug 1: the inverse reports log|det dz/dx| instead of log|det dx/dz| (sign forgotten)."""

    def inverse(self, inputs, context=None):
        x, logabsdet = super().inverse(inputs, context)
        return x, -logabsdet


class CountsTheWrongHalf(LeakyReLUFlow):
    """Bug 2: forward adds log a for the *positive* inputs (and inverse agrees, so the two
    log-dets still cancel -- only the Jacobian check can see this one)."""

    def forward(self, inputs, context=None):
        z, _ = super().forward(inputs, context)
        return z, sum_except_batch((inputs >= 0) * self._log_slope(inputs))

    def inverse(self, inputs, context=None):
        x, _ = super().inverse(inputs, context)
        return x, -sum_except_batch((inputs >= 0) * self._log_slope(inputs))


def verify_layers() -> list:
    """Check the correct layer and the two broken ones on a small input [4, 2, 3, 3]."""
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    reports = []
    for cls in (LeakyReLUFlow, WrongSignInverse, CountsTheWrongHalf):
        layer = perturb_parameters(cls(num_channels=2), scale=0.5)  # leave the identity: a = 1 hides bugs
        reports.append(flowkit.check_transform(layer, x, name=cls.__name__))
    print(format_reports(reports))
    return reports


def build_model(hidden: int, couplings: int) -> flowkit.ImageFlow:
    """Uniform dequantization, then tutorial couplings with the new layer between them."""
    c, h, w = 1, 8, 8
    layers = []
    for i in range(couplings):
        net = GatedConvNet(c, 2 * c, hidden_channels=hidden, num_layers=1)
        layers += [
            MaskedAffineCoupling(checkerboard_mask(h, w, invert=(i % 2 == 1)), net, num_channels=c),
            LeakyReLUFlow(c),
        ]
    return flowkit.ImageFlow(Dequantization(num_levels=17), CompositeTransform(layers), (c, h, w))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="A custom nflows Transform, verified, then trained.")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--out", default="runs/examples/custom")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SETTINGS["quick" if args.quick else "full"]
    torch.manual_seed(args.seed)

    # 1. Prove the layer before using it: the correct one passes, both bugs are caught.
    reports = verify_layers()
    good, wrong_sign, wrong_half = reports
    assert good.ok, "LeakyReLUFlow should pass the checks"
    assert not wrong_sign.ok and wrong_sign.ladj_sum_error > 1e-3, "the sign bug should be caught"
    assert not wrong_half.ok and wrong_half.jacobian_error > 1e-3, "the miscounted log-det should be caught"
    print(
        "verifier: LeakyReLUFlow passes; WrongSignInverse caught by forward+inverse log-dets, "
        "CountsTheWrongHalf caught by the Jacobian check"
    )
    # (To have `flowkit check` and the shared test run it too, add it to the registry with
    #  flowkit.check.register_case("LeakyReLUFlow")(lambda: LayerCase(LeakyReLUFlow(2), x)).)

    # 2. Use it: train an image flow on the embedded digits with flowkit's engine, and compare the
    #    one-sample test bound on 256 test images before and after.
    model = build_model(**cfg["model"])
    test_loader = DataLoader(load_splits("digits")["test"].images[:256], batch_size=128)
    before = evaluate_bpd(model, test_loader, importance_samples=1)
    config = TrainConfig(
        data="digits",
        out=args.out,
        overwrite=True,  # an example replaces its previous run
        seed=args.seed,
        importance_samples=0,  # the before/after comparison is the test
        progress=not args.quick,
        **cfg["train"],
    )
    result = train(config, model=model)  # the model ends with the last epoch's weights
    after = evaluate_bpd(model, test_loader, importance_samples=1)
    slopes = [math.exp(m.log_slope.item()) for m in model.modules() if isinstance(m, LeakyReLUFlow)]

    summary = {
        "checks": {
            r.name: {
                "ok": r.ok,
                "roundtrip_error": r.roundtrip_error,
                "jacobian_error": r.jacobian_error,
                "ladj_sum_error": r.ladj_sum_error,
            }
            for r in reports
        },
        "learned_slopes": slopes,
        "test_bpd_before": before,
        "test_bpd_after": after,
        "epochs": result.epochs,
        "train_time_s": result.train_time_s,
    }
    print(
        f"test bpd {before:.3f} -> {after:.3f} after {result.epochs} epoch(s) ({result.train_time_s:.1f}s); "
        f"learned slopes {', '.join(f'{s:.3f}' for s in slopes)}"
    )
    write_json(Path(args.out) / "example.json", summary)
    print(f"wrote {result.files.samples}, {Path(args.out) / 'example.json'} and the run's checkpoints and metrics")
    return summary


if __name__ == "__main__":
    main()
