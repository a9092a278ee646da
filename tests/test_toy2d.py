"""flowkit.toy2d: targets and their log Z, metrics against closed forms, fit, plots, CLI."""

import copy
import math

import normflows as nf
import numpy as np
import pytest
import torch

from flowkit.toy2d import (
    REFINE,
    build_flow,
    evaluate,
    extend_flow,
    fit,
    get_target,
    grid_log_z,
    is_invertible,
    list_targets,
)
from flowkit.toy2d.targets import GaussianTarget, Target2D


def test_registry_names_and_errors():
    names = list_targets()
    for n in (
        "two-modes",
        "two-moons",
        "circular-gmm",
        "ring-mixture",
        "sinusoidal",
        "smiley",
        "eight-gaussians",
        "banana",
        "checkerboard",
    ):
        assert n in names
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        get_target("nope")
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        get_target("two-modes").log_prob(torch.zeros(3, 3))


def test_two_modes_wraps_normflows_density():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(get_target("two-modes").log_prob(x), nf.distributions.TwoModes(2.0, 0.1).log_prob(x))


@pytest.mark.parametrize("name", ["gaussian", "ring-mixture", "banana", "eight-gaussians", "circular-gmm"])
def test_grid_log_z_matches_closed_form(name):
    kwargs = {"cov": ((1.0, 0.6), (0.6, 0.8)), "mean": (0.5, -1.0)} if name == "gaussian" else {}
    t = get_target(name, **kwargs)
    assert t.log_z_is_exact
    numeric, _ = grid_log_z(t.log_prob, t.box, (256, 512) if name == "banana" else (256, 256))
    assert abs(numeric - t.log_z) < 1e-3, (numeric, t.log_z)


def test_numeric_log_z_is_cached_and_finite():
    t = get_target("smiley")
    a = t.log_z
    b = get_target("smiley").log_z  # a new instance of the same density: from the cache
    assert a == b and math.isfinite(a) and not t.log_z_is_exact


class _RejectionGaussian(GaussianTarget):
    def _sample_exact(self, n):
        return None  # force the generic rejection sampler


def test_rejection_sampler_matches_moments():
    torch.manual_seed(0)
    t = _RejectionGaussian(mean=(0.5, -1.0), cov=((1.0, 0.6), (0.6, 0.8)))
    x = t.sample(20000).double()
    torch.testing.assert_close(x.mean(0), torch.tensor([0.5, -1.0], dtype=torch.float64), atol=0.04, rtol=0)
    torch.testing.assert_close(
        torch.cov(x.T), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64), atol=0.05, rtol=0
    )


def _gaussian_model(mu, log_sigma):
    """q = N(mu, diag(sigma^2)) as an invertible normflows model: x = mu + sigma * z."""
    flow = nf.flows.AffineConstFlow((2,))
    with torch.no_grad():
        flow.s.copy_(torch.tensor([log_sigma]))
        flow.t.copy_(torch.tensor([mu]))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), [flow])


def _kl_gauss(m0, s0, m1, s1):
    """KL(N(m0, s0) || N(m1, s1)) in closed form."""
    s1i = torch.linalg.inv(s1)
    d = m1 - m0
    return 0.5 * (torch.trace(s1i @ s0) + d @ s1i @ d - 2 + torch.logdet(s1) - torch.logdet(s0)).item()


def test_metrics_match_closed_form_gaussian_kl():
    torch.manual_seed(0)
    mean, cov = torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    target = GaussianTarget(mean.tolist(), cov.tolist())
    mu, log_sigma = [0.2, -0.7], [0.1, -0.3]
    model = _gaussian_model(mu, log_sigma)
    q_cov = torch.diag(torch.exp(2 * torch.tensor(log_sigma)))
    m = evaluate(model, target, 200_000)
    rkl = _kl_gauss(torch.tensor(mu), q_cov, mean, cov)
    fkl = _kl_gauss(mean, cov, torch.tensor(mu), q_cov)
    assert rkl > 0.3 and fkl > 0.3  # far enough from 0 that a sign or log Z error shows
    assert abs(m.reverse_kl - rkl) < 4 * m.reverse_kl_se + 1e-3, (m.reverse_kl, rkl, m.reverse_kl_se)
    assert abs(m.forward_kl - fkl) < 4 * m.forward_kl_se + 1e-3, (m.forward_kl, fkl)
    assert m.reverse_kl_se < 0.01
    assert 0.0 < m.ess < 0.9
    assert abs(m.log_z_estimate - target.log_z) < 4 * m.log_z_se + 1e-3


