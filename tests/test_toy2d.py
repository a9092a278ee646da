"""flowkit.toy2d: targets and their log Z, metrics against closed forms, the staged fit, plots, CLI."""

import copy
import math

import normflows as nf
import numpy as np
import pytest
import torch

from flowkit.errors import NonFiniteLossError
from flowkit.toy2d import (
    PRESETS,
    LogProbTarget,
    Preset,
    Refine,
    Stage,
    as_target,
    build_flow,
    evaluate,
    extend_flow,
    find_box,
    fit,
    format_metrics,
    get_target,
    grid_log_z,
    is_invertible,
    list_targets,
    model_sample,
)
from flowkit.toy2d.targets import GaussianTarget, Target2D

# -- targets -------------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match="unknown target 'nope'.*LogProbTarget"):
        get_target("nope")
    with pytest.raises(ValueError, match="target: unknown target 'nope'.*LogProbTarget"):
        as_target("nope")
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        get_target("two-modes").log_prob(torch.zeros(3, 3))


def test_two_modes_wraps_normflows_density():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(get_target("two-modes").log_prob(x), nf.distributions.TwoModes(2.0, 0.1).log_prob(x))


@pytest.mark.parametrize("name", ["gaussian", "ring-mixture", "banana", "eight-gaussians", "circular-gmm"])
def test_grid_log_z_matches_closed_form(name):
    kwargs = {"cov": ((1.0, 0.6), (0.6, 0.8)), "mean": (0.5, -1.0)} if name == "gaussian" else {}
    t = get_target(name, **kwargs)
    assert t.log_z_is_exact and t.normaliser.error == 0.0
    numeric, _ = grid_log_z(t.log_prob, t.box, (256, 512) if name == "banana" else (256, 256))
    assert abs(numeric - t.log_z) < 1e-3, (numeric, t.log_z)


def test_numeric_log_z_is_cached_and_finite():
    t = get_target("smiley")
    a = t.log_z
    b = get_target("smiley").log_z  # a new instance of the same density: from the cache
    assert a == b and math.isfinite(a) and not t.log_z_is_exact
    assert 0 < t.normaliser.error < 1e-3 and "midpoint rule" in t.normaliser.method


def test_normflows_objects_and_callables_are_targets():
    """The user's own objects: a normflows target, a torch distribution, a plain function."""
    two_modes = as_target(nf.distributions.TwoModes(2, 0.1))
    assert isinstance(two_modes, LogProbTarget) and two_modes.box == get_target("two-modes").box
    assert two_modes.log_z == pytest.approx(get_target("two-modes").log_z, abs=1e-9)
    mvn = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0]), torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
    t = as_target(mvn)  # normalised: log Z = 0, found box, integrated
    assert abs(t.log_z) < 1e-6 and t.normaliser.error < 1e-4, t.normaliser
    x = torch.randn(7, 2)
    torch.testing.assert_close(t.log_prob(x), mvn.log_prob(x))

    def laplace(z):  # log Z = log 4
        return -z.abs().sum(1)

    t = as_target(laplace)
    assert t.name == "laplace" and abs(t.log_z - math.log(4)) <= t.normaliser.error < 0.01, t.normaliser
    assert as_target(laplace).log_z == t.log_z  # the same function: from the cache


def test_find_box_follows_the_mass_far_from_the_origin():
    def far(z):  # N((40, -25), 0.3^2 I), unnormalised: log Z = log(2 pi 0.09)
        return -0.5 * ((z - torch.tensor([40.0, -25.0], dtype=z.dtype)) ** 2).sum(1) / 0.09

    box = find_box(far)
    assert box[0] < 39 < 41 < box[1] and box[2] < -26 < -24 < box[3] and box[1] - box[0] < 20
    t = LogProbTarget(far)
    assert t.log_z == pytest.approx(math.log(2 * math.pi * 0.09), abs=1e-4)
    given = LogProbTarget(far, box=(38.0, 42.0, -27.0, -23.0))
    assert given.box == (38.0, 42.0, -27.0, -23.0) and given.log_z == pytest.approx(t.log_z, abs=1e-4)


def test_a_density_without_a_box_has_no_log_z():
    t = as_target(lambda z: -1.5 * torch.log1p((z**2).sum(1)))  # p ~ r^-3: no box within |x| <= 1000
    assert t.box is None and t.log_z is None and "no box" in t.normaliser.method and not t.can_sample
    m = evaluate(build_flow("planar", 2), t, 2000)
    assert m.reverse_kl is None and m.log_z is None and m.forward_kl is None and math.isfinite(m.reverse_kl_relative)
    assert "relative" in format_metrics({"heavy": m}) and "- log Z" in format_metrics({"heavy": m})


