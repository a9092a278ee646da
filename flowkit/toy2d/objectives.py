"""The objectives of :func:`flowkit.toy2d.fit` and the scores that choose between models.

For ``x ~ q`` and the target's ``log p~``, per model of a runner (``[]`` or ``[restarts]``):

* :func:`reverse_kl`: ``mean(log q(x) - beta log p~(x))`` (``= KL(q||p) - log Z`` at ``beta = 1``),
  with the plain reparameterised gradient or the sticking-the-landing path gradient;
* :func:`forward_kl`: ``-sum_i w_i log q(x_i)`` with self-normalised importance weights of a
  proposal's samples (a teacher model, or ``q`` itself): ``KL(p||q)`` up to a constant;
* :func:`chi2`: ``log mean(w^2)``, ``w = p~(x)^beta / q(x)``, whose minimum maximises the ESS;
* :func:`scores`: the reverse KL, ``-log ESS`` or the coarse mass mismatch (:func:`mass_mismatch`)
  of each model on fresh samples (no gradient).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowkit.toy2d.runners import Single, Stacked
from flowkit.toy2d.targets import Target2D

__all__ = ["chi2", "forward_kl", "log_p", "mass_mismatch", "reverse_kl", "scores"]

Runner = Single | Stacked


def log_p(target: Target2D, x: torch.Tensor) -> torch.Tensor:
    """``log p~(x)`` for ``x`` of shape ``[..., batch, 2]`` (the target takes ``[batch, 2]``)."""
    return target.log_prob(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])


def reverse_kl(runner: Runner, target: Target2D, n: int, beta: float, path: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The annealed reverse-KL loss ``mean(log q(x) - beta log p~(x))`` per model.

    With ``path``, the sticking-the-landing surrogate (Roeder et al., 2017):
    ``grad = (dx/dphi)^T g``, ``g = d/dx [log q(x) - beta log p~(x)]`` with the parameters held
    fixed, so the score term ``E_q[grad_phi log q]`` (zero in expectation, but the main noise
    near the optimum) is dropped. ``grad_x log q`` needs no inverse: ``grad_x log q = J^-T
    grad_z0 log q`` with ``J = dx/dz0`` from ``d`` backward passes (cheap in 2D), so it works for
    non-invertible flows (tanh Planar) too.

    Returns:
        ``(to_backprop, loss)``: backpropagate the sum of the first; the second is the loss value.
    """
    z0 = runner.draw(n)
    if path and not z0.requires_grad:  # a fixed base: z0 is a leaf
        z0.requires_grad_(True)
    x, log_q = runner.push(z0)
    if not path:
        loss = (log_q - beta * log_p(target, x)).mean(-1)
        return loss, loss.detach()
    g_z0 = torch.autograd.grad(log_q.sum(), z0, retain_graph=True)[0]
    rows = [torch.autograd.grad(x[..., i].sum(), z0, retain_graph=True)[0] for i in range(x.shape[-1])]
    jac = torch.stack(rows, -2)  # jac[..., b, i, j] = dx_i / dz0_j
    # solve_ex does not raise: a singular J shows as a non-finite loss
    g_q = torch.linalg.solve_ex(jac.transpose(-1, -2), g_z0.unsqueeze(-1))[0].squeeze(-1)
    x_fixed = x.detach().requires_grad_(True)
    lp = log_p(target, x_fixed)
    g_p = torch.autograd.grad(lp.sum(), x_fixed)[0]
    surrogate = (x * (g_q - beta * g_p)).sum(-1).mean(-1)
    return surrogate, (log_q.detach() - beta * lp.detach()).mean(-1)