def test_metrics_of_a_perfect_model():
    target = GaussianTarget((0.0, 0.0), ((4.0, 0.0), (0.0, 0.25)))
    model = _gaussian_model([0.0, 0.0], [math.log(2.0), math.log(0.5)])
    m = evaluate(model, target, 5000)
    assert abs(m.reverse_kl) < 1e-5 and abs(m.forward_kl) < 1e-5
    assert m.ess == pytest.approx(1.0, abs=1e-6)
    assert m.log_z_estimate == pytest.approx(target.log_z, abs=1e-5)


def test_build_flow_kinds_log_prob_consistent():
    for kind in ("planar", "radial", "affine", "spline", "nflows-spline"):
        torch.manual_seed(0)
        model = build_flow(kind, 2, **({} if kind in ("planar", "radial") else {"hidden": 8}))
        x, log_q = model.sample(16)
        assert x.shape == (16, 2) and log_q.shape == (16,)
        assert is_invertible(model) == (kind not in ("planar", "radial"))
        if is_invertible(model):
            torch.testing.assert_close(model.log_prob(x), log_q, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown flow"):
        build_flow("maf")


def test_fit_improves_kl_and_returns_history():
    torch.manual_seed(0)
    model = build_flow("planar", 4)
    before = evaluate(model, "two-modes", 5000, forward=False).reverse_kl
    calls = []
    result = fit(
        model,
        "two-modes",
        iters=200,
        batch_size=128,
        lr=1e-2,
        anneal_iters=50,
        progress=False,
        sync_every=50,
        snapshot_every=100,
        snapshot_samples=500,
        callback=lambda s, m, losses: calls.append((s, len(losses))),
    )
    after = evaluate(result.model, "two-modes", 5000, forward=False).reverse_kl
    assert result.loss.shape == (200,) and np.isfinite(result.loss).all()
    assert calls == [(s, s) for s in range(50, 201, 50)]
    assert [s for s, _ in result.snapshots] == [100, 200] and result.snapshots[0][1].shape == (500, 2)
    assert after < before - 1.0, (before, after)
    model2, loss2 = fit(build_flow("planar", 2), "two-modes", iters=5, batch_size=8, progress=False)
    assert loss2.shape == (5,)


class _NaNTarget(Target2D):
    def _log_prob(self, x):
        return x[:, 0] * float("nan")


def test_fit_reports_non_finite_loss_and_bad_args():
    with pytest.raises(FloatingPointError, match="non-finite at step 0"):
        fit(build_flow("planar", 2), _NaNTarget(), iters=20, batch_size=8, progress=False, sync_every=10)
    with pytest.raises(ValueError, match="batch_size"):
        fit(build_flow("planar", 2), "two-modes", iters=5, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        fit(build_flow("planar", 2), "two-modes", iters=5, lr=-1.0)
    with pytest.raises(ValueError, match="late_batch_size"):
        fit(build_flow("planar", 2), "two-modes", iters=5, late_batch_size=0)
    with pytest.raises(ValueError, match="gradient"):
        fit(build_flow("planar", 2), "two-modes", iters=5, gradient="score")


def test_fit_total_then_path_gradient_with_late_batch():
    calls = []
    r = fit(
        build_flow("affine", 2, hidden=8),
        "two-modes",
        iters=20,
        batch_size=16,
        path_from=10,
        late_batch_size=64,
        progress=False,
        sync_every=10,
        callback=lambda s, m, losses: calls.append(s),
    )
    assert calls == [10, 20] and np.isfinite(r.loss).all()
    r = fit(build_flow("planar", 2), "two-modes", iters=10, batch_size=16, gradient="total", progress=False)
    assert np.isfinite(r.loss).all()


def _two_models(kind="planar", **kw):
    torch.manual_seed(0)
    return [build_flow(kind, 3, **kw) for _ in range(2)]


@pytest.mark.parametrize("kind", ["planar", "affine", "nflows-spline"])
def test_stacked_restarts_match_separate_models(kind):
    """Restarts run together (vmap, or a loop for what vmap cannot run) = each model on its own."""
    from flowkit.toy2d.fit import _loss, _push, _Single, _Stacked

    models = _two_models(kind, **({} if kind == "planar" else {"hidden": 8}))
    refs = copy.deepcopy(models)
    stacked = _Stacked(models)
    # normflows' couplings add log-dets in place into an unbatched tensor, spline bins use
    # data-dependent indexing: vmap rejects both, so they run as a loop
    assert stacked.vectorized == (kind == "planar")
    z0 = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(1))
    x, log_q = stacked.push(z0)
    assert stacked.draw(5).shape == (2, 5, 2)
    target = get_target("two-modes")
    (log_q - target.log_prob(x.reshape(-1, 2)).reshape(2, 64)).mean(-1).sum().backward()
    for i, (m, ref) in enumerate(zip(models, refs, strict=False)):
        xi, lqi = _push(ref, z0[i])
        torch.testing.assert_close(x[i], xi)
        torch.testing.assert_close(log_q[i], lqi)
        (lqi - target.log_prob(xi)).mean().backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=False):
            g = stacked.params[f"m.{name}"].grad[i] if stacked.vectorized else p.grad
            torch.testing.assert_close(g, q.grad)
        assert sum(q.grad.abs().sum() for q in ref.parameters()) > 0

    # the sticking-the-landing surrogate, on the same draws, restarts together = each alone
    def reparam(q0_loc, q0_log_scale, e):  # DiagGaussian's draw, with fixed noise e
        return q0_loc + q0_log_scale.exp() * e

    if stacked.vectorized:
        stacked.draw = lambda n: reparam(stacked.params["m.q0.loc"], stacked.params["m.q0.log_scale"], z0)
    else:
        stacked.draw = lambda n: torch.stack([reparam(m.q0.loc, m.q0.log_scale, z0[i]) for i, m in enumerate(models)])
    surrogate, _ = _loss(stacked, target, 64, 0.7, path=True)
    g_stacked = torch.autograd.grad(surrogate.sum(), stacked.parameters())
    for i, ref in enumerate(refs):
        single = _Single(ref)
        single.draw = lambda n, i=i, ref=ref: reparam(ref.q0.loc, ref.q0.log_scale, z0[i])
        g_single = torch.autograd.grad(_loss(single, target, 64, 0.7, path=True)[0], list(ref.parameters()))
        mine = (
            [g[i] for g in g_stacked] if stacked.vectorized else g_stacked[i * len(g_single) : (i + 1) * len(g_single)]
        )
        for a, b in zip(mine, g_single, strict=False):
            torch.testing.assert_close(a, b)
    if stacked.vectorized:  # export copies restart i's current parameters into its own module
        with torch.no_grad():
            for v in stacked.params.values():
                v.add_(1.0)
        m1 = stacked.export(1)
        for name, p in m1.named_parameters():
            torch.testing.assert_close(p, stacked.params[f"m.{name}"][1])