def test_bad_targets_are_refused_with_the_wrapper_named():
    with pytest.raises(TypeError, match="target: expected a registered name.*callable.*LogProbTarget"):
        as_target(3)
    with pytest.raises(
        ValueError, match=r"returned \(3, 1\) for z of shape \[3, 2\]; expected a tensor of shape \[3\]"
    ):
        as_target(lambda z: z[:, :1])
    with pytest.raises(ValueError, match="box: expected"):
        LogProbTarget(lambda z: -(z**2).sum(1), box=(1.0, 0.0, 0.0, 1.0))


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


# -- metrics -------------------------------------------------------------------------------


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
    assert m.reverse_kl_relative == pytest.approx(m.reverse_kl - target.log_z)
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


def test_metrics_with_a_callable_target_match_the_closed_form():
    """The same Gaussian KL through a plain function whose log Z flowkit integrates itself."""
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_p(z):
        d = z.double() - torch.tensor([0.5, -1.0], dtype=torch.float64)
        return (-0.5 * (d @ prec * d).sum(1)).to(z.dtype) + 3.0  # any constant: log Z absorbs it

    model = _gaussian_model([0.2, -0.7], [0.1, -0.3])
    q_cov = torch.diag(torch.exp(2 * torch.tensor([0.1, -0.3])))
    rkl = _kl_gauss(torch.tensor([0.2, -0.7]), q_cov, torch.tensor([0.5, -1.0]), cov.float())
    m = evaluate(model, log_p, 100_000, forward=False)
    assert m.log_z == pytest.approx(3.0 + math.log(2 * math.pi) + 0.5 * math.log(float(torch.det(cov))), abs=1e-4)
    assert abs(m.reverse_kl - rkl) < 4 * m.reverse_kl_se + 1e-3, (m.reverse_kl, rkl)


