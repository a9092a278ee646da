"""How good is a fit: exact reverse KL, forward KL, effective sample size, ``log Z`` estimate.

With importance weights ``w = p~(x) / q(x)``, ``x ~ q``:

* reverse KL ``KL(q||p) = E_q[log q - log p~] + log Z`` (``log Z`` from the target, so exact up
  to Monte Carlo and integration error; without ``log Z`` only the relative value
  ``E_q[log q - log p~]`` is reported);
* forward KL ``KL(p||q) = E_p[log p~ - log q] - log Z`` (needs target samples, ``log Z`` and an
  invertible model);
* ESS ``= (sum w)^2 / (N sum w^2)`` in ``[0, 1]``;
* ``log Z_hat = log mean w`` with standard error ``sqrt((1/ESS - 1) / N)`` (delta method).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from flowkit.toy2d.flows import is_invertible, model_log_prob, model_sample
from flowkit.toy2d.targets import Target2D, as_target
from flowkit.validation import check_bool, check_int

__all__ = ["Metrics", "evaluate", "format_metrics"]


@dataclasses.dataclass
class Metrics:
    """Result of :func:`evaluate`, in nats.

    Attributes:
        reverse_kl: ``KL(q||p)``; ``None`` when the target's ``log Z`` is unknown.
        reverse_kl_relative: ``E_q[log q - log p~] = KL(q||p) - log Z`` (always known).
        reverse_kl_se: Monte-Carlo standard error of both.
        forward_kl: ``KL(p||q)`` (``None``: the target cannot be sampled, ``log Z`` is unknown
            or the model has no inverse), with its standard error ``forward_kl_se``.
        ess: effective sample size of the importance weights, in ``[0, 1]``.
        log_z: the target's ``log Z`` (``None``: unknown), with its integration error ``log_z_error``.
        log_z_estimate: ``log mean w`` from the model's samples, with its standard error ``log_z_se``.
        num_samples: samples from the model.
    """

    reverse_kl: float | None
    reverse_kl_relative: float
    reverse_kl_se: float
    forward_kl: float | None
    forward_kl_se: float | None
    ess: float
    log_z: float | None
    log_z_error: float | None
    log_z_estimate: float
    log_z_se: float
    num_samples: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _target_of(model: Any, target: Any) -> Target2D:
    if target is None:
        target = getattr(model, "p", None)
        if target is None:
            raise ValueError("target: none given and the model has no p; pass the target the model was fitted to")
    return as_target(target)


@torch.no_grad()
def _log_weights(model: Any, target: Target2D, num_samples: int, chunk: int) -> torch.Tensor:
    """``log w = log p~(x) - log q(x)`` for ``num_samples`` draws ``x ~ q``, in float64."""
    parts = []
    for i in range(0, num_samples, chunk):
        x, log_q = model_sample(model, min(chunk, num_samples - i))
        parts.append((target.log_prob(x) - log_q).double())
    return torch.cat(parts)


@torch.no_grad()
def _forward_kl(model: Any, target: Target2D, num_samples: int, chunk: int) -> tuple[float | None, float | None]:
    """``KL(p||q)`` and its standard error from target samples (``None`` where it cannot be had)."""
    log_z = target.log_z
    if log_z is None or not target.can_sample or not is_invertible(model):
        return None, None
    param = next(model.parameters(), None)
    diffs = []
    for i in range(0, num_samples, chunk):
        xp = target.sample(min(chunk, num_samples - i))
        if param is not None:
            xp = xp.to(param.device, param.dtype)
        diffs.append((target.log_prob(xp) - model_log_prob(model, xp)).double())
    d = torch.cat(diffs)
    return d.mean().item() - log_z, d.std().item() / math.sqrt(d.shape[0])


def evaluate(
    model: Any, target: Any = None, num_samples: int = 100_000, *, chunk: int = 1 << 16, forward: bool = True
) -> Metrics:
    """Metrics of a normflows model ``q`` against a target ``p = p~ / Z``.

    Args:
        model: a normflows ``NormalizingFlow`` (sampled, and inverted for the forward KL, through
            :mod:`flowkit.bridge`).
        target: anything :func:`~flowkit.toy2d.targets.as_target` takes (a name, a
            :class:`~flowkit.toy2d.targets.Target2D`, a normflows target, a callable
            ``z -> log p~(z)``); ``None``: the model's own ``p``.
        num_samples: samples from ``q`` (and from ``p`` for the forward KL).
        chunk: samples per batch (memory).
        forward: also compute the forward KL (when the target samples and the model inverts).

    Returns:
        :class:`Metrics`; the reverse-KL standard error is ``std(log q - log p~) / sqrt(N)``.
    """
    target = _target_of(model, target)
    check_int("num_samples", num_samples, low=2)
    check_int("chunk", chunk, low=1)
    check_bool("forward", forward)
    log_w = _log_weights(model, target, num_samples, chunk)
    n = log_w.shape[0]
    finite = bool(torch.isfinite(log_w).all())
    relative = -log_w.mean().item() if finite else math.inf
    rkl_se = log_w.std().item() / math.sqrt(n) if finite else math.inf
    lse = torch.logsumexp(log_w, 0).item()
    ess = math.exp(2 * lse - torch.logsumexp(2 * log_w, 0).item() - math.log(n))
    log_z_se = math.sqrt(max(1.0 / ess - 1.0, 0.0) / n) if ess > 0 else math.inf
    normaliser = target.normaliser
    fkl, fkl_se = _forward_kl(model, target, num_samples, chunk) if forward else (None, None)
    return Metrics(
        reverse_kl=None if normaliser.value is None else relative + normaliser.value,
        reverse_kl_relative=relative,
        reverse_kl_se=rkl_se,
        forward_kl=fkl,
        forward_kl_se=fkl_se,
        ess=ess,
        log_z=normaliser.value,
        log_z_error=None if normaliser.value is None else normaliser.error,
        log_z_estimate=lse - math.log(n),
        log_z_se=log_z_se,
        num_samples=n,
    )


def _kl_cell(m: Metrics) -> str:
    if m.reverse_kl is None:
        return f"{m.reverse_kl_relative:.4f}±{m.reverse_kl_se:.4f} - log Z"
    return f"{m.reverse_kl:.4f}±{m.reverse_kl_se:.4f}"


def format_metrics(rows: dict[str, Metrics]) -> str:
    """A text table: one row per named :class:`Metrics`. Without ``log Z`` the reverse KL is
    shown relative to it (``... - log Z``) and a note says so."""
    head = f"{'run':<22} {'KL(q||p)':>24} {'KL(p||q)':>16} {'ESS':>7} {'log Z':>17} {'log Z est.':>18}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        fkl = "n/a" if m.forward_kl is None else f"{m.forward_kl:.4f}±{m.forward_kl_se:.4f}"
        log_z = "unknown" if m.log_z is None else f"{m.log_z:.4f}±{m.log_z_error:.0e}"
        lines.append(
            f"{name:<22} {_kl_cell(m):>24} {fkl:>16} {m.ess:>7.4f} {log_z:>17} "
            f"{m.log_z_estimate:>10.4f}±{m.log_z_se:.4f}"
        )
    if any(m.reverse_kl is None for m in rows.values()):
        lines.append(
            "KL(q||p) relative: the target's log Z is unknown, so only E_q[log q - log p~] = KL - log Z is known"
        )
    return "\n".join(lines)