def test_fit_with_restarts_keeps_the_best_and_improves():
    torch.manual_seed(0)
    before = evaluate(build_flow("planar", 4), "two-modes", 5000, forward=False).reverse_kl  # ~27
    log_z = get_target("two-modes").log_z
    for select_at in (60, 200):  # after the annealing (then one restart goes on), or at the end
        result = fit(
            lambda: build_flow("planar", 4),
            "two-modes",
            iters=200,
            batch_size=128,
            lr=1e-2,
            anneal_iters=60,
            restarts=4,
            select_at=select_at,
            keep=1,
            keep_best=False,
            progress=False,
            sync_every=50,
            seed=0,
        )
        assert (
            isinstance(result.model, nf.NormalizingFlow)
            and result.loss.shape == (200,)
            and np.isfinite(result.loss).all()
        )
        scores = result.restart_scores
        assert scores.shape == (4,) and result.restart == int(np.argmin(scores))
        assert len(set(np.round(scores, 4))) == 4  # the restarts start from different initialisations
        kl = evaluate(result.model, "two-modes", 5000, forward=False).reverse_kl
        assert kl < before / 5, (before, kl)
    assert abs(scores[result.restart] + log_z - kl) < 0.1  # chosen at the end: the score is KL - log Z
    # two restarts go on together after the selection; keep_best returns the best (restart, step) seen
    result = fit(
        lambda: build_flow("planar", 4),
        "two-modes",
        iters=200,
        batch_size=128,
        lr=1e-2,
        anneal_iters=60,
        restarts=4,
        keep=2,
        keep_best=True,
        progress=False,
        sync_every=50,
        seed=0,
    )
    kept = np.argsort(result.restart_scores)[:2]
    assert result.restart in kept and result.best_step in (100, 150, 200)
    assert np.isfinite(result.loss).all()
    kl2 = evaluate(result.model, "two-modes", 5000, forward=False).reverse_kl
    assert kl2 < before / 5, (before, kl2)