def test_build_flow_kinds_log_prob_consistent():
    for kind in ("planar", "radial", "affine", "spline", "nflows-spline"):
        torch.manual_seed(0)
        model = build_flow(kind, 2, **({} if kind in ("planar", "radial") else {"hidden": 8}))
        x, log_q = model_sample(model, 16)
        assert x.shape == (16, 2) and log_q.shape == (16,)
        assert is_invertible(model) == (kind not in ("planar", "radial"))
        if is_invertible(model):
            torch.testing.assert_close(model.log_prob(x), log_q, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown flow"):
        build_flow("maf")


# -- presets -------------------------------------------------------------------------------


def test_presets_are_typed_records_with_checked_overrides():
    fast = PRESETS["fast"]
    assert isinstance(fast, Preset) and fast.refine.method == "distill" and isinstance(PRESETS["strong"].refine, Refine)
    assert PRESETS["seed-loop"].refine is None and fast.with_overrides(refine=False).refine is None
    p = fast.with_overrides(iters=300, lr=5e-3, restarts=4, keep=1, refine=True)
    assert (p.stage.iters, p.stage.lr, p.restarts.count, p.restarts.keep) == (300, 5e-3, 4, 1)
    assert p.refine == Refine() and fast.stage.iters == 1500  # the preset itself is unchanged (frozen)
    assert p.select_at == 300 and fast.select_at == 600 and p.total_iters == 300 + Refine().stage.iters
    half = Refine().scaled(400).stage
    assert (half.iters, half.forward_iters, half.teacher_iters) == (400, 400, 150)
    with pytest.raises(TypeError, match="fit: unknown option 'itres'"):
        fast.with_overrides(itres=3)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        fast.with_overrides(batch_size=0)
    with pytest.raises(TypeError, match="iters: expected an int, got bool"):
        fast.with_overrides(iters=True)
    with pytest.raises(ValueError, match=r"chi2_from: expected an int in \[0, 100\], got 700"):
        Stage(iters=100, batch_size=8, lr=1e-3, chi2_from=700)
    with pytest.raises(ValueError, match=r"select_at: expected an int in \[0, 5\]"):
        fast.with_overrides(iters=5, select_at=6)
    with pytest.raises(ValueError, match="refine.flow"):
        Refine(flow="planar")
    with pytest.raises(ValueError, match=r"chi2_from: expected an int in \[50, 100\], got 10"):
        Stage(iters=100, batch_size=8, lr=1e-3, forward_iters=50, chi2_from=10)
    with pytest.raises(ValueError, match="teacher_iters: expected 0 in the first stage"):
        fast.with_overrides(forward_iters=10, teacher_iters=5)
    with pytest.raises(ValueError, match="forward_iters: expected 0 with method='extend'"):
        Refine(method="extend", stage=Stage(iters=10, batch_size=8, lr=1e-3, forward_iters=5))
    with pytest.raises(TypeError, match="refine: expected True, False, None or a Refine"):
        fast.with_overrides(refine="yes")


# -- fit -----------------------------------------------------------------------------------


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
    assert result.model is model and result.loss.shape == (200,) and np.isfinite(result.loss).all()
    assert calls == [(s, s) for s in range(50, 201, 50)] and result.anneal_end == 50
    assert [s for s, _ in result.snapshots] == [100, 200] and result.snapshots[0][1].shape == (500, 2)
    assert after < before - 1.0, (before, after)
    model2, loss2 = fit(build_flow("planar", 2), "two-modes", iters=5, batch_size=8, progress=False)
    assert loss2.shape == (5,)


def _seed_model(layers=4):
    """The seed's model, written as the seed writes it: its target is its own p."""
    return nf.NormalizingFlow(
        q0=nf.distributions.DiagGaussian(2),
        flows=[nf.flows.Planar((2,)) for _ in range(layers)],
        p=nf.distributions.TwoModes(2, 0.1),
    )


def test_fit_takes_the_normflows_model_with_its_own_target():
    torch.manual_seed(0)
    nfm = _seed_model()
    before = evaluate(nfm, num_samples=5000, forward=False).reverse_kl  # evaluate also uses nfm.p
    result = fit(nfm, iters=200, batch_size=128, anneal_iters=50, progress=False, seed=0)
    after = evaluate(nfm, num_samples=5000, forward=False).reverse_kl
    assert result.model is nfm and after < before - 1.0, (before, after)
    with pytest.raises(ValueError, match="target: none given and the model has no p"):
        fit(build_flow("planar", 2), iters=5, progress=False)
    # the two calls: the normflows target object itself, with the model or without one
    for model in (_seed_model(2), None):
        r = fit(
            model, nf.distributions.TwoModes(2, 0.1), iters=20, batch_size=32, layers=2, refine=False, progress=False
        )
        assert np.isfinite(r.loss).all()


def test_fit_takes_a_plain_function_as_target():
    """A user's log-density function and a model built by hand: q reaches p (KL ~ 0)."""

    def log_p(z):  # N((1, -0.5), diag(0.25, 4)), unnormalised
        return -0.5 * (((z[:, 0] - 1.0) / 0.5) ** 2 + ((z[:, 1] + 0.5) / 2.0) ** 2)

    model = _gaussian_model([0.0, 0.0], [0.0, 0.0])
    fit(model, log_p, iters=300, batch_size=256, lr=2e-2, anneal_iters=0, progress=False, seed=0)
    flow = model.flows[0]
    torch.testing.assert_close(flow.t.detach().reshape(-1), torch.tensor([1.0, -0.5]), atol=0.05, rtol=0)
    torch.testing.assert_close(flow.s.detach().exp().reshape(-1), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)
    assert evaluate(model, log_p, 20000).reverse_kl < 0.005


def test_fit_runs_on_its_own_random_stream():
    """seed -> the same fit; the caller's global random state is left as it was."""
    kw = dict(iters=30, batch_size=32, anneal_iters=10, restarts=3, layers=2, progress=False, refine=False)
    state = torch.get_rng_state()
    a = fit(None, "two-modes", seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = fit(None, "two-modes", seed=torch.Generator().manual_seed(5), **kw)
    c = fit(None, "two-modes", seed=torch.Generator().manual_seed(5), **kw)
    d = fit(None, "two-modes", seed=6, **kw)
    np.testing.assert_array_equal(b.loss, c.loss)
    assert not np.array_equal(a.loss, d.loss) and not np.array_equal(b.loss, d.loss)
    torch.manual_seed(1)
    e = fit(None, "two-modes", **kw)  # seed=None: drawn from the global generator
    torch.manual_seed(1)
    np.testing.assert_array_equal(e.loss, fit(None, "two-modes", **kw).loss)


class _NaNTarget(Target2D):
    def _log_prob(self, x):
        return x[:, 0] * float("nan")


def test_fit_reports_non_finite_loss_and_bad_args():
    with pytest.raises(NonFiniteLossError, match="non-finite at step 0"):
        fit(build_flow("planar", 2), _NaNTarget(), iters=20, batch_size=8, progress=False, sync_every=10)
    with pytest.raises(ValueError, match="batch_size"):
        fit(build_flow("planar", 2), "two-modes", iters=5, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        fit(build_flow("planar", 2), "two-modes", iters=5, lr=-1.0)
    with pytest.raises(ValueError, match="gradient"):
        fit(build_flow("planar", 2), "two-modes", iters=5, gradient="score")
    with pytest.raises(TypeError, match="model"):
        fit("planar", "two-modes", iters=5)
    with pytest.raises(ValueError, match="preset: expected one of fast, seed-loop, strong"):
        fit(None, "two-modes", "fastest")
    with pytest.raises(ValueError, match="progress"):
        fit(None, "two-modes", iters=5, progress="bars")


def test_fit_total_gradient_and_chi2_batch():
    r = fit(build_flow("planar", 2), "two-modes", iters=10, batch_size=16, gradient="total", progress=False)
    assert np.isfinite(r.loss).all()
    r = fit(build_flow("affine", 2, hidden=8), "two-modes", iters=20, batch_size=16, chi2_from=10, chi2_batch_size=64)
    assert np.isfinite(r.loss).all() and r.loss.shape == (20,)


def _two_models(kind="planar", **kw):
    torch.manual_seed(0)
    return [build_flow(kind, 3, **kw) for _ in range(2)]


@pytest.mark.parametrize("kind", ["planar", "affine", "nflows-spline"])
def test_stacked_restarts_match_separate_models(kind):
    """Restarts run together (vmap, or a loop for what vmap cannot run) = each model on its own."""
    from flowkit.toy2d.flows import push_forward as _push
    from flowkit.toy2d.objectives import reverse_kl as _loss
    from flowkit.toy2d.runners import Single as _Single
    from flowkit.toy2d.runners import Stacked as _Stacked

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
    common = dict(
        iters=200,
        batch_size=128,
        lr=1e-2,
        anneal_iters=60,
        restarts=4,
        progress=False,
        sync_every=50,
        seed=0,
        refine=False,
    )
    for select_at in (60, 200):  # after the annealing (then one restart goes on), or at the end
        result = fit(
            lambda: build_flow("planar", 4), "two-modes", select_at=select_at, keep=1, keep_best=False, **common
        )
        assert isinstance(result.model, nf.NormalizingFlow) and result.loss.shape == (200,)
        assert np.isfinite(result.loss).all()
        scores = result.restart_scores
        assert scores.shape == (4,) and result.restart == int(np.argmin(scores))
        assert len(set(np.round(scores, 4))) == 4  # the restarts start from different initialisations
        kl = evaluate(result.model, "two-modes", 5000, forward=False).reverse_kl
        assert kl < before / 5, (before, kl)
    assert abs(scores[result.restart] + log_z - kl) < 0.1  # chosen at the end: the score is KL - log Z
    # two restarts go on together after the selection; keep_best returns the best (restart, step) seen
    result = fit(lambda: build_flow("planar", 4), "two-modes", keep=2, keep_best=True, **common)
    kept = np.argsort(result.restart_scores)[:2]
    assert result.restart in kept and result.best_step in (100, 150, 200)
    assert np.isfinite(result.loss).all()
    kl2 = evaluate(result.model, "two-modes", 5000, forward=False).reverse_kl
    assert kl2 < before / 5, (before, kl2)


def test_restarts_of_a_given_model_end_in_that_model():
    """restarts=3 with the user's instance: perturbed copies on their own streams; the instance holds the winner."""
    torch.manual_seed(0)
    nfm = _seed_model(4)
    start = copy.deepcopy(nfm)
    r = fit(
        nfm, iters=300, batch_size=256, anneal_iters=100, restarts=3, keep=1, select_at=300, keep_best=False,
        progress=False, seed=1, sync_every=50,
    )  # fmt: skip
    assert r.model is nfm and r.restart_scores.shape == (3,) and len(set(np.round(r.restart_scores, 3))) == 3
    m = evaluate(nfm, num_samples=50000, forward=False)
    best = r.restart_scores.min() + get_target("two-modes").log_z
    assert abs(m.reverse_kl - best) < 0.05 + 6 * m.reverse_kl_se, (m.reverse_kl, r.restart_scores)
    assert not torch.equal(nfm.flows[0].u, start.flows[0].u)  # trained in place


def test_extend_flow_starts_as_the_identity_and_shares_layers():
    from flowkit.toy2d.flows import push_forward

    torch.manual_seed(0)
    base = build_flow("planar", 3)
    base.p = nf.distributions.TwoModes(2, 0.1)
    ext = extend_flow(base, "nflows-spline", 2, hidden=8, tail_bound=3.0)
    assert ext.q0 is base.q0 and list(ext.flows)[:3] == list(base.flows) and len(ext.flows) == 4 and ext.p is base.p
    base_params = {id(p) for p in base.parameters()}
    assert base_params < {id(p) for p in ext.parameters()}  # training ext trains base's layers too
    z0 = 2.5 * torch.randn(2000, 2)  # inside and outside the spline interval [-3, 3]
    with torch.no_grad():
        (x, log_q), (x_ext, log_q_ext) = push_forward(base, z0), push_forward(ext, z0)
    assert torch.allclose(x, x_ext, atol=1e-5) and torch.allclose(log_q, log_q_ext, atol=1e-5)
    coupling = copy.deepcopy(ext.flows[3].transform._transforms[1]).double()  # the nflows coupling itself
    u = 4 * torch.randn(500, 2, dtype=torch.float64)
    out, ld = coupling(u)
    assert torch.allclose(out, u, atol=1e-7) and ld.abs().max() < 1e-7  # exact up to the float32 bias
    ext.zero_grad()
    x, log_q = model_sample(ext, 256)
    (log_q - get_target("two-modes").log_prob(x)).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ext.flows[3].parameters())  # not stuck
    with pytest.raises(ValueError, match="kind: expected one of nflows-spline"):
        extend_flow(base, "planar", 2)
    with pytest.raises(ValueError, match="layers"):
        extend_flow(base, "nflows-spline", 0)
    with pytest.raises(TypeError, match="model"):
        extend_flow(torch.nn.Linear(2, 2))


def test_fit_refine_extend_appends_to_the_fitted_model_and_improves():
    steps, seen, kl_at = [], [], {}

    def record(step, model, loss):
        steps.append(step)
        seen.append((len(loss), len(model.flows)))
        if step == 150:  # the end of the first stage
            kl_at[step] = evaluate(model, "two-modes", 20000, forward=False).reverse_kl

    refine = Refine(method="extend", hidden=8, candidates=2, stage=Stage(iters=100, batch_size=256, lr=2e-3))
    r = fit(
        lambda: build_flow("planar", 4),
        "two-modes",
        iters=150,
        batch_size=256,
        lr=1e-2,
        anneal_iters=60,
        restarts=2,
        keep=2,
        select_samples=2048,
        refine=refine,
        snapshot_every=50,
        snapshot_samples=100,
        callback=record,
        progress=False,
        seed=0,
        sync_every=50,
    )
    assert r.loss.shape == (250,) and np.isfinite(r.loss).all() and r.refine_start == 150
    assert r.preset.refine == refine and 150 < r.best_step <= 250
    assert len(r.model.flows) == 5 and [s for s, _ in r.snapshots] == [50, 100, 150, 200, 250]
    assert steps == [50, 60, 100, 150, 200, 250] and seen == [(s, 4 if s <= 150 else 5) for s in steps]
    kl = evaluate(r.model, "two-modes", 20000, forward=False).reverse_kl
    assert kl < kl_at[150] - 0.05, (kl_at, kl)


def _lopsided_teacher():
    """A user's model of TwoModes with 75% of its mass on the left mode (a crude Gaussian mixture)."""
    base = nf.distributions.GaussianMixture(
        2, 2, loc=[[-2.0, 0.0], [2.0, 0.0]], scale=[[0.3, 0.6]] * 2, weights=[3.0, 1.0]
    )
    return nf.NormalizingFlow(q0=base.float(), flows=[nf.flows.AffineConstFlow((2,))])


def _left_share(model):
    x, _ = model_sample(model, 20000)
    return (x[:, 0] < 0).double().mean().item()


def test_distill_takes_the_targets_mass_split_from_a_lopsided_teacher():
    """Reverse KL cannot move mass between the modes; the distilled model gets the target's 50/50."""
    torch.manual_seed(0)
    teacher = _lopsided_teacher()
    assert abs(_left_share(teacher) - 0.75) < 0.02
    refine = Refine(
        hidden=16, components=4, stage=Stage(iters=300, batch_size=256, lr=2e-3, forward_iters=300, teacher_iters=150)
    )
    r = fit(
        lambda: copy.deepcopy(teacher), "two-modes", restarts=1, iters=1, lr=1e-9, refine=refine, seed=0, progress=False
    )
    assert isinstance(r.model.q0, nf.distributions.GaussianMixture) and r.refine_start == 1 and r.loss.shape == (301,)
    assert abs(_left_share(r.model) - 0.5) < 0.03
    before, after = (evaluate(m, "two-modes", 20000, forward=False) for m in (teacher, r.model))
    assert after.reverse_kl < 0.1 < before.reverse_kl and after.ess > 0.9 > before.ess, (before, after)


def test_gaussian_mixture_base_puts_the_weighted_mass_in_each_cluster():
    from flowkit.toy2d.flows import gaussian_mixture_base

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(3000, 2, generator=g) * 0.2 + torch.tensor([-3.0, 0.0]),
            torch.randn(1000, 2, generator=g) * 0.5 + 3,
        ]
    )
    w = torch.cat([torch.full((3000,), 1.0), torch.full((1000,), 9.0)])  # the right cluster holds 75% of the weight
    base = gaussian_mixture_base(x, w, components=2)
    order = base.loc[0, :, 0].argsort()
    torch.testing.assert_close(base.loc[0, order], torch.tensor([[-3.0, 0.0], [3.0, 3.0]]), atol=0.05, rtol=0)
    torch.testing.assert_close(
        base.log_scale[0, order].exp(), torch.tensor([[0.2, 0.2], [0.5, 0.5]]), atol=0.03, rtol=0
    )
    torch.testing.assert_close(
        torch.softmax(base.weight_scores[0, order], 0), torch.tensor([0.25, 0.75]), atol=1e-6, rtol=0
    )
    assert base.loc.dtype == torch.float32


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
            restarts=1,
            progress=False,
            seed=0,
        )
        found[chi2_from] = (r.model.flows[0].t[0, 0].item(), r.model.flows[0].s[0, 0].exp().item())
    (mu_kl, sx_kl), (mu_chi, sx_chi) = found[None], found[0]
    assert abs(mu_kl) > 1.5 and sx_kl < 0.5, found  # modes at x = +-2
    assert abs(mu_chi) < 0.5 and sx_chi > 1.5, found
    with pytest.raises(ValueError, match="chi2_from"):
        fit(None, "two-modes", iters=5, chi2_from=6)


