"""Benchmark: the seed's plain normflows reverse-KL loop vs ``flowkit.toy2d.fit``, interleaved in one run.

The seed (004_): TwoModes(2, 0.1), 16 normflows Planar on DiagGaussian(2), Adam(lr 1e-3,
wd 1e-4), 20,000 steps of 40 samples, beta = min(1, 0.01 + it / 10000), the loss fetched to
the host every step. Against it:

* ``given``: ``toy2d.fit(nfm)`` on the same model (same initialisation), the default preset
  (for a given model: 8 restarts at ``given_lr``, no refine stage);
* ``fast``: ``flowkit fit2d``'s default (``fit(None, "two-modes")``: 8 restarts, ...);
* ``strong``: ``fit(None, "two-modes", "strong")`` (then spline couplings and a chi^2 polish).

Each contender runs in its own process (own random state); the parent hands a baton round-robin
so only one computes at a time and each gets a slice (the seed loop 200 steps, a fit one synced
chunk) before the next: load on the machine hits all contenders alike. Each keeps a training
clock (its slices, evaluations excluded) and evaluates its model at each slice end (20k
samples); the final metrics use 100k samples. Printed: training time, final KL(q||p)/ESS, the
training time each needs to first reach the seed's final KL, and the ratio to the seed's time.

Run: ``.venv/bin/python benchmarks/bench_fit2d.py`` (about 10 minutes on one free core;
``--runs seed,given`` for the speed-up alone).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np
import torch


class Baton:
    """A contender's side of the round-robin: ``pause()`` hands the turn back; ``clock`` counts
    the time it held the turn, minus what ran inside ``excluded()``."""

    def __init__(self, conn):
        self.conn, self.clock, self.t0 = conn, 0.0, 0.0

    def start(self) -> None:
        self.conn.recv()
        self.t0 = time.perf_counter()

    def pause(self) -> None:
        self.clock += time.perf_counter() - self.t0
        self.conn.send("yield")
        self.conn.recv()
        self.t0 = time.perf_counter()

    def excluded(self):
        baton = self

        class _Off:
            def __enter__(self):
                baton.clock += time.perf_counter() - baton.t0

            def __exit__(self, *exc):
                baton.t0 = time.perf_counter()

        return _Off()

    def finish(self, result: dict) -> None:
        self.clock += time.perf_counter() - self.t0
        self.conn.send(("done", {**result, "train": self.clock}))


def seed_model(init: int):
    import normflows as nf

    torch.manual_seed(init)
    return nf.NormalizingFlow(
        q0=nf.distributions.DiagGaussian(2),
        flows=[nf.flows.Planar((2,)) for _ in range(16)],
        p=nf.distributions.TwoModes(2, 0.1),
    )


def checkpoint(baton: Baton, curve: list, step: int, model, samples: int) -> None:
    from flowkit.toy2d import evaluate

    with baton.excluded():
        m = evaluate(model, "two-modes", num_samples=samples, forward=False)
        curve.append((step, baton.clock, m.reverse_kl, m.ess))


def run_seed_loop(baton: Baton, args) -> tuple:
    """The seed's loop, as the seed writes it, with a checkpoint every ``args.slice`` steps."""
    nfm = seed_model(args.init)
    torch.manual_seed(args.init + 1000)
    opt = torch.optim.Adam(nfm.parameters(), lr=1e-3, weight_decay=1e-4)
    hist, curve = np.array([]), []
    for it in range(args.seed_iters):
        opt.zero_grad()
        loss = nfm.reverse_kld(40, beta=np.min([1.0, 0.01 + it / 10000]))
        loss.backward()
        opt.step()
        hist = np.append(hist, loss.to("cpu").data.numpy())
        if (it + 1) % args.slice == 0:
            if (it + 1) % args.seed_every == 0:
                checkpoint(baton, curve, it + 1, nfm, args.eval_samples)
            baton.pause()
    return nfm, curve, args.seed_iters, 40


def run_fit(baton: Baton, args, name: str) -> tuple:
    from flowkit.toy2d import fit

    curve: list = []

    def on_chunk(step, model, loss):
        checkpoint(baton, curve, step, model, args.eval_samples)
        baton.pause()

    if name == "given":
        model, kwargs = seed_model(args.init), json.loads(args.given)
    else:
        model, kwargs = None, {"target": "two-modes", "preset": name, "seed": args.init}
    result = fit(model, progress=False, callback=on_chunk, **kwargs)
    return result.model, curve, result.preset.total_iters, result.preset.stage.batch_size


