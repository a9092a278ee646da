"""How reliable is a preset? ``fit`` it on a target for several seeds: exact KL / ESS and time of each.

Reverse KL ends in a seed-dependent local optimum, so one run says little about a setting. This
fits ``flowkit.toy2d.PRESETS[preset]`` (with ``--override`` JSON, e.g. ``'{"restarts": 4}'``)
once per seed, as ``flowkit fit2d --preset P --seed S`` does, and prints the exact reverse KL
and ESS from ``--eval-samples`` model samples, the fit time and the chosen restart, then the
spread (worst / median / best) and how many seeds meet ``--kl-max`` / ``--ess-min``.

Run: ``.venv/bin/python benchmarks/seeds_fit2d.py --preset fast --seeds 0-9`` (two seed ranges
in two processes on a 2-core machine, one thread each).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from flowkit.toy2d import PRESETS, evaluate, fit


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    ap.add_argument("--override", default="{}", help="JSON of fit overrides, e.g. '{\"restarts\": 1}'")
    ap.add_argument("--seeds", default="0-3", help="e.g. 0-9 or 0,2,5")
    ap.add_argument("--target", default="two-modes")
    ap.add_argument("--eval-samples", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kl-max", type=float, default=None, help="count the seeds with KL <= this")
    ap.add_argument("--ess-min", type=float, default=None, help="count the seeds with ESS >= this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.override)
    print(f"{args.target}: preset {args.preset} {overrides or ''}\n{PRESETS[args.preset].with_overrides(**overrides)}")
    rows = []
    for seed in parse_seeds(args.seeds):
        r = fit(None, args.target, args.preset, seed=seed, progress=False, **overrides)
        torch.manual_seed(seed)
        m = evaluate(r.model, args.target, args.eval_samples, forward=False)
        rows.append((m.reverse_kl, m.ess, r.seconds))
        print(
            f"seed {seed}: KL {m.reverse_kl:.4f} ± {m.reverse_kl_se:.4f}  ESS {m.ess:.4f}  {r.seconds:.1f}s"
            f"  restart {r.restart}  best step {r.best_step}",
            flush=True,
        )
    kl, ess, secs = (np.array(c) for c in zip(*rows, strict=True))
    print(
        f"KL worst {kl.max():.4f} median {np.median(kl):.4f} best {kl.min():.4f}; "
        f"ESS worst {ess.min():.4f} median {np.median(ess):.4f} best {ess.max():.4f}; "
        f"time {secs.min():.0f}-{secs.max():.0f}s over {len(rows)} seeds"
    )
    ok, terms = np.ones(len(rows), dtype=bool), []
    if args.kl_max is not None:
        ok, terms = ok & (kl <= args.kl_max), [*terms, f"KL <= {args.kl_max}"]
    if args.ess_min is not None:
        ok, terms = ok & (ess >= args.ess_min), [*terms, f"ESS >= {args.ess_min}"]
    if terms:
        print(f"{int(ok.sum())}/{len(rows)} seeds meet {' and '.join(terms)}")


if __name__ == "__main__":
    main()