def test_a_given_model_runs_at_the_presets_given_lr_unless_lr_is_given():
    def lr_of(model, preset="fast", **kw):
        r = fit(model, "two-modes", preset, iters=4, batch_size=8, restarts=2, progress=False, **kw)
        return r.preset.stage.lr, r.preset.refine

    assert PRESETS["fast"].given_lr == 2e-2 and PRESETS["fast"].stage.lr == 1e-2
    assert lr_of(build_flow("planar", 2)) == (2e-2, None)  # no refine stage: the first stage is the fit
    assert lr_of(build_flow("planar", 2), lr=5e-3)[0] == 5e-3
    assert lr_of(build_flow("planar", 2), given_lr=3e-2)[0] == 3e-2
    assert lr_of(build_flow("planar", 2), "seed-loop")[0] == 1e-3  # the seed's loop keeps the seed's rate
    assert lr_of(lambda: build_flow("planar", 2), refine=False)[0] == 1e-2  # a builder: the stage's rate
    with pytest.raises(ValueError, match="given_lr"):
        PRESETS["fast"].with_overrides(given_lr=0.0)


def test_the_current_model_is_the_best_scored_restart_never_a_dead_one():
    from flowkit.toy2d.fit import _current_slot

    losses = np.array([[0.1, 0.5, -1.0], [0.1, 0.5, -1.0]])  # [steps, restarts]: restart 2 lowest but dead
    alive = np.array([True, True, False])
    assert _current_slot(losses, alive, None) == 0  # unscored chunk: lowest batch loss among the live
    assert _current_slot(losses, alive, np.array([0.3, 0.2, 0.0])) == 1  # scored: the exact score decides


