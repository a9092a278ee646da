"""Bits/dim per second (not a test): validation bpd after a fixed training budget, flowkit's
default against normflows' Glow and the image-flow tutorial's own code, in one run.

Contenders (the same batch size, one torch thread each):

* ``flowkit``: exactly what ``flowkit train --data DATA`` trains with no model options: the
  engine's own run (``start_run(TrainConfig(data=DATA))``: the data set's default model, its
  optimizer, learning-rate schedule and weight average) stepped by the engine's ``train_step``;
  evaluated as the engine evaluates (its averaged weights when it keeps an average);
* ``normflows-glow``: normflows' Glow (``GlowBlock`` + ``Squeeze`` in a ``MultiscaleFlow``,
  L=2, K=4, 64 hidden) behind flowkit's uniform dequantization (``bench_image.NormflowsGlow``),
  Adam lr 1e-3 as normflows' Glow example (seed 003_) trains it;
* ``tutorial``: the tutorial's own multiscale flow (``create_multiscale_flow()`` of
  ``--tutorial-ref``, by default ``../shared/reference/tutorial_ref.py``: loaded, never copied;
  on the digits its dequantization is told the 17 levels), with the tutorial's recipe: Adam
  lr 1e-3, ``StepLR(gamma=0.99)`` per epoch.

Each contender runs in its own process; the parent hands a baton round-robin, so one computes
at a time, for a slice of about ``--slice`` seconds of its own CPU time
(``time.process_time()``, steady on a shared machine) before the next.  A contender's budget
clock counts its training slices only: setup and evaluation are off the clock.  The budgets
are checkpoints of ONE run per contender: the validation bpd is measured when its clock
passes each budget (30 s, 120 s, 300 s on the digits), with the same validation images for
every contender (flowkit's validation split, seed 0) and the same dequantization-noise seed.

``mnist`` trains on 28x28 MNIST digits: ``../shared/data/mnist_subset.npz`` (10,000 real
digits) written to a temporary folder as MNIST's IDX files (9,000 as the training file,
1,000 as the test file) and read through flowkit's real MNIST loader,
``flowkit.data.load_splits("mnist", root=...)`` (validation: flowkit's default 10 % of the
training file).

Usage::

    .venv/bin/python benchmarks/bench_bpd.py                       # the full table (~35 min)
    .venv/bin/python benchmarks/bench_bpd.py --data digits --budgets 30,60
    .venv/bin/python benchmarks/bench_bpd.py --quick               # a smoke run (~1 min)

``--variant [DATA:]NAME=JSON`` adds a flowkit contender with ``TrainConfig`` options changed
(for choosing defaults), on every data set or on ``DATA`` only, e.g.
``--variant lr3='{"lr": 3e-3}'`` or ``--variant mnist:full='{"model_kwargs": {"num_layers": 3}}'``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared(relative: str) -> Path:
    """``shared/relative`` in the nearest folder above the repository that has it (``../shared``
    next to a checkout, or further up for a git worktree)."""
    for parent in REPO_ROOT.parents:
        if (parent / "shared" / relative).exists():
            return parent / "shared" / relative
    return REPO_ROOT.parent / "shared" / relative


DEFAULT_TUTORIAL_REF = _shared("reference/tutorial_ref.py")
DEFAULT_MNIST = _shared("data/mnist_subset.npz")
PEERS = ("normflows-glow", "tutorial")
EVAL_SEED = 1234


# -- data ---------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST's format, gzipped): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(npz: Path, root: Path, n_train: int, n_test: int) -> None:
    """The first ``n_train + n_test`` digits of ``npz`` as MNIST's four IDX files under ``root``."""
    data = np.load(npz)
    images, labels = data["images"], data["labels"].astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    parts = {"train": slice(0, n_train), "t10k": slice(n_train, n_train + n_test)}
    for prefix, part in parts.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])


def load_data(data: str, root: str):
    """flowkit's splits (seed 0, the data set's default validation size), as the engine loads them."""
    from flowkit.data import load_splits

    return load_splits(data, root=root, seed=0, download=False) if data != "digits" else load_splits("digits")


# -- the contenders' trainers: each is (model to evaluate, step(), num_params) --------------------
class Baton:
    """A contender's side of the round-robin: ``clock`` is its CPU time on the turn, training only."""

    def __init__(self, conn, slice_s: float):
        self.conn, self.slice_s, self.clock, self.t0, self.turn_start = conn, slice_s, 0.0, 0.0, 0.0

    def start(self) -> None:
        self.conn.recv()
        self.t0 = time.process_time()

    def elapsed(self) -> float:
        return self.clock + time.process_time() - self.t0

    def maybe_pause(self) -> None:
        """Hand the turn on when this turn has used its slice."""
        if self.elapsed() - self.turn_start < self.slice_s:
            return
        self.clock = self.turn_start = self.elapsed()
        self.conn.send("yield")
        self.conn.recv()
        self.t0 = time.process_time()

    def off_clock_begin(self) -> None:
        self.clock = self.elapsed()

    def off_clock_end(self) -> None:
        self.t0 = time.process_time()