def test_extend_flow_starts_as_the_identity_and_shares_layers():
    from flowkit.toy2d.fit import _push

    torch.manual_seed(0)
    base = build_flow("planar", 3)
    ext = extend_flow(base, "nflows-spline", 2, hidden=8, tail_bound=3.0)
    assert ext.q0 is base.q0 and list(ext.flows)[:3] == list(base.flows) and len(ext.flows) == 4
    base_params = {id(p) for p in base.parameters()}
    assert base_params < {id(p) for p in ext.parameters()}  # training ext trains base's layers too
    z0 = 2.5 * torch.randn(2000, 2)  # inside and outside the spline interval [-3, 3]
    with torch.no_grad():
        (x, log_q), (x_ext, log_q_ext) = _push(base, z0), _push(ext, z0)
    assert torch.allclose(x, x_ext, atol=1e-5) and torch.allclose(log_q, log_q_ext, atol=1e-5)
    coupling = copy.deepcopy(ext.flows[3].transform._transforms[1]).double()  # the nflows coupling itself
    u = 4 * torch.randn(500, 2, dtype=torch.float64)
    out, ld = coupling(u)
    assert torch.allclose(out, u, atol=1e-7) and ld.abs().max() < 1e-7  # exact up to the float32 bias
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in _grads(ext))  # not stuck at the identity
    with pytest.raises(ValueError, match="kind: expected one of nflows-spline"):
        extend_flow(base, "planar", 2)
    with pytest.raises(ValueError, match="layers"):
        extend_flow(base, "nflows-spline", 0)
    with pytest.raises(TypeError, match="model"):
        extend_flow(torch.nn.Linear(2, 2))


def _grads(model):
    model.zero_grad()
    x, log_q = model.sample(256)
    (log_q - get_target("two-modes").log_prob(x)).mean().backward()
    return list(model.parameters())


def test_fit_refine_extends_the_fitted_model_and_improves():
    steps, seen = [], []

    def record(step, model, loss):
        steps.append(step)
        seen.append((len(loss), len(model.flows)))

    common = dict(
        iters=150, batch_size=256, lr=1e-2, anneal_iters=60, restarts=2, keep=1, progress=False, seed=0, sync_every=50
    )
    first = fit(lambda: build_flow("planar", 4), "two-modes", **common)
    kl_first = evaluate(first.model, "two-modes", 20000, forward=False).reverse_kl
    r = fit(
        lambda: build_flow("planar", 4),
        "two-modes",
        refine=dict(iters=150, flow_kwargs=dict(hidden=16), chi2_from=None, late_from=None),
        snapshot_every=50,
        snapshot_samples=100,
        callback=record,
        **common,
    )
    assert r.loss.shape == (300,) and np.isfinite(r.loss).all() and r.refined_from == 150
    np.testing.assert_allclose(r.loss[:150], first.loss)  # the same first stage (same seed)
    assert r.restart == first.restart and 150 < r.best_step <= 300
    assert len(r.model.flows) == 5 and [s for s, _ in r.snapshots] == [50, 100, 150, 200, 250, 300]
    assert steps == [50, 60, 100, 150, 200, 250, 300] and seen == [(s, 4 if s <= 150 else 5) for s in steps]
    kl = evaluate(r.model, "two-modes", 20000, forward=False).reverse_kl
    assert kl < kl_first - 0.05, (kl_first, kl)