def forward_kl(runner: Runner, target: Target2D, n: int, proposal: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance-weighted forward KL: minimise ``-sum_i w_i log q(x_i)``, ``x_i ~ r`` (the
    ``proposal``), ``w = softmax(log p~(x) - log r(x))``: a self-normalised estimate of
    ``KL(p||q) + const``. Mass-covering: the weights say how much of the target lies where, so
    ``q`` takes the target's share of mass in each region (Müller et al., 2019, neural importance
    sampling; with ``r = q``, adaptive importance sampling). Needs ``q`` invertible.

    Returns:
        ``(to_backprop, loss)``; the loss value is the reverse-KL loss ``E_q[log q - log p~]``,
        estimated on the same samples (reweighted from ``r`` to ``q``), so one history spans all
        objectives.
    """
    with torch.no_grad():
        x, log_r = proposal.push(proposal.draw(n))
        lp = log_p(target, x)
        w = torch.softmax(torch.nan_to_num(lp - log_r, nan=-math.inf), -1)
    log_q = runner.log_prob(x)
    with torch.no_grad():
        v = torch.softmax(log_q - log_r, -1)
        loss = (v * (log_q - lp)).sum(-1)
    return -(w * log_q).sum(-1), loss


def chi2(runner: Runner, target: Target2D, n: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The chi^2 polish: minimise ``log mean(w^2)``, ``w = p~(x)^beta / q(x)`` (reparameterised).

    ``E_q[w^2] / E_q[w]^2 = 1 + chi^2(p||q) = 1 / ESS``, so up to ``2 log Z`` this maximises the
    effective sample size (Dieng et al., 2017). The loss value reported stays the reverse-KL loss.

    Returns:
        ``(to_backprop, loss)`` as for :func:`reverse_kl`.
    """
    x, log_q = runner.push(runner.draw(n))
    log_w = beta * log_p(target, x) - log_q
    return torch.logsumexp(2 * log_w, -1) - math.log(n), -log_w.detach().mean(-1)


def mass_mismatch(x: torch.Tensor, log_w: torch.Tensor, box: tuple[float, float, float, float], cells: int = 4):
    """How far the model's mass per region is from the target's: ``sum_j (p_j - q_j)^2 / q_j`` over a
    ``cells x cells`` grid on ``box`` (samples outside go to the border cells).

    ``q_j`` is the share of the model's samples ``x`` in cell ``j``; ``p_j`` the target's mass there,
    estimated from the same samples with self-normalised importance weights ``w`` (accurate even
    for a poor model, as long as it covers the target). A chi^2 between the coarse-grained
    densities: blind to the shape inside a cell, it sees how the mass is split between regions
    (between modes), which reverse KL hardly penalises and no later local step can repair.

    Args:
        x: samples ``[..., n, 2]``.
        log_w: ``log p~(x) - log q(x)``, ``[..., n]``.
        box: ``(x0, x1, y0, y1)``.
        cells: grid cells per axis.

    Returns:
        ``[...]``.
    """
    x0, x1, y0, y1 = box
    ix = ((x[..., 0] - x0) / (x1 - x0) * cells).long().clamp(0, cells - 1)
    iy = ((x[..., 1] - y0) / (y1 - y0) * cells).long().clamp(0, cells - 1)
    cell = ix * cells + iy
    n = x.shape[-2]
    q = torch.zeros(*cell.shape[:-1], cells * cells, dtype=log_w.dtype, device=x.device)
    q = q.scatter_add(-1, cell, torch.full_like(log_w, 1.0 / n))
    p = torch.zeros_like(q).scatter_add(-1, cell, torch.softmax(log_w, -1))
    seen = q > 0
    return torch.where(seen, (p - q) ** 2 / q.clamp_min(1.0 / n), torch.zeros_like(q)).sum(-1)


@torch.no_grad()
def scores(runner: Runner, target: Target2D, n: int, kind: str = "kl") -> np.ndarray:
    """Per model, on ``n`` fresh samples (lower is better), as ``[models]``.

    ``"kl"``: ``mean(log q(x) - log p~(x)) = KL(q||p) - log Z`` (+ noise). ``"ess"``: ``-log ESS``
    with ``ESS = (sum w)^2 / (n sum w^2)``, ``w = p~(x) / q(x)``. ``"mass"``: :func:`mass_mismatch`
    on the target's box. Non-finite scores become ``inf``.
    """
    x, log_q = runner.push(runner.draw(n))
    log_w = (log_p(target, x) - log_q).double()
    if kind == "ess":
        out = torch.logsumexp(2 * log_w, -1) - 2 * torch.logsumexp(log_w, -1) + math.log(n)
    elif kind == "mass":
        out = mass_mismatch(x, log_w, target.box or _sample_box(x))
    else:
        out = (-log_w).mean(-1)
    values = np.atleast_1d(out.cpu().numpy())
    return np.where(np.isfinite(values), values, np.inf)


def _sample_box(x: torch.Tensor) -> tuple[float, float, float, float]:
    """The 1%..99% range of samples ``[..., n, 2]`` (a box for a target that has none)."""
    flat = x.reshape(-1, 2).double()
    lo, hi = torch.quantile(flat, 0.01, dim=0), torch.quantile(flat, 0.99, dim=0)
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
