"""``flowkit check``: verify every built-in layer with :func:`flowkit.check_transform`."""

from __future__ import annotations

import torch


def run_checks(dtypes=(torch.float32, torch.float64)):
    """Check every registered layer case in each dtype; returns the reports."""
    from flowkit.check import LAYER_CASES, check_transform, perturb_parameters

    reports = []
    for dtype in dtypes:
        for name, make in LAYER_CASES.items():
            case = make()
            perturb_parameters(case.transform)  # leave the identity initialisation
            case.transform.to(dtype)
            cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731, B023 (used in this iteration)
            reports.append(check_transform(case.transform, cast(case.inputs), cast(case.context), name=name))
    return reports


def _run(args) -> int:
    from flowkit.check import format_reports

    reports = run_checks()
    print(format_reports(reports))
    bad = [r.name for r in reports if not r.ok]
    print(f"\n{len(reports) - len(bad)}/{len(reports)} checks passed" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser("check", help="verify every built-in layer (inverse, log-det vs autograd Jacobian)")
    p.set_defaults(func=_run)