def test_fit_refine_args():
    from flowkit.toy2d import refine_spec

    assert refine_spec(True) == REFINE and refine_spec({"layers": 3}) == {**REFINE, "layers": 3}
    assert refine_spec(None) is None and refine_spec(False) is None
    assert REFINE["flow"] == "nflows-spline" and REFINE["chi2_from"] < REFINE["iters"]
    with pytest.raises(ValueError, match=r"refine: unknown keys \['itres'\]"):
        fit(None, "two-modes", iters=5, refine=dict(itres=3))
    with pytest.raises(ValueError, match=r"refine\['flow'\]"):
        fit(None, "two-modes", iters=5, refine=dict(flow="planar"))
    with pytest.raises(TypeError, match="refine"):
        fit(None, "two-modes", iters=5, refine="yes")
    with pytest.raises(ValueError, match=r"refine\['chi2_from'\]: expected None or an int in \[0, refine iters=100\]"):
        fit(None, "two-modes", iters=5, refine=dict(iters=100))  # REFINE's chi2_from 700 > 100


def test_select_skips_a_restart_that_went_non_finite():
    from flowkit.toy2d.fit import _select, _Stacked

    stacked = _Stacked(_two_models())
    opt = torch.optim.Adam(stacked.parameters(), lr=1e-3)
    past = np.zeros((3, 2))
    past[1, 0] = np.nan
    runner, new_opt, kept, scores = _select(stacked, opt, get_target("two-modes"), 256, past, 1)
    assert kept == [1] and scores[0] == np.inf and runner.export() is stacked.models[1]
    assert [p for g in new_opt.param_groups for p in g["params"]] == list(stacked.models[1].parameters())


def test_chi2_polish_covers_mass_where_reverse_kl_seeks_a_mode():
    """One Gaussian fitted to TwoModes: reverse KL sits on one mode; chi^2 (1/ESS) spans both."""
    found = {}
    for chi2_from in (None, 0):
        r = fit(
            _gaussian_model([0.3, 0.1], [0.0, 0.0]),
            "two-modes",
            iters=400,
            batch_size=1024,
            lr=2e-2,
            anneal_iters=0,
            chi2_from=chi2_from,
            gradient="total",
            progress=False,
            seed=0,
        )
        found[chi2_from] = (r.model.flows[0].t[0, 0].item(), r.model.flows[0].s[0, 0].exp().item())
    (mu_kl, sx_kl), (mu_chi, sx_chi) = found[None], found[0]
    assert abs(mu_kl) > 1.5 and sx_kl < 0.5, found  # modes at x = +-2
    assert abs(mu_chi) < 0.5 and sx_chi > 1.5, found
    with pytest.raises(ValueError, match="chi2_from"):
        fit(None, "two-modes", iters=5, chi2_from=6)


def test_selection_scores_are_kl_and_ess():
    from flowkit.toy2d.fit import _scores, _Single

    target = GaussianTarget((0.0, 0.0), ((4.0, 0.0), (0.0, 0.25)))
    exact = _Single(_gaussian_model([0.0, 0.0], [math.log(2.0), math.log(0.5)]))
    assert abs(float(_scores(exact, target, 4096)) + target.log_z) < 1e-5  # KL 0
    assert abs(float(_scores(exact, target, 4096, ess=True))) < 1e-5  # ESS 1
    off = _Single(_gaussian_model([0.5, 0.0], [0.0, 0.0]))
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    off.draw = lambda n: z
    x, log_q = off.push(z)
    w = torch.exp(target.log_prob(x) - log_q)
    assert (
        abs(float(_scores(off, target, 4096, ess=True)) + math.log((w.sum() ** 2 / (4096 * (w**2).sum())).item()))
        < 1e-5
    )
    assert abs(float(_scores(off, target, 4096)) - (log_q - target.log_prob(x)).mean().item()) < 1e-5


