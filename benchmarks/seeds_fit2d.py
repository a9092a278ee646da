"""How reliable is a preset? ``fit`` it on TwoModes for several seeds, exact KL / ESS of each.

Reverse KL ends in a seed-dependent local optimum, so one run says little about a setting. This
fits ``flowkit.toy2d.PRESETS[preset]`` (with JSON overrides) once per seed and prints the exact
reverse KL and ESS from ``--eval-samples`` model samples, the fit time, the chosen restart and
the restarts' selection scores (``KL - log Z``), then the worst and median KL.

Run: ``.venv/bin/python benchmarks/seeds_fit2d.py --preset fast --seeds 0-7`` (~1 min per seed
on one CPU core; run two at a time on a 2-core machine with different ``--seeds``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from flowkit.toy2d import PRESETS, build_flow, evaluate, fit


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
    ap.add_argument("--override", default="{}", help="JSON merged into the preset, e.g. '{\"restarts\": 1}'")
    ap.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 0,2,5")
    ap.add_argument("--target", default="two-modes")
    ap.add_argument("--eval-samples", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg0 = {**PRESETS[args.preset], **json.loads(args.override)}
    print(f"{args.target}: {cfg0}")
    kls, esss = [], []
    for seed in parse_seeds(args.seeds):
        cfg = dict(cfg0)
        flow, layers, flow_kwargs = cfg.pop("flow"), cfg.pop("layers"), cfg.pop("flow_kwargs", {})
        r = fit(lambda: build_flow(flow, layers, **flow_kwargs), args.target, seed=seed, progress=False, **cfg)  # noqa: B023 (called at once)
        m = evaluate(r.model, args.target, args.eval_samples, forward=False)
        kls.append(m.reverse_kl)
        esss.append(m.ess)
        scores = "" if r.restart_scores is None else "  scores " + " ".join(f"{v:.2f}" for v in r.restart_scores)
        print(
            f"seed {seed}: KL {m.reverse_kl:.4f} ± {m.reverse_kl_se:.4f}  ESS {m.ess:.4f}  {r.seconds:.1f}s"
            f"  restart {r.restart}  best step {r.best_step}{scores}",
            flush=True,
        )
    print(
        f"KL worst {max(kls):.4f} median {np.median(kls):.4f}; ESS worst {min(esss):.4f} median {np.median(esss):.4f} "
        f"over {len(kls)} seeds"
    )


if __name__ == "__main__":
    main()
