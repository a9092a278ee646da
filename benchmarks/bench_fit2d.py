"""Benchmark: the seed's plain normflows reverse-KL loop vs ``flowkit.toy2d.fit``, same run.

The seed (004_): TwoModes(2, 0.1), 16 normflows Planar on DiagGaussian(2), Adam(lr 1e-3,
wd 1e-4), 20,000 steps of 40 samples, beta = min(1, 0.01 + it / 10000), the loss fetched to
the host every step. flowkit runs its ``fast`` preset (fit()'s defaults, also
``flowkit fit2d``'s: the same 16 Planar flows, 8 random restarts trained together through the
annealing, the best 2 go on, 2000 steps of 512, cosine lr 1e-2, sticking-the-landing path
gradient) and its ``strong`` preset (the same, then 2 identity-initialised spline couplings refine
all layers with a chi^2 polish; see ``flowkit.toy2d.PRESETS``). While restarts run together
the checkpoint evaluations follow the restart with the lowest recent loss.

Each run is evaluated at checkpoints (20k samples, time excluded from the training clock); the
final metrics use 100k samples. Printed: training time, final KL(q||p)/ESS, the training time
each needs to first reach the seed's final KL, and the ratios.

Run: ``.venv/bin/python benchmarks/bench_fit2d.py`` (several minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import time

import normflows as nf
import numpy as np
import torch

from flowkit.toy2d import PRESETS, build_flow, evaluate, fit, get_target, refine_spec


def seed_loop(iters: int, every: int, eval_samples: int, target):
    """The seed's loop (its own code style re-written), with timed-out checkpoint evaluations."""
    torch.manual_seed(0)
    nfm = nf.NormalizingFlow(
        q0=nf.distributions.DiagGaussian(2),
        flows=[nf.flows.Planar((2,)) for _ in range(16)],
        p=nf.distributions.TwoModes(2, 0.1),
    )
    opt = torch.optim.Adam(nfm.parameters(), lr=1e-3, weight_decay=1e-4)
    hist = np.array([])
    curve, train = [], 0.0
    t0 = time.perf_counter()
    for it in range(iters):
        opt.zero_grad()
        loss = nfm.reverse_kld(40, beta=np.min([1.0, 0.01 + it / 10000]))
        loss.backward()
        opt.step()
        hist = np.append(hist, loss.to("cpu").data.numpy())
        if (it + 1) % every == 0:
            train += time.perf_counter() - t0
            m = evaluate(nfm, target, eval_samples, forward=False)
            curve.append((it + 1, train, m.reverse_kl, m.ess))
            print(f"  seed  step {it + 1:>6} {train:7.1f}s KL={m.reverse_kl:.4f} ESS={m.ess:.3f}", flush=True)
            t0 = time.perf_counter()
    train += time.perf_counter() - t0
    return nfm, train, curve


def total_iters(cfg: dict) -> int:
    """Steps of a preset, its refine stage included."""
    spec = refine_spec(cfg.get("refine"))
    return cfg["iters"] + (spec["iters"] if spec else 0)


def flowkit_run(name: str, preset: dict, every: int, eval_samples: int, target):
    cfg = dict(preset)
    flow, layers, flow_kwargs = cfg.pop("flow"), cfg.pop("layers"), cfg.pop("flow_kwargs", {})
    total = total_iters(cfg)
    curve, t_eval = [], [0.0]
    clock = [time.perf_counter()]

    def cb(step, model, loss):
        if step % every == 0 or step == total:
            t = time.perf_counter()
            m = evaluate(model, target, eval_samples, forward=False)
            t_eval[0] += time.perf_counter() - t
            train = time.perf_counter() - clock[0] - t_eval[0]
            curve.append((step, train, m.reverse_kl, m.ess))
            print(f"  {name:<5} step {step:>6} {train:7.1f}s KL={m.reverse_kl:.4f} ESS={m.ess:.3f}", flush=True)

    r = fit(
        lambda: build_flow(flow, layers, **flow_kwargs),
        target,
        progress=False,
        seed=0,
        sync_every=every // 2 if every >= 100 else every,
        callback=cb,
        **cfg,
    )
    return r.model, r.seconds - t_eval[0], curve


def time_to(curve, threshold):
    for step, t, kl, _ in curve:
        if kl <= threshold:
            return t, step
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-iters", type=int, default=20000)
    ap.add_argument("--seed-every", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--eval-samples", type=int, default=20000)
    ap.add_argument("--final-samples", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for all runs alike (0: leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = get_target("two-modes")
    _ = target.log_z  # integrate once, outside any clock
    # warm-up outside any clock: the first Adam step in a process pays one-time imports (seconds)
    w = torch.nn.Parameter(torch.zeros(2))
    warm = torch.optim.Adam([w], lr=1e-3)
    w.sum().backward()
    warm.step()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, log Z(two-modes) = {target.log_z:.5f}")

    runs = {}
    print("seed loop:")
    runs["seed"] = seed_loop(args.seed_iters, args.seed_every, args.eval_samples, target)
    for name in ("fast", "strong"):
        print(f"flowkit {name}: {PRESETS[name]}")
        runs[name] = flowkit_run(name, PRESETS[name], args.every, args.eval_samples, target)

    final = {k: evaluate(m, target, args.final_samples, forward=False) for k, (m, _, _) in runs.items()}
    seed_kl, seed_time = final["seed"].reverse_kl, runs["seed"][1]
    print(f"\nTwoModes(2, 0.1); KL in nats ({args.final_samples} samples); threshold = seed's final KL {seed_kl:.4f}")
    head = f"{'run':<8} {'steps x batch':>14} {'train s':>8} {'KL(q||p)':>16} {'ESS':>7} {'t to seed KL':>13} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for k, (_m, train, curve) in runs.items():
        cfg = {"seed": dict(iters=args.seed_iters, batch_size=40)}.get(k, PRESETS.get(k, {}))
        t_hit, step = (seed_time, args.seed_iters) if k == "seed" else time_to(curve, seed_kl)
        hit = f"{t_hit:.1f}s@{step}" if t_hit is not None else "never"
        ratio = f"{seed_time / t_hit:.1f}x" if t_hit else "-"
        f = final[k]
        print(
            f"{k:<8} {total_iters(cfg):>7} x {cfg['batch_size']:<4} {train:>8.1f} {f.reverse_kl:>9.4f}±{f.reverse_kl_se:.4f} {f.ess:>7.4f} {hit:>13} {ratio:>9}"
        )
    best = min(final, key=lambda k: final[k].reverse_kl)
    print(
        f"\nratios vs seed: fast time {runs['fast'][1] / seed_time:.3f}x of seed, "
        f"best KL {final[best].reverse_kl:.4f} ({best}) vs {seed_kl:.4f} = {final[best].reverse_kl / seed_kl:.2f}x, "
        f"best ESS {max(f.ess for f in final.values()):.4f} vs {final['seed'].ess:.4f}"
    )


if __name__ == "__main__":
    main()