def test_selection_scores_are_kl_and_ess():
    from flowkit.toy2d.objectives import scores
    from flowkit.toy2d.runners import Single

    target = GaussianTarget((0.0, 0.0), ((4.0, 0.0), (0.0, 0.25)))
    exact = Single(_gaussian_model([0.0, 0.0], [math.log(2.0), math.log(0.5)]))
    assert abs(float(scores(exact, target, 4096)[0]) + target.log_z) < 1e-5  # KL 0
    assert abs(float(scores(exact, target, 4096, "ess")[0])) < 1e-5  # ESS 1
    off = Single(_gaussian_model([0.5, 0.0], [0.0, 0.0]))
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    off.draw = lambda n: z
    x, log_q = off.push(z)
    w = torch.exp(target.log_prob(x) - log_q)
    ess = (w.sum() ** 2 / (4096 * (w**2).sum())).item()
    assert abs(float(scores(off, target, 4096, "ess")[0]) + math.log(ess)) < 1e-5
    assert abs(float(scores(off, target, 4096)[0]) - (log_q - target.log_prob(x)).mean().item()) < 1e-5


def test_reselect_skips_nothing_and_keeps_adam_states():
    from flowkit.toy2d.runners import Stacked, reselect

    stacked = Stacked(_two_models())
    opt = torch.optim.Adam(stacked.parameters(), lr=1e-3)
    x, log_q = stacked.push(stacked.draw(16))
    (log_q - get_target("two-modes").log_prob(x.reshape(-1, 2)).reshape(2, 16)).mean(-1).sum().backward()
    opt.step()
    runner, new_opt = reselect(stacked, opt, [1])
    assert runner.export() is stacked.models[1]
    assert [p for g in new_opt.param_groups for p in g["params"]] == list(stacked.models[1].parameters())
    name = "q0.loc"
    torch.testing.assert_close(
        new_opt.state[stacked.models[1].q0.loc]["exp_avg"], opt.state[stacked.params[f"m.{name}"]]["exp_avg"][1]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_fit_on_cuda():
    r = fit(build_flow("planar", 4), "two-modes", iters=50, batch_size=128, device="cuda", progress=False)
    assert next(r.model.parameters()).is_cuda and np.isfinite(r.loss).all()


# -- pictures and CLI ----------------------------------------------------------------------


def _png_size(path):
    from matplotlib.image import imread

    return imread(str(path)).shape


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
        plot_loss(np.linspace(3, 0, 200), tmp_path / "l.png", log_z=0.8, anneal_end=50, refine_start=150),
        plot_snapshots(
            [(10, np.random.randn(300, 2)), (20, np.random.randn(300, 2))], "two-modes", tmp_path / "s.png", size=20
        ),
        plot_target(nf.distributions.TwoModes(2, 0.1), tmp_path / "t2.png", size=40),  # a normflows object
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.glob(".*")) == []  # written atomically: no temporary files left


