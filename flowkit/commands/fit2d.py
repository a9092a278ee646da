"""``flowkit fit2d``: fit a 2D target by reverse KL, print the metrics, write PNGs.

Example: ``flowkit fit2d --target two-modes --out runs/fit2d`` (preset ``fast``: the seed's 16
Planar flows, 8 random restarts trained together through the annealing, the 2 with the lowest
KL go on). ``--preset strong`` (for importance sampling) then appends spline couplings that
start as the identity and refines all layers, ending with a chi^2 (ESS) polish; ``--preset
seed-loop`` is the seed's loop (``seed``, its old name, still works for one release); any
option below overrides the preset (``flowkit.toy2d.PRESETS``).

``--out`` is checked before the fit starts; ``snapshots.png`` there is rewritten as the fit goes
(``--snapshot-every``), the other pictures and ``metrics.json`` are written at the end. The
progress is a bar on a terminal and a line per tenth of the run otherwise (a log is not
flooded). Runs on one CPU thread by default (``--threads``): the flows are tiny, more threads
only wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Literal

__all__ = ["register"]

# CLI option -> Preset.with_overrides name
_OVERRIDES = ("flow", "layers", "iters", "batch_size", "lr", "anneal_iters", "weight_decay", "gradient", "restarts")


def _writable_out(out: str) -> Path:
    """``out`` as a folder that exists and can be written to; ``ValueError`` before any work if not."""
    from flowkit.io import check_writable_folder

    try:
        return check_writable_folder(out)
    except NotADirectoryError as err:
        raise ValueError(f"--out: {out} is a file; expected a folder (created if missing)") from err
    except OSError as err:
        raise ValueError(f"--out: cannot write to {out}: {err.strerror or err}") from err


def _rename_deprecated_preset(args) -> None:
    """An old ``--preset`` name becomes its new one, with a one-line note on stderr."""
    from flowkit.toy2d.presets import DEPRECATED_PRESETS

    if args.preset in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[args.preset]
        print(
            f"note: --preset {args.preset} is deprecated (next release: removed); use --preset {new}", file=sys.stderr
        )
        args.preset = new


def _overrides(args) -> dict:
    from flowkit.toy2d import PRESETS, Refine

    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    refine = PRESETS[args.preset].refine
    if args.refine is not None:  # --refine: the preset's refine stage (or the default one); --no-refine: none
        refine = (refine or Refine()) if args.refine else None
    if args.refine_iters is not None:
        if refine is None:
            raise ValueError("--refine-iters: the run has no refine stage (give --refine)")
        refine = refine.scaled(args.refine_iters)
    overrides["refine"] = refine
    return overrides


def _describe(result, target_name: str, device: str) -> str:
    plan = result.preset
    restarts = plan.restarts.count
    chosen = f", best of {restarts} restarts (#{result.restart})" if restarts > 1 else ""
    ref = plan.refine
    refined = ""
    if ref is not None and ref.method == "distill":
        refined = (
            f", then distilled into {ref.components} Gaussians + {ref.flow} x{ref.layers} in {ref.stage.iters} steps"
        )
    elif ref is not None:
        refined = f", then + {ref.flow} x{ref.layers} refined for {ref.stage.iters} steps"
    return (
        f"fit2d: {target_name}, {plan.flow} x{plan.layers}{chosen}, {plan.stage.iters} steps of "
        f"{plan.stage.batch_size} samples{refined} in {result.seconds:.1f}s on {device}"
    )


def _write_outputs(out: Path, result, target, metrics, args, writer) -> None:
    from flowkit.io import write_json
    from flowkit.toy2d.plots import save_fit_pictures

    paths = save_fit_pictures(result, target, out, snapshots=writer.snapshots if writer else None)
    record = {
        "config": {"target": args.target, "seed": args.seed, "preset": dataclasses.asdict(result.preset)},
        "seconds": result.seconds,
        "log_z_method": target.normaliser.method,
        **metrics.as_dict(),
    }
    paths.append(write_json(out / "metrics.json", record))
    print("wrote " + ", ".join(str(p) for p in paths))


def _run(args) -> int:
    import torch

    from flowkit.errors import NonFiniteLossError
    from flowkit.toy2d import evaluate, fit, format_metrics, get_target
    from flowkit.toy2d.plots import SnapshotWriter

    _rename_deprecated_preset(args)
    try:
        for flag, value, low in (("--threads", args.threads, 0), ("--snapshot-every", args.snapshot_every, 0)):
            if value < low:
                raise ValueError(f"{flag}: expected an int >= {low}, got {value}")
        if args.eval_samples < 2:
            raise ValueError(f"--eval-samples: expected an int >= 2, got {args.eval_samples}")
        out = _writable_out(args.out) if args.out else None
        target = get_target(args.target)
        writer = SnapshotWriter(target, out, args.snapshot_every) if out is not None and args.snapshot_every else None
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:  # 2D flows are tiny: extra intra-op threads cost more in synchronisation than they give
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress: bool | Literal["bar", "lines"] = False
    if not args.no_progress:
        progress = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
    try:
        result = fit(
            None,
            target,
            args.preset,
            device=device,
            seed=args.seed,
            progress=progress,
            callback=writer,
            **_overrides(args),
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    metrics = evaluate(result.model, target, args.eval_samples)
    print(_describe(result, args.target, device))
    print(format_metrics({args.target: metrics}))
    if out is not None:
        _write_outputs(out, result, target, metrics, args, writer)
    return 0


def register(sub) -> None:
    from flowkit.toy2d import FLOW_KINDS, PRESETS, list_targets
    from flowkit.toy2d.presets import DEPRECATED_PRESETS

    p = sub.add_parser("fit2d", help="fit a 2D target density by reverse KL and report exact metrics")
    p.add_argument("--target", default="two-modes", choices=list_targets())
    p.add_argument(
        "--preset",
        default="fast",
        choices=sorted(PRESETS) + sorted(DEPRECATED_PRESETS),
        metavar="{" + ",".join(sorted(PRESETS)) + "}",
        help="defaults for the options below (default: fast; seed-loop: the seed's own 20k-step loop)",
    )
    p.add_argument("--flow", default=None, choices=list(FLOW_KINDS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--anneal-iters", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument(
        "--gradient",
        default=None,
        choices=("path", "total"),
        help="path: sticking-the-landing path derivative (presets fast/strong); total: the plain one (seed)",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="random restarts trained together until the annealing ends; the best go on",
    )
    p.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after the first stage, distill the best model into a Gaussian mixture + spline couplings "
        "(default: as the preset; fast and strong do)",
    )
    p.add_argument("--refine-iters", type=int, default=None, help="steps of the refine stage (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for this run (0: torch's default)")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=250,
        help="with --out: keep model samples every N steps and rewrite snapshots.png as the fit goes (0: none)",
    )
    p.add_argument(
        "--out", default=None, help="folder for target.png, model.png, loss.png, snapshots.png, metrics.json"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
