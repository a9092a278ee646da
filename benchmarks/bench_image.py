"""Image-flow benchmark (not a test): step and sampling times, and bpd in a fixed time budget.

All rows on the same machine in one run, the contenders interleaved round by round (a load
spike on a shared machine hits every contender alike) and compared by the median of the
per-round time ratios:

* training step (forward + backward + Adam) at every ``--batch-sizes`` and sampling
  ``--samples`` images, 1x28x28, 256 levels:
  ``tutorial_flow("multiscale")`` vs the tutorial's own layers (a plain-PyTorch transcription
  loaded from ``--tutorial-ref``, by default ``../shared/reference/tutorial_ref.py`` next to the
  repository; never copied into it; its rows are skipped when the file is absent), and
  ``glow(...)`` (uniform dequantization) vs normflows' own Glow (``GlowBlock`` + ``Squeeze`` in
  a ``MultiscaleFlow``, behind the same dequantization);
* ``--compile``: the flowkit models again after :meth:`ImageFlow.compile` (``torch.compile``;
  on a CPU the first step compiles for minutes, reported separately);
* ``--baseline DIR`` (repeatable): the same flowkit models from another checkout of flowkit
  (e.g. ``git worktree add /tmp/base c5267e6``), each built in its own subprocess that runs
  its steps alternately with this checkout's: before/after timings of a change;
* bits/dim on the digits validation split after training each model for ``--budget`` seconds
  (``--budget 0`` skips it).

``--cpu-time`` times with the process's CPU time instead of the wall clock (steadier on a
machine shared with other jobs; use ``--threads 1`` with it).

Usage::

    .venv/bin/python benchmarks/bench_image.py --threads 1 --budget 0
    .venv/bin/python benchmarks/bench_image.py --threads 1 --budget 0 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TUTORIAL_REF = REPO_ROOT.parent / "shared" / "reference" / "tutorial_ref.py"
IMAGE_SHAPE = (1, 28, 28)
NUM_LEVELS = 256
GLOW_SCALES = (
    2,
    4,
)  # (num_scales, steps_per_scale), positional: a --baseline flowkit named them levels, steps_per_level
GLOW_KWARGS = dict(hidden_channels=64, num_layers=1, dequantization="uniform")
FLOWKIT_KINDS = ("multiscale", "glow")
# the small Glow the demo trained until flowkit's default model for the digits changed (issue 15)
DEMO_MODEL_KWARGS = dict(num_scales=2, steps_per_scale=4, hidden_channels=32, num_layers=1, dequantization="uniform")
DEMO_LR = 2e-3


# -- models ----------------------------------------------------------------------------------
def load_tutorial_ref(path: Path):
    spec = importlib.util.spec_from_file_location("tutorial_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NormflowsGlow(torch.nn.Module):
    """normflows' Glow (GlowBlock + Squeeze, MultiscaleFlow) behind flowkit's uniform dequantization."""

    def __init__(self, image_shape, num_levels, num_scales, steps, hidden):
        import normflows as nf

        from flowkit.layers import Dequantization

        super().__init__()
        c, h, w = image_shape
        q0, merges, flows = [], [], []
        for i in range(num_scales):
            flows.append(
                [
                    nf.flows.GlowBlock(c * 2 ** (num_scales + 1 - i), hidden, split_mode="channel", scale=True)
                    for _ in range(steps)
                ]
                + [nf.flows.Squeeze()]
            )
            if i > 0:
                merges.append(nf.flows.Merge())
                shape = (c * 2 ** (num_scales - i), h // 2 ** (num_scales - i), w // 2 ** (num_scales - i))
            else:
                shape = (c * 2 ** (num_scales + 1), h // 2**num_scales, w // 2**num_scales)
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


def flowkit_model(kind: str, batch: torch.Tensor):
    """``tutorial_flow("multiscale")`` or the Glow row's ``glow(...)``, initialised on ``batch``."""
    from flowkit.models import glow, tutorial_flow

    torch.manual_seed(0)
    model = tutorial_flow("multiscale") if kind == "multiscale" else glow(IMAGE_SHAPE, *GLOW_SCALES, **GLOW_KWARGS)
    model.initialize(batch)
    return model.to(batch.device)