def test_density_panels_share_one_colour_scale():
    """Target and model on one scale, with axes in data units and one colour bar."""
    from matplotlib.figure import Figure

    from flowkit.toy2d.plots import _density_panels

    fig = Figure()
    low, high = np.full((4, 4), 0.5), np.full((4, 4), 2.0)
    _density_panels(fig, [(low, "target"), (high, "model")], (-3.0, 3.0, -2.0, 2.0), "density")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.axes) == 3  # two images and their colour bar
    assert all(ax.images[0].get_clim() == (0.0, 2.0) for ax in panels)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    assert panels[0].images[0].get_extent() == [-3.0, 3.0, -2.0, 2.0]


def test_snapshot_writer_writes_as_the_fit_goes(tmp_path):
    from flowkit.toy2d.plots import SnapshotWriter

    writer = SnapshotWriter("two-modes", tmp_path, every=50, samples=200)
    seen = []

    def both(step, model, loss):
        writer(step, model, loss)
        seen.append((step, (tmp_path / "snapshots.png").exists()))

    fit(build_flow("planar", 2), "two-modes", iters=100, batch_size=32, progress=False, sync_every=25, callback=both)
    assert [s for s, _ in writer.snapshots] == [50, 100]
    assert seen == [(25, False), (50, True), (75, True), (100, True)]


