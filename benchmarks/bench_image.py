"""Image-flow benchmark (not a test): step and sampling times, and bpd in a fixed time budget.

Rows, all on the same machine in one run:

* ``tutorial_flow("multiscale")`` vs the tutorial's own layers (a scratch re-implementation
  loaded from ``--tutorial-ref PATH``, kept outside the repository; the row is skipped when
  the file is absent): training step (forward + backward + Adam) and sampling time at 1x28x28;
* ``glow(...)`` (uniform dequantization) vs normflows' own Glow (``GlowBlock`` + ``Squeeze``
  in a ``MultiscaleFlow``, behind the same uniform dequantization) at a similar size;
* bits/dim on the digits validation split after training each for ``--budget`` seconds.

Usage::

    .venv/bin/python benchmarks/bench_image.py --tutorial-ref /work/scratch/tutorial_ref.py
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import torch

from flowkit.layers import Dequantization
from flowkit.models import glow, tutorial_flow


def load_tutorial_ref(path):
    spec = importlib.util.spec_from_file_location("tutorial_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NormflowsGlow(torch.nn.Module):
    """normflows' Glow (GlowBlock + Squeeze, MultiscaleFlow) behind flowkit's uniform dequantization."""

    def __init__(self, image_shape, num_levels, levels, steps, hidden):
        import normflows as nf

        super().__init__()
        c, h, w = image_shape
        q0, merges, flows = [], [], []
        for i in range(levels):
            flows.append(
                [
                    nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
                    for _ in range(steps)
                ]
                + [nf.flows.Squeeze()]
            )
            if i > 0:
                merges.append(nf.flows.Merge())
                shape = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
            else:
                shape = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
            q0.append(nf.distributions.DiagGaussian(shape, trainable=False))
        self.flow = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
        self.deq = Dequantization(num_levels)
        self.num_dims = math.prod(image_shape)
        self.num_levels = num_levels

    def bpd(self, x):
        h, ladj = self.deq(x)
        return -(self.flow.log_prob(h, None) + ladj) / (self.num_dims * math.log(2.0))

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        h, _ = self.flow.sample(n, temperature=temperature)
        return self.deq.inverse(h)[0]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def train_step_fn(loss_fn, params, batch):
    """One Adam step of ``loss_fn(batch)`` as a closure (for interleaved timing)."""
    opt = torch.optim.Adam(list(params), lr=1e-4)

    def step():
        loss = loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def interleaved_times(fns, rounds):
    """Run every function once per round, round-robin, after one warm-up round.

    Returns per-function lists of wall times; load spikes on a shared machine then hit all
    contenders alike, and the per-round ratios stay meaningful.
    """
    times = [[] for _ in fns]
    for r in range(rounds + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if r:
                times[i].append(time.perf_counter() - t0)
    return times


def ratio(slow, fast):
    """Median of per-round ratios ``slow / fast`` (> 1: ``fast`` is faster)."""
    return statistics.median(a / b for a, b in zip(slow, fast, strict=False))


def bpd_in_budget(model, loss_fn, train_images, val_images, budget, batch_size, lr, seed):
    """Train for ``budget`` seconds (Adam, grad clip 1); returns (val bpd, steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        idx = torch.randint(0, len(train_images), (batch_size,), generator=gen)
        loss = loss_fn(train_images[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
    model.eval()
    with torch.no_grad():
        val = torch.cat([model.bpd(val_images[i : i + 256]) for i in range(0, len(val_images), 256)]).mean().item()
    return val, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tutorial-ref", default=None, help="scratch copy of the tutorial's layers (outside the repo)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model (median reported)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--budget", type=float, default=30.0, help="seconds of training per model on digits")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (benchmark only)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}\n")

    # -- 1. multiscale: flowkit vs the tutorial's own layers (1x28x28, 256 levels) -------------
    x = torch.randint(0, 256, (args.batch_size, 1, 28, 28), device=device)
    models = []  # (name, params, train step fn, sample fn)
    ms = tutorial_flow("multiscale").to(device)
    ms.initialize(x)
    models.append(
        (
            "flowkit tutorial_flow('multiscale')",
            n_params(ms),
            train_step_fn(lambda b: ms.bpd(b).mean(), ms.parameters(), x),
            lambda: ms.sample(args.samples),
        )
    )
    if args.tutorial_ref:
        try:
            ref = load_tutorial_ref(args.tutorial_ref)
        except FileNotFoundError:
            print(f"(no tutorial reference at {args.tutorial_ref}; row skipped)")
        else:
            tm = ref.create_multiscale_flow().to(device)
            models.append(
                (
                    "tutorial's own layers (multiscale)",
                    n_params(tm),
                    train_step_fn(tm, tm.parameters(), x),
                    lambda: tm.sample(args.samples, tm.latent_shape),
                )
            )

    # -- 2. Glow: flowkit (nflows parts) vs normflows' GlowBlock, 2 levels x 4 steps ------------
    fk = glow((1, 28, 28), levels=2, steps_per_level=4, hidden_channels=64, num_layers=1, dequantization="uniform").to(
        device
    )
    fk.initialize(x)
    nfg = NormflowsGlow((1, 28, 28), 256, levels=2, steps=4, hidden=200).to(device)
    with torch.no_grad():
        nfg.bpd(x)  # normflows' ActNorm initialises on its first batch
    models.append(
        (
            "flowkit glow(L=2, K=4, 64 hidden)",
            n_params(fk),
            train_step_fn(lambda b: fk.bpd(b).mean(), fk.parameters(), x),
            lambda: fk.sample(args.samples),
        )
    )
    models.append(
        (
            "normflows Glow (L=2, K=4, 200 hidden)",
            n_params(nfg),
            train_step_fn(lambda b: nfg.bpd(b).mean(), nfg.parameters(), x),
            lambda: nfg.sample(args.samples),
        )
    )

    train_t = dict(zip((m[0] for m in models), interleaved_times([m[2] for m in models], args.rounds), strict=False))
    sample_t = dict(zip((m[0] for m in models), interleaved_times([m[3] for m in models], args.rounds), strict=False))
    print(
        f"{'model (1x28x28)':<40} {'params':>10} {'train step':>11} {'sample ' + str(args.samples):>11}  (medians of {args.rounds} interleaved rounds)"
    )
    for name, n, _, _ in models:
        print(
            f"{name:<40} {n:>10,} {statistics.median(train_t[name]) * 1e3:>9.0f}ms {statistics.median(sample_t[name]) * 1e3:>9.0f}ms"
        )
    pairs = [
        (
            "tutorial's own layers (multiscale)",
            "flowkit tutorial_flow('multiscale')",
            "tutorial layers / flowkit multiscale",
        ),
        ("normflows Glow (L=2, K=4, 200 hidden)", "flowkit glow(L=2, K=4, 64 hidden)", "normflows Glow / flowkit glow"),
    ]
    print()
    for peer, ours, label in pairs:
        if peer in train_t:
            print(
                f"{label:<38} train step x{ratio(train_t[peer], train_t[ours]):.2f}, "
                f"sampling x{ratio(sample_t[peer], sample_t[ours]):.2f}  (>1: flowkit faster)"
            )

    # -- 3. bits/dim on digits after a fixed time budget --------------------------------------
    from flowkit.commands.demo import DEMO_LR, DEMO_MODEL_KWARGS
    from flowkit.data import load_splits

    splits = load_splits("digits")
    train_images = torch.stack([im for im, _ in splits["train"]]).to(device)
    val_images = torch.stack([im for im, _ in splits["val"]]).to(device)
    print(f"\nbits/dim on digits val after {args.budget:.0f}s of training (batch 64, lr {DEMO_LR}):")
    candidates = [
        ("flowkit glow (demo config)", lambda: glow((1, 8, 8), num_levels=17, **DEMO_MODEL_KWARGS)),
        ("normflows Glow (L=2, K=4, 64 hidden)", lambda: NormflowsGlow((1, 8, 8), 17, 2, 4, 64)),
        ("flowkit tutorial_flow('multiscale')", lambda: tutorial_flow("multiscale", (1, 8, 8), 17)),
    ]
    for name, make in candidates:
        torch.manual_seed(0)
        model = make().to(device)
        with torch.no_grad():
            (model.initialize(train_images[:256]) if hasattr(model, "initialize") else model.bpd(train_images[:256]))
        model.train()
        val, steps = bpd_in_budget(
            model, lambda b, m=model: m.bpd(b).mean(), train_images, val_images, args.budget, 64, DEMO_LR, 0
        )
        print(f"  {name:<40} {n_params(model):>9,} params  {steps:>5} steps  val bpd {val:.3f}")


if __name__ == "__main__":
    main()