def flowkit_trainer(data: str, root: str, options: dict, out: str):
    """The engine's run for ``TrainConfig(data=data, **options)`` and a step function over its epochs."""
    from flowkit.training import TrainConfig
    from flowkit.training.loop import StepMeter, train_step
    from flowkit.training.run import start_run
    from flowkit.training.runtime import seed_all

    config = TrainConfig(data=data, data_root=root, out=out, device="cpu", threads=1, progress=False, **options)
    run = start_run(config)

    def batches():
        epoch = 0
        while True:
            run.sampler.set_epoch(epoch)
            seed_all(config.seed, 0, 0, epoch)  # as train_epoch seeds each epoch
            run.model.train()
            for _, (x, _y) in zip(range(run.steps_per_epoch), run.loaders["train"], strict=False):
                yield x
            epoch += 1

    stream, meter = batches(), StepMeter.zeros(run.device)

    def step():
        train_step(run, next(stream), meter)

    info = f"{run.model_name} {json.dumps(run.config.model_kwargs)}, batch {config.batch_size}, lr {config.lr}"
    info += f", warm-up {config.warmup_steps}, ema {config.ema_decay}"
    return run.eval_model, step, config.batch_size, info


def peer_trainer(name: str, data: str, root: str, batch_size: int, args):
    """normflows' Glow or the tutorial's multiscale flow, with its source's optimizer recipe."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_image import NormflowsGlow, load_tutorial_ref

    from flowkit.data import dataset_info

    splits, info = load_data(data, root), dataset_info(data)
    images = splits["train"].images
    torch.manual_seed(0)
    if name == "normflows-glow":
        model = NormflowsGlow(info.image_shape, info.num_levels, num_scales=2, steps=4, hidden=64)
        with torch.no_grad():
            model.bpd(images[:256].long())  # normflows' ActNorm initialises on its first batch
        loss_fn = lambda x: model.bpd(x).mean()  # noqa: E731
        what = "normflows Glow L=2 K=4 hidden 64, Adam 1e-3"
    else:
        model = load_tutorial_ref(args.tutorial_ref).create_multiscale_flow(*info.image_shape[1:])
        model.flows[0].quants = info.num_levels  # the tutorial's dequantization, for this data set's levels
        loss_fn = model
        what = "tutorial create_multiscale_flow(), Adam 1e-3, StepLR 0.99/epoch"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.99) if name == "tutorial" else None
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            perm = torch.randperm(len(images), generator=gen)
            for i in range(0, len(perm) - batch_size + 1, batch_size):
                yield images[perm[i : i + batch_size]].long()
            if sched is not None:
                sched.step()

    stream = batches()

    def step():
        model.train()
        loss = loss_fn(next(stream))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, step, what


@torch.no_grad()
def val_bpd(model, images: torch.Tensor, flowkit_model: bool) -> float:
    """Mean bits/dim over ``images`` (one dequantization sample each, fixed noise seed)."""
    was = model.training
    model.eval()
    torch.manual_seed(EVAL_SEED)
    total = 0.0
    for i in range(0, len(images), 256):
        x = images[i : i + 256].long()
        bpd = model.bpd(x, validate=False) if flowkit_model else model.bpd(x)
        total += float(bpd.sum()) if bpd.dim() else float(bpd) * len(x)
    model.train(was)
    return total / len(images)


def contender(name: str, options: dict, conn, args, data: str, root: str, budgets: list[float]) -> None:
    torch.set_num_threads(1)
    baton = Baton(conn, args.slice)
    with tempfile.TemporaryDirectory() as out:
        batch = options.get("batch_size", args.batch_size)
        if name in PEERS:
            model, step, what = peer_trainer(name, data, root, batch, args)
            is_flowkit = False
        else:
            model, step, batch, what = flowkit_trainer(data, root, options, str(Path(out) / "run"))
            is_flowkit = True
        val = load_data(data, root)["val"].images
        params = sum(p.numel() for p in model.parameters())
        step()  # the first step imports/compiles what it needs: off the clock, for everyone
        baton.start()
        results, steps, todo = [], 1, list(budgets)
        while todo:
            step()
            steps += 1
            if baton.elapsed() >= todo[0]:
                baton.off_clock_begin()
                bpd = val_bpd(model, val, is_flowkit)
                results.append({"budget": todo.pop(0), "clock": baton.clock, "steps": steps, "bpd": bpd})
                baton.off_clock_end()
            baton.maybe_pause()
        conn.send(("done", {"results": results, "params": params, "what": what, "batch": batch}))


def run_section(data: str, root: str, budgets: list[float], contenders: dict[str, dict], args) -> dict:
    """All contenders on one data set, round-robin."""
    ctx = mp.get_context("spawn")
    pipes = {}
    for name, options in contenders.items():
        parent, child = ctx.Pipe()
        ctx.Process(target=contender, args=(name, options, child, args, data, root, budgets), daemon=True).start()
        pipes[name] = parent
    results: dict[str, dict] = {}
    while len(results) < len(pipes):
        for name, pipe in pipes.items():
            if name in results:
                continue
            pipe.send("go")
            try:
                msg = pipe.recv()
            except EOFError:
                raise SystemExit(f"error: the contender {name!r} failed on {data} (its traceback is above)") from None
            if isinstance(msg, tuple):
                results[name] = msg[1]
                bpds = ", ".join(f"{r['budget']:g}s {r['bpd']:.3f}" for r in msg[1]["results"])
                print(f"  {data}: {name} done ({bpds})", flush=True)
    return results


# -- the table ----------------------------------------------------------------------------------
def print_table(columns: list[tuple[str, float]], table: dict[str, dict], names: list[str]) -> None:
    """Rows: contenders; columns: (data, budget) bpd (steps); then flowkit minus the best peer."""
    heads = [f"{d} {b:g}s" for d, b in columns]
    print(f"\n{'contender':<24}" + "".join(f"{h:>20}" for h in heads) + "   params")
    best_peer = {}
    for d, b in columns:
        peers = [table[d][p]["at"][b]["bpd"] for p in PEERS if p in table.get(d, {}) and b in table[d][p]["at"]]
        best_peer[(d, b)] = min(peers) if peers else math.nan
    for name in names:
        cells = []
        for d, b in columns:
            r = table.get(d, {}).get(name, {}).get("at", {}).get(b)
            cells.append(f"{r['bpd']:.3f} ({r['steps']} st)" if r else "-")
        params = "/".join(f"{table[d][name]['params']:,}" for d in dict(columns) if name in table.get(d, {}))
        print(f"{name:<24}" + "".join(f"{c:>20}" for c in cells) + f"   {params}")
    for name in names:
        if name in PEERS:
            continue
        diffs = []
        for d, b in columns:
            r = table.get(d, {}).get(name, {}).get("at", {}).get(b)
            diffs.append(f"{r['bpd'] - best_peer[(d, b)]:+.3f}" if r else "-")
        print(f"{name + ' - best peer':<24}" + "".join(f"{c:>20}" for c in diffs))
    print("(validation bits/dim after the budget of CPU seconds of training, one thread; lower is better)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits,mnist", help="comma-separated: digits, mnist")
    p.add_argument("--budgets", default="30,120,300", help="training budgets on the digits, CPU seconds")
    p.add_argument("--mnist-budgets", default="300", help="training budgets on MNIST, CPU seconds")
    p.add_argument("--contenders", default="flowkit," + ",".join(PEERS), help="comma-separated")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="[DATA:]NAME=JSON",
        help="extra flowkit contender (on DATA only)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="every contender's batch (default: flowkit's)")
    p.add_argument("--slice", type=float, default=2.0, help="CPU seconds per turn")
    p.add_argument("--tutorial-ref", type=Path, default=DEFAULT_TUTORIAL_REF)
    p.add_argument("--mnist-npz", type=Path, default=DEFAULT_MNIST)
    p.add_argument("--quick", action="store_true", help="a smoke run: budgets of 2 and 4 s, 600 MNIST digits")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from flowkit.training import TrainConfig

    args = parse_args(argv)
    if args.batch_size is None:
        args.batch_size = TrainConfig().batch_size
    budgets = {
        "digits": [float(b) for b in args.budgets.split(",")],
        "mnist": [float(b) for b in args.mnist_budgets.split(",")],
    }
    n_train, n_test = 9000, 1000
    if args.quick:
        budgets, n_train, n_test = {"digits": [2.0, 4.0], "mnist": [3.0]}, 500, 100
    contenders = {name: {} for name in args.contenders.split(",") if name}
    for name in contenders:
        if name not in PEERS and name != "flowkit":
            raise SystemExit(f"error: --contenders: unknown {name!r} (flowkit, {', '.join(PEERS)})")
    variants: dict[str, dict[str, dict]] = {}  # data set ("" for all) -> name -> TrainConfig options
    for spec in args.variant:
        name, _, text = spec.partition("=")
        where, _, name = name.rpartition(":")
        variants.setdefault(where, {})[name] = json.loads(text)
    print(
        f"torch {torch.__version__}, one thread per contender, batch {args.batch_size}, slices of {args.slice:g} CPU s"
    )
    table: dict[str, dict] = {}
    columns = []
    with tempfile.TemporaryDirectory() as root:
        for data in args.data.split(","):
            if data == "mnist":
                write_mnist(args.mnist_npz, Path(root), n_train, n_test)
            elif data != "digits":
                raise SystemExit(f"error: --data: expected digits or mnist, got {data!r}")
            here = {**contenders, **variants.get("", {}), **variants.get(data, {})}
            res = run_section(data, root, budgets[data], here, args)
            table[data] = {n: {**r, "at": {x["budget"]: x for x in r["results"]}} for n, r in res.items()}
            columns += [(data, b) for b in budgets[data]]
            for n, r in res.items():
                print(f"  {data}: {n}: {r['what']}")
    names = list(contenders) + [n for group in variants.values() for n in group if n not in contenders]
    print_table(columns, table, names)
    if args.json:
        args.json.write_text(
            json.dumps(
                {d: {n: {k: v for k, v in r.items() if k != "at"} for n, r in t.items()} for d, t in table.items()},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