def contender(name: str, conn, args) -> None:
    from flowkit.toy2d import evaluate

    torch.set_num_threads(args.threads)
    baton = Baton(conn)
    evaluate(seed_model(0), num_samples=1000)  # one-time imports and the log Z integral, off the clock
    w = torch.nn.Parameter(torch.zeros(2))
    torch.optim.Adam([w]).step()  # the first Adam step imports torch._dynamo (seconds)
    baton.start()
    model, curve, steps, batch = run_seed_loop(baton, args) if name == "seed" else run_fit(baton, args, name)
    with baton.excluded():
        final = evaluate(model, "two-modes", num_samples=args.final_samples, forward=False)
    baton.finish(
        dict(curve=curve, steps=steps, batch=batch, kl=final.reverse_kl, se=final.reverse_kl_se, ess=final.ess)
    )


def interleave(names: list[str], args) -> dict[str, dict]:
    """Run the contenders round-robin, one slice each in turn, until all are done."""
    ctx = mp.get_context("spawn")
    pipes = {}
    for name in names:
        parent, child = ctx.Pipe()
        ctx.Process(target=contender, args=(name, child, args), daemon=True).start()
        pipes[name] = parent
    results: dict[str, dict] = {}
    while len(results) < len(names):
        for name in names:
            if name in results:
                continue
            pipes[name].send("go")
            try:
                msg = pipes[name].recv()
            except EOFError:
                raise SystemExit(f"error: the contender {name!r} failed (its traceback is above)") from None
            if isinstance(msg, tuple):
                results[name] = msg[1]
                print(f"  {name} done: KL {msg[1]['kl']:.4f}, ESS {msg[1]['ess']:.4f}", flush=True)
    return results


def time_to(curve: list, threshold: float) -> tuple[float | None, int | None]:
    for step, t, kl, _ in curve:
        if kl <= threshold:
            return t, step
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="seed,given,fast,strong", help="contenders, comma-separated (seed first)")
    ap.add_argument("--init", type=int, default=0, help="torch seed of the shared initialisation (and the fits' seed)")
    ap.add_argument("--seed-iters", type=int, default=20000)
    ap.add_argument("--seed-every", type=int, default=1000, help="seed-loop steps between its checkpoints")
    ap.add_argument("--slice", type=int, default=200, help="seed-loop steps per turn")
    ap.add_argument("--eval-samples", type=int, default=20000)
    ap.add_argument("--final-samples", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each contender")
    ap.add_argument("--given", default="{}", help="JSON of fit overrides for the given model, e.g. '{\"keep\": 8}'")
    ap.add_argument(
        "--curves", default=None, help="write every contender's (step, train s, KL, ESS) curve to this JSON"
    )
    args = ap.parse_args()
    names = args.runs.split(",")
    if names[0] != "seed":
        raise SystemExit("error: --runs: the seed loop comes first (it sets the threshold)")
    print(f"torch {torch.__version__}, {args.threads} thread(s) per contender, interleaved: {', '.join(names)}")
    res = interleave(names, args)
    if args.curves:
        from flowkit.io import write_json

        write_json(args.curves, {name: r["curve"] for name, r in res.items()})
    seed = res["seed"]
    threshold, seed_time = seed["kl"], seed["train"]
    print(
        f"\nTwoModes(2, 0.1), init {args.init}; KL in nats ({args.final_samples} samples); threshold = seed's final KL"
    )
    head = f"{'run':<8} {'steps x batch':>14} {'train s':>8} {'KL(q||p)':>16} {'ESS':>7} {'t to seed KL':>13} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for name in names:
        r = res[name]
        t_hit, step = (seed_time, r["steps"]) if name == "seed" else time_to(r["curve"], threshold)
        hit = f"{t_hit:.1f}s@{step}" if t_hit is not None else "never"
        ratio = f"{seed_time / t_hit:.1f}x" if t_hit else "-"
        print(
            f"{name:<8} {r['steps']:>7} x {r['batch']:<4} {r['train']:>8.1f} {r['kl']:>9.4f}±{r['se']:.4f} "
            f"{r['ess']:>7.4f} {hit:>13} {ratio:>9}"
        )


if __name__ == "__main__":
    main()