def flowkit_loss(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trainer's loss: mean bpd of a batch validated when the data set was loaded."""

    def loss(batch):
        try:
            return model.bpd(batch, validate=False).mean()
        except TypeError:  # a flowkit from before ``validate=`` (a --baseline checkout)
            return model.bpd(batch).mean()

    return loss


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing ----------------------------------------------------------------------------------
def train_step_fn(loss_fn, params, batch):
    """One Adam step of ``loss_fn(batch)`` as a closure (for interleaved timing)."""
    opt = torch.optim.Adam(list(params), lr=1e-4)

    def step():
        loss = loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def clock(cpu_time: bool) -> Callable[[], float]:
    return time.process_time if cpu_time else time.perf_counter


def timed(fn: Callable[[], object], now: Callable[[], float]) -> float:
    t0 = now()
    fn()
    return now() - t0


@dataclass
class Contender:
    """One row: a name, its parameter count and a ``run(task) -> seconds`` for each task."""

    name: str
    params: int
    run: Callable[[str], float]
    times: dict[str, list[float]] = field(default_factory=dict)


def interleave(contenders: list[Contender], task: str, rounds: int) -> None:
    """Run ``task`` once per contender per round, round-robin, after one warm-up round."""
    for c in contenders:
        c.times[task] = []
    for r in range(rounds + 1):
        for c in contenders:
            seconds = c.run(task)
            if r:
                c.times[task].append(seconds)


def ratio(slow: list[float], fast: list[float]) -> float:
    """Median of per-round ratios ``slow / fast`` (> 1: ``fast`` is faster)."""
    return statistics.median(a / b for a, b in zip(slow, fast, strict=True))


def local_contender(name, model, loss_fn, sample_fn, batches, now) -> Contender:
    steps = {f"train {b}": train_step_fn(loss_fn, model.parameters(), x) for b, x in batches.items()}

    def run(task):
        return timed(sample_fn if task == "sample" else steps[task], now)

    return Contender(name, n_params(model), run)


# -- a flowkit checkout in a subprocess (--baseline) --------------------------------------------
def worker_main(args) -> None:
    """``--worker``: build a flowkit model (from whatever flowkit is importable), then run the
    tasks the parent names on stdin, one per line, answering each with its time in seconds."""
    import flowkit

    now = clock(args.cpu_time)
    batches = make_batches(args.batch_sizes, torch.device(args.device))
    model = flowkit_model(args.worker, batches[max(batches)])
    contender = local_contender(
        args.worker, model, flowkit_loss(model), lambda: model.sample(args.samples), batches, now
    )
    print(json.dumps({"flowkit": str(Path(flowkit.__file__).parent), "params": contender.params}), flush=True)
    for line in sys.stdin:
        print(contender.run(line.strip()), flush=True)


def baseline_contender(directory: Path, kind: str, args) -> Contender:
    """The ``kind`` model of the flowkit checkout in ``directory``, run in a worker subprocess."""
    command = [sys.executable, __file__, "--worker", kind, "--samples", str(args.samples), "--batch-sizes"]
    command += (
        [str(b) for b in args.batch_sizes] + ["--device", args.device] + (["--cpu-time"] if args.cpu_time else [])
    )
    env = dict(os.environ, PYTHONPATH=str(directory.resolve()))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(proc.stdout.readline())
    if not hello["flowkit"].startswith(str(directory.resolve())):
        raise SystemExit(f"--baseline {directory}: the worker imported flowkit from {hello['flowkit']}")

    def run(task):
        proc.stdin.write(task + "\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    return Contender(f"{kind} @ {directory}", hello["params"], run)


# -- the speed section ---------------------------------------------------------------------------
def make_batches(batch_sizes, device) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {b: torch.randint(0, NUM_LEVELS, (b, *IMAGE_SHAPE), generator=gen).to(device) for b in batch_sizes}


def flowkit_contenders(kind: str, args, batches, now) -> list[Contender]:
    """This checkout's ``kind`` model, plus its compiled twin with ``--compile``."""
    rows = []
    for compiled in (False, True) if args.compile else (False,):
        model = flowkit_model(kind, batches[max(batches)])
        label = f"flowkit {kind}" + (" (compiled)" if compiled else "")
        if compiled:
            model.compile(dynamic=False)
            t0 = time.perf_counter()
            for x in batches.values():  # one graph per batch size, compiled here, not in round 0
                flowkit_loss(model)(x).backward()
            print(f"{label}: compiling took {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append(
            local_contender(label, model, flowkit_loss(model), lambda m=model: m.sample(args.samples), batches, now)
        )
    return rows


def peer_contender(kind: str, args, batches, now) -> Contender | None:
    """The tutorial's own multiscale flow, or normflows' Glow."""
    if kind == "glow":
        torch.manual_seed(0)
        peer = NormflowsGlow(IMAGE_SHAPE, NUM_LEVELS, num_scales=2, steps=4, hidden=200).to(args.device)
        with torch.no_grad():
            peer.bpd(batches[max(batches)])  # normflows' ActNorm initialises on its first batch
        return local_contender(
            "normflows Glow (L=2, K=4)",
            peer,
            lambda b: peer.bpd(b).mean(),
            lambda: peer.sample(args.samples),
            batches,
            now,
        )
    if not Path(args.tutorial_ref).is_file():
        print(
            f"(no tutorial reference at {args.tutorial_ref}: the tutorial rows are skipped; pass --tutorial-ref PATH)"
        )
        return None
    torch.manual_seed(0)
    ref = load_tutorial_ref(args.tutorial_ref).create_multiscale_flow().to(args.device)
    sample = lambda: ref.sample(args.samples, ref.latent_shape)  # noqa: E731
    return local_contender("tutorial's own code (multiscale)", ref, ref, sample, batches, now)


def report(contenders: list[Contender], tasks: list[str], rounds: int) -> None:
    header = "".join(f"{t:>13}" for t in tasks)
    print(f"\n{'model (1x28x28)':<52} {'params':>10}{header}   (ms, medians of {rounds} interleaved rounds)")
    for c in contenders:
        cells = "".join(f"{statistics.median(c.times[t]) * 1e3:>11.0f}ms" for t in tasks)
        print(f"{c.name:<52} {c.params:>10,}{cells}")
    base = contenders[0]
    for c in contenders[1:]:
        cells = ", ".join(f"{t} x{ratio(c.times[t], base.times[t]):.2f}" for t in tasks)
        print(f"  {c.name} / {base.name}: {cells}  (>1: {base.name} faster)")


def speed_section(args, now) -> None:
    batches = make_batches(args.batch_sizes, torch.device(args.device))
    tasks = [f"train {b}" for b in args.batch_sizes] + ["sample"]
    for kind in FLOWKIT_KINDS:
        contenders = flowkit_contenders(kind, args, batches, now)
        contenders += [baseline_contender(Path(d), kind, args) for d in args.baseline]
        peer = peer_contender(kind, args, batches, now)
        contenders += [peer] if peer is not None else []
        for task in tasks:
            interleave(contenders, task, args.rounds)
        report(contenders, tasks, args.rounds)


# -- bits/dim in a time budget ------------------------------------------------------------------
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


def budget_section(args) -> None:
    from flowkit.data import load_splits
    from flowkit.models import glow, tutorial_flow

    device = torch.device(args.device)
    splits = load_splits("digits")
    train_images = torch.stack([im for im, _ in splits["train"]]).to(device)
    val_images = torch.stack([im for im, _ in splits["val"]]).to(device)
    print(f"\nbits/dim on digits val after {args.budget:.0f}s of training (batch 64, lr {DEMO_LR}):")
    candidates = [
        ("flowkit glow (L=2, K=4, 32 hidden)", lambda: glow((1, 8, 8), num_levels=17, **DEMO_MODEL_KWARGS)),
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tutorial-ref", type=Path, default=DEFAULT_TUTORIAL_REF, help="the tutorial's layers (outside the repo)"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians reported)")
    p.add_argument("--samples", type=int, default=64, help="images per sampling call")
    p.add_argument("--compile", action="store_true", help="add rows for ImageFlow.compile() (minutes on a CPU)")
    p.add_argument("--baseline", action="append", default=[], metavar="DIR", help="another flowkit checkout to time")
    p.add_argument("--cpu-time", action="store_true", help="time with process CPU time instead of the wall clock")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of training per model on digits (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (benchmark only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=FLOWKIT_KINDS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker_main(args)
    timer = "process CPU time" if args.cpu_time else "wall clock"
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {timer}")
    speed_section(args, clock(args.cpu_time))
    if args.budget > 0:
        budget_section(args)


if __name__ == "__main__":
    main()