def test_fit_restart_args():
    with pytest.raises(ValueError, match="restarts=2 needs model=None or a zero-argument builder"):
        fit(build_flow("planar", 2), "two-modes", iters=5, restarts=2)
    with pytest.raises(ValueError, match="restarts"):
        fit(None, "two-modes", iters=5, restarts=0)
    with pytest.raises(ValueError, match=r"select_at: expected an int in \[0, iters=5\]"):
        fit(None, "two-modes", iters=5, restarts=2, select_at=6)
    with pytest.raises(TypeError, match="model"):
        fit("planar", "two-modes", iters=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda():
    r = fit(build_flow("planar", 4), "two-modes", iters=50, batch_size=128, device="cuda", progress=False)
    assert next(r.model.parameters()).is_cuda and np.isfinite(r.loss).all()


def test_pictures(tmp_path):
    from flowkit.toy2d.plots import model_density_grid, plot_loss, plot_model, plot_snapshots, plot_target

    torch.manual_seed(0)
    box = (-3.0, 3.0, -3.0, 3.0)
    planar = build_flow("planar", 2)
    dens, how = model_density_grid(planar, box, size=40, num_samples=20000)
    assert how == "histogram" and abs(dens.sum() * (6 / 40) ** 2 - 1) < 0.05
    dens, how = model_density_grid(_gaussian_model([0.0, 0.0], [0.0, 0.0]), box, size=40)
    assert how == "exact" and abs(dens.sum() * (6 / 40) ** 2 - 1) < 0.02  # N(0, I) holds ~99.5% in the box
    paths = [
        plot_target("two-modes", tmp_path / "t.png", size=40),
        plot_model(planar, "two-modes", tmp_path / "m.png", size=40),
        plot_loss(np.linspace(3, 0, 200), tmp_path / "l.png", log_z=0.8),
        plot_snapshots(
            [(10, np.random.randn(300, 2)), (20, np.random.randn(300, 2))], "two-modes", tmp_path / "s.png", size=20
        ),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


def test_cli_fit2d(tmp_path, capsys):
    from flowkit.cli import main

    rc = main(
        [
            "fit2d",
            "--target",
            "two-modes",
            "--layers",
            "2",
            "--iters",
            "20",
            "--batch-size",
            "32",
            "--eval-samples",
            "2000",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "KL(q||p)" in out and "two-modes" in out and "best of 8 restarts" in out
    for name in ("target.png", "model.png", "loss.png", "metrics.json"):
        assert (tmp_path / name).exists()
    rc = main(
        ["fit2d", "--preset", "seed", "--layers", "2", "--iters", "20", "--eval-samples", "2000", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "restarts" not in out and "20 steps of 40 samples" in out
    rc = main(
        [
            "fit2d",
            "--preset",
            "strong",
            "--no-refine",
            "--layers",
            "2",
            "--iters",
            "20",
            "--eval-samples",
            "2000",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "best of 8 restarts" in out and "refined" not in out


def test_path_gradient_is_total_gradient_minus_score():
    """Sticking the landing: path gradient = total reparameterised gradient - score term, same samples."""
    from flowkit.toy2d.fit import _loss, _Single

    target = get_target("two-modes")
    torch.manual_seed(0)
    model = build_flow("planar", 3, act="leaky_relu").double()  # invertible, so the score term is computable
    params = list(model.parameters())
    torch.manual_seed(1)
    surrogate, loss_path = _loss(_Single(model), target, 64, 0.5, path=True)
    g_path = torch.autograd.grad(surrogate, params)
    torch.manual_seed(1)
    x, log_q = model.sample(64)
    loss = log_q.mean() - 0.5 * target.log_prob(x).mean()
    g_total = torch.autograd.grad(loss, params)
    g_score = torch.autograd.grad(model.log_prob(x.detach()).mean(), params)
    torch.testing.assert_close(loss_path, loss.detach())
    for gp, gt, gs in zip(g_path, g_total, g_score, strict=False):
        torch.testing.assert_close(gp, gt - gs, rtol=1e-7, atol=1e-9)
    assert max(g.abs().max() for g in g_score) > 1e-3  # the dropped term is not trivially zero


def test_path_gradient_vanishes_at_the_optimum():
    """q = p exactly: every sample's path gradient is 0, the total gradient's is not (Roeder et al., 2017)."""
    from flowkit.toy2d.fit import _loss, _Single

    target = GaussianTarget((0.0, 0.0), ((4.0, 0.0), (0.0, 0.25)))
    model = _gaussian_model([0.0, 0.0], [math.log(2.0), math.log(0.5)])
    surrogate, loss = _loss(_Single(model), target, 256, 1.0, path=True)
    assert abs(loss.item() + target.log_z) < 1e-5  # E_q[log q - log p~] = -log Z
    for g in torch.autograd.grad(surrogate, list(model.parameters())):
        assert g.abs().max() < 1e-5
    x, log_q = model.sample(256)
    g_total = torch.autograd.grad(log_q.mean() - target.log_prob(x).mean(), list(model.parameters()))
    assert max(g.abs().max() for g in g_total) > 1e-2