def test_cli_fit2d(tmp_path, capsys):
    from flowkit.cli import main

    args = ["fit2d", "--layers", "2", "--iters", "20", "--batch-size", "32", "--eval-samples", "2000", "--no-progress"]
    rc = main(
        [*args, "--target", "two-modes", "--snapshot-every", "10", "--refine-iters", "20", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "KL(q||p)" in out and "two-modes" in out and "best of 8 restarts" in out
    assert "then distilled into 8 Gaussians + nflows-spline x2 in 20 steps" in out
    for name in ("target.png", "model.png", "loss.png", "snapshots.png", "metrics.json"):
        assert (tmp_path / name).exists()
    import json

    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["preset"]["stage"]["iters"] == 20 and math.isfinite(record["reverse_kl"])
    rc = main(
        ["fit2d", "--preset", "seed-loop", "--layers", "2", "--iters", "20", "--eval-samples", "2000", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "restarts" not in out and "20 steps of 40 samples" in out
    rc = main(["fit2d", "--preset", "strong", "--no-refine", *args[1:]])
    out = capsys.readouterr().out
    assert rc == 0 and "best of 8 restarts" in out and "distilled" not in out


def test_cli_fit2d_checks_out_first_and_reports_user_errors(tmp_path, capsys):
    from flowkit.cli import main

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for argv, msg in (
        (["--out", str(a_file)], "--out: .* is a file"),
        (["--out", "/proc/flowkit-cannot-be-here"], "--out: cannot write to /proc/flowkit-cannot-be-here"),
        (["--iters", "0"], "iters: expected an int >= 1, got 0"),
        (["--lr", "-1"], "lr: expected a finite number > 0"),
        (["--threads", "-2"], "--threads: expected an int >= 0"),
        (["--no-refine", "--refine-iters", "5"], "--refine-iters: the run has no refine stage"),
    ):
        rc = main(["fit2d", "--layers", "2", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, (argv, err)
        assert __import__("re").search(msg, err), (msg, err)
    assert a_file.read_text() == "x"


def test_preset_seed_is_a_deprecated_alias_of_seed_loop(capsys):
    import warnings

    from flowkit.cli import main

    small = {"layers": 2, "iters": 20, "progress": False, "seed": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn
        new = fit(None, "two-modes", "seed-loop", **small)
    with pytest.warns(DeprecationWarning, match="preset 'seed' is deprecated.*use 'seed-loop'") as caught:
        old = fit(None, "two-modes", "seed", **small)
    assert caught[0].filename == __file__  # attributed to the caller of fit
    assert old.preset == new.preset and np.allclose(old.loss, new.loss)
    with pytest.warns(DeprecationWarning, match="preset 'seed' is deprecated") as caught:
        assert PRESETS["seed"] is PRESETS["seed-loop"] and "seed" not in sorted(PRESETS)
    assert caught[0].filename == __file__
    with pytest.raises(KeyError):
        PRESETS["seeds"]
    argv = ["fit2d", "--layers", "2", "--iters", "20", "--eval-samples", "2000", "--no-progress"]
    rc = main([*argv, "--preset", "seed"])
    captured = capsys.readouterr()
    assert rc == 0 and "20 steps of 40 samples" in captured.out
    assert captured.err.splitlines() == [
        "note: --preset seed is deprecated (next release: removed); use --preset seed-loop"
    ]
    assert main([*argv, "--preset", "seed-loop"]) == 0 and capsys.readouterr().err == ""


def test_check_writable_folder_probes_through_the_atomic_writer(tmp_path, monkeypatch):
    import flowkit.io
    from flowkit.io import check_writable_folder

    folder = tmp_path / "runs" / "a"
    assert check_writable_folder(folder) == folder and folder.is_dir() and list(folder.iterdir()) == []
    (folder / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_writable_folder(folder / "f")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flowkit.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        check_writable_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["f"]  # no probe left behind


def test_cli_fit2d_progress_lines_do_not_flood_a_log(capsys):
    from flowkit.cli import main

    argv = ["fit2d", "--layers", "2", "--iters", "200", "--batch-size", "16", "--eval-samples", "1000", "--no-refine"]
    rc = main([*argv, "--threads", "1"])
    out = capsys.readouterr().out  # captured: not a terminal, so lines, not a bar
    lines = [line for line in out.splitlines() if line.startswith("fit2d: step")]
    assert rc == 0 and 2 <= len(lines) <= 11 and lines[-1].startswith("fit2d: step 200/200")
    assert torch.get_num_threads() == 1


def test_path_gradient_is_total_gradient_minus_score():
    """Sticking the landing: path gradient = total reparameterised gradient - score term, same samples."""
    from flowkit.toy2d.objectives import reverse_kl
    from flowkit.toy2d.runners import Single

    target = get_target("two-modes")
    torch.manual_seed(0)
    model = build_flow("planar", 3, act="leaky_relu").double()  # invertible, so the score term is computable
    params = list(model.parameters())
    torch.manual_seed(1)
    surrogate, loss_path = reverse_kl(Single(model), target, 64, 0.5, path=True)
    g_path = torch.autograd.grad(surrogate, params)
    torch.manual_seed(1)
    x, log_q = model.sample(64)
    loss = log_q.mean() - 0.5 * target.log_prob(x).mean()
    g_total = torch.autograd.grad(loss, params)
    g_score = torch.autograd.grad(model.log_prob(x.detach()).mean(), params)
    torch.testing.assert_close(loss_path, loss.detach())
    for gp, gt, gs in zip(g_path, g_total, g_score, strict=True):
        torch.testing.assert_close(gp, gt - gs, rtol=1e-7, atol=1e-9)
    assert max(g.abs().max() for g in g_score) > 1e-3  # the dropped term is not trivially zero


def test_path_gradient_vanishes_at_the_optimum():
    """q = p exactly: every sample's path gradient is 0, the total gradient's is not (Roeder et al., 2017)."""
    from flowkit.toy2d.objectives import reverse_kl
    from flowkit.toy2d.runners import Single

    target = GaussianTarget((0.0, 0.0), ((4.0, 0.0), (0.0, 0.25)))
    model = _gaussian_model([0.0, 0.0], [math.log(2.0), math.log(0.5)])
    surrogate, loss = reverse_kl(Single(model), target, 256, 1.0, path=True)
    assert abs(loss.item() + target.log_z) < 1e-5  # E_q[log q - log p~] = -log Z
    for g in torch.autograd.grad(surrogate, list(model.parameters())):
        assert g.abs().max() < 1e-5
    x, log_q = model.sample(256)
    g_total = torch.autograd.grad(log_q.mean() - target.log_prob(x).mean(), list(model.parameters()))
    assert max(g.abs().max() for g in g_total) > 1e-2
