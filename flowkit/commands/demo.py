"""``flowkit demo``: the main job (``make demo``)."""

from __future__ import annotations

import time

import torch


def _run(args) -> int:
    from flowkit.commands.check import _run as run_check
    from flowkit.models import TUTORIAL_KINDS, tutorial_flow

    status = run_check(args)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 1, 28, 28))
    print(f"\n{'model':<12} {'parameters':>12} {'bpd (random batch, untrained)':>30} {'time':>8}")
    for kind in TUTORIAL_KINDS:
        model = tutorial_flow(kind)
        t0 = time.perf_counter()
        with torch.no_grad():
            bpd = model.bpd(x).mean().item()
        print(f"{kind:<12} {model.num_parameters():>12,} {bpd:>30.3f} {time.perf_counter() - t0:>7.2f}s")
    return status


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main demo (make demo)")
    p.set_defaults(func=_run)
