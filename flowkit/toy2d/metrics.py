"""How good is a fit: exact reverse KL, forward KL, effective sample size, ``log Z`` estimate.

With importance weights ``w = p~(x) / q(x)``, ``x ~ q``:

* reverse KL ``KL(q||p) = E_q[log q - log p~] + log Z`` (``log Z`` from the target, so exact up
  to Monte Carlo and integration error);
* forward KL ``KL(p||q) = E_p[log p~ - log q] - log Z`` (needs target samples and an
  invertible model);
* ESS ``= (sum w)^2 / (N sum w^2)`` in ``[0, 1]``;
* ``log Z_hat = log mean w`` with standard error ``sqrt((1/ESS - 1) / N)`` (delta method).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from flowkit.toy2d.targets import Target2D, get_target

__all__ = ["Metrics", "evaluate", "format_metrics"]


@dataclasses.dataclass
class Metrics:
    """Result of :func:`evaluate` (nats; ``forward_kl`` is None when it cannot be computed)."""

    reverse_kl: float
    reverse_kl_se: float
    forward_kl: float | None
    forward_kl_se: float | None
    ess: float
    log_z: float
    log_z_estimate: float
    log_z_se: float
    num_samples: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _model_log_prob(model, x: torch.Tensor) -> torch.Tensor | None:
    try:
        return model.log_prob(x)
    except NotImplementedError:
        return None


@torch.no_grad()
def evaluate(
    model, target: Target2D | str, num_samples: int = 100_000, *, chunk: int = 1 << 16, forward: bool = True
) -> Metrics:
    """Metrics of a normflows model ``q`` against a target ``p = p~ / Z``.

    Args:
        model: a normflows ``NormalizingFlow`` (``sample`` and, for forward KL, ``log_prob``).
        target: a :class:`~flowkit.toy2d.targets.Target2D` or a registered name.
        num_samples: samples from ``q`` (and from ``p`` for the forward KL).
        chunk: samples per batch (memory).
        forward: also compute the forward KL (when the target samples and the model inverts).

    Returns:
        :class:`Metrics`; the reverse-KL standard error is ``std(log q - log p~) / sqrt(N)``.
    """
    target = get_target(target)
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples: expected an int >= 2, got {num_samples!r}")
    log_z = target.log_z
    log_w = []
    for i in range(0, num_samples, chunk):
        x, log_q = model.sample(min(chunk, num_samples - i))
        log_w.append((target.log_prob(x) - log_q).double())
    log_w = torch.cat(log_w)
    n = log_w.shape[0]
    finite = torch.isfinite(log_w).all().item()
    rkl = log_z - log_w.mean().item() if finite else math.inf
    rkl_se = log_w.std().item() / math.sqrt(n) if finite else math.inf
    lse = torch.logsumexp(log_w, 0).item()
    ess = math.exp(2 * lse - torch.logsumexp(2 * log_w, 0).item() - math.log(n))
    log_z_hat = lse - math.log(n)
    log_z_se = math.sqrt(max(1.0 / ess - 1.0, 0.0) / n) if ess > 0 else math.inf

    fkl = fkl_se = None
    if forward and target.can_sample:
        diffs = []
        for i in range(0, num_samples, chunk):
            xp = target.sample(min(chunk, num_samples - i)).to(log_w.device)
            param = next(model.parameters(), None)
            if param is not None:
                xp = xp.to(param.device, param.dtype)
            log_q = _model_log_prob(model, xp)
            if log_q is None:
                diffs = None
                break
            diffs.append((target.log_prob(xp) - log_q).double())
        if diffs:
            d = torch.cat(diffs)
            fkl = d.mean().item() - log_z
            fkl_se = d.std().item() / math.sqrt(d.shape[0])
    return Metrics(rkl, rkl_se, fkl, fkl_se, ess, log_z, log_z_hat, log_z_se, n)


def format_metrics(rows: dict[str, Metrics]) -> str:
    """A text table: one row per named :class:`Metrics`."""
    head = f"{'run':<22} {'KL(q||p)':>16} {'KL(p||q)':>16} {'ESS':>7} {'log Z':>9} {'log Z est.':>18}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        fkl = "n/a (no inverse)" if m.forward_kl is None else f"{m.forward_kl:.4f}±{m.forward_kl_se:.4f}"
        lines.append(
            f"{name:<22} {m.reverse_kl:>9.4f}±{m.reverse_kl_se:.4f} {fkl:>16} {m.ess:>7.4f} {m.log_z:>9.4f} "
            f"{m.log_z_estimate:>10.4f}±{m.log_z_se:.4f}"
        )
    return "\n".join(lines)
