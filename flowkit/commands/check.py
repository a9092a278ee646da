"""``flowkit check``: verify every built-in layer with :func:`flowkit.check_transform`, printing
each row as soon as it is measured."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator

import torch

from flowkit.check import LAYER_CASES, CheckReport, check_transform, default_tolerance, perturb_parameters

__all__ = ["iter_checks", "run_checks"]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _check_case(name: str, dtype: torch.dtype) -> CheckReport:
    """One registry case in ``dtype``, parameters perturbed away from the identity initialisation."""
    try:
        case = LAYER_CASES[name]()
        perturb_parameters(case.transform)
        case.transform.to(dtype)
    except Exception as err:  # a broken case is a failing row, the others still run
        nan, failure = float("nan"), f"building the case raised {type(err).__name__}: {err}"
        tolerances = default_tolerance(dtype), default_tolerance(torch.float64)
        return CheckReport(name, str(dtype).replace("torch.", ""), nan, nan, nan, 0, *tolerances, [failure])
    context = None if case.context is None else _cast(case.context, dtype)
    return check_transform(case.transform, _cast(case.inputs, dtype), context, name=name)


def iter_checks(dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64)) -> Iterator[CheckReport]:
    """Check every registered layer case in each dtype, yielding each report when it is ready."""
    for dtype in dtypes:
        for name in LAYER_CASES:
            yield _check_case(name, dtype)


def run_checks(dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64)) -> list[CheckReport]:
    """Every report of :func:`iter_checks`, as a list."""
    return list(iter_checks(dtypes))


def _run(args: argparse.Namespace) -> int:
    from flowkit.check import format_header, format_row

    print(format_header(), flush=True)
    bad, total = [], 0
    for report in iter_checks():
        print(format_row(report), flush=True)
        total += 1
        if not report.ok:
            bad.append(f"{report.name} ({report.dtype})")
    print(f"\n{total - len(bad)}/{total} checks passed" + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify every built-in layer (inverse, log-det vs autograd Jacobian)")
    p.set_defaults(func=_run)
