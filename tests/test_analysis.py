"""flowkit.analysis and `flowkit analyze`: numbers behind each picture, and the PNGs' sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowkit import analysis
from flowkit.models import glow

SHAPE, LEVELS = (1, 8, 8), 17


def _png_shape(path):
    from matplotlib.image import imread

    return imread(str(path)).shape


def _images(n=8, seed=0):
    return torch.randint(0, LEVELS, (n, *SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def multiscale():
    torch.manual_seed(0)
    model = glow(SHAPE, num_scales=2, steps_per_scale=1, hidden_channels=8, num_layers=1, num_levels=LEVELS)
    model.initialize(_images(16))
    return model.eval()


@pytest.fixture(scope="module")
def single_level():
    torch.manual_seed(0)  # one level: nothing is split off early; uniform dequantization
    return glow(
        SHAPE,
        num_scales=1,
        steps_per_scale=1,
        hidden_channels=8,
        num_layers=1,
        num_levels=LEVELS,
        dequantization="uniform",
    ).eval()


def _mass_per_level(num_levels, prior):
    z, p, level = analysis.dequantization_density(num_levels, prior, z_range=(-25.0, 25.0), num_points=50001)
    cell = np.diff(z)[0]
    return np.array([p[level == k].sum() * cell for k in range(num_levels)])


def test_dequantization_density_gives_each_level_its_prior_mass():
    uniform = _mass_per_level(8, None)
    np.testing.assert_allclose(uniform, np.full(8, 1 / 8), atol=2e-3)
    prior = np.array([0.075, 0.2, 0.4, 0.2, 0.075, 0.025, 0.0125, 0.0125])
    np.testing.assert_allclose(_mass_per_level(8, prior * 3.0), prior, atol=2e-3)  # normalised by the function


def test_dequantization_density_levels_are_ordered_and_cover_all():
    z, p, level = analysis.dequantization_density(5, z_range=(-10.0, 10.0))
    assert (np.diff(level) >= 0).all() and set(level.tolist()) == set(range(5))
    assert np.isfinite(p).all() and (p > 0).all()


@pytest.mark.parametrize("prior", [[1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]])
def test_dequantization_density_rejects_bad_prior(prior):
    with pytest.raises(ValueError, match="prior"):
        analysis.dequantization_density(3, prior)


def test_plot_dequantization_distribution_writes_png(tmp_path):
    path = analysis.plot_dequantization_distribution(tmp_path / "d.png", 8, prior=[1, 2, 4, 2, 1, 0.5, 0.2, 0.2])
    assert _png_shape(path) == (300, 600, 4)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no temp file left


def test_dequantization_noise_uniform_is_uniform_and_decodes_back(single_level):
    x = _images(32)
    torch.manual_seed(1)
    u, z = analysis.dequantization_noise(single_level, x, repeats=4)
    assert u.shape == z.shape == (4 * x.numel(),)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    # 8192 uniform draws: mean 0.5 +- 0.0032 (1 sd), std 1/sqrt(12)
    assert abs(float(u.mean()) - 0.5) < 0.015
    assert abs(float(u.std()) - 12**-0.5) < 0.01
    # the logits decode to the images they came from
    back, _ = single_level.dequantization.inverse(z.view(4, *x.shape).float().flatten(0, 1))
    assert torch.equal(back, x.repeat(4, 1, 1, 1))


def test_dequantization_noise_variational_follows_the_learned_flow(multiscale):
    from flowkit.check import perturb_parameters

    model = glow(SHAPE, num_scales=1, steps_per_scale=1, hidden_channels=4, num_levels=LEVELS)
    perturb_parameters(model.dequantization.flow, scale=0.5)
    x = _images(32)
    torch.manual_seed(0)
    u, _ = analysis.dequantization_noise(model, x, repeats=4)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    # perturbed conditional couplings move the noise away from U[0, 1) (std 0.289)
    assert abs(float(u.std()) - 12**-0.5) > 0.02


def test_plot_dequantization_noise_rows_and_stats(tmp_path, single_level, multiscale):
    path, stats = analysis.plot_dequantization_noise(
        {"uniform": single_level, "variational": multiscale}, _images(8), tmp_path / "n.png", repeats=2
    )
    assert _png_shape(path) == (480, 800, 4)
    assert set(stats) == {"uniform", "variational"}
    assert all(np.isfinite(v) for s in stats.values() for v in s.values())
    with pytest.raises(TypeError, match="model"):
        analysis.dequantization_noise("not a model", _images(2))


def test_interpolation_rows_start_and_end_at_the_pair(tmp_path, multiscale):
    x = _images(4, seed=3)
    path, grid = analysis.plot_interpolation(multiscale, x, tmp_path / "i.png", steps=5)
    assert grid.shape == (2 * 5, *SHAPE)
    rows = grid.view(2, 5, *SHAPE)
    assert torch.equal(rows[:, 0], x[0::2]) and torch.equal(rows[:, -1], x[1::2])
    zoom = 48 // 8
    assert _png_shape(path) == (24 + zoom * (2 * 9 + 1), zoom * (5 * 9 + 1), 4)
    with pytest.raises(ValueError, match="images"):
        analysis.plot_interpolation(multiscale, x[:1], tmp_path / "j.png")


def test_interpolation_is_seeded_and_leaves_the_global_rng_alone(tmp_path, multiscale):
    x = _images(2, seed=4)
    state = torch.get_rng_state()
    _, a = analysis.plot_interpolation(multiscale, x, tmp_path / "a.png", steps=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    _, b = analysis.plot_interpolation(multiscale, x, tmp_path / "b.png", steps=3, seed=7)
    assert torch.equal(a, b)


def test_shared_final_latent_shares_exactly_the_final_level(multiscale):
    seen = []
    decode = multiscale.decode

    def spy(z, y=None):
        seen.append(z.clone())
        return decode(z, y)

    multiscale.decode = spy
    try:
        images = analysis.shared_final_latent_samples(
            multiscale, num_rows=3, num_cols=4, generator=torch.Generator().manual_seed(0)
        )
    finally:
        del multiscale.decode
    assert images.shape == (12, *SHAPE) and images.dtype == torch.long
    z = seen[0].view(3, 4, -1)
    final = int(np.prod(multiscale.level_shapes[-1]))
    early = z[..., :-final]
    assert torch.equal(z[..., -final:], z[:, :1, -final:].expand(-1, 4, -1))  # shared within a row
    assert not torch.allclose(z[0, 0, -final:], z[1, 0, -final:])  # different across rows
    assert not torch.allclose(early[:, 0], early[:, 1])  # fresh early noise per column


def test_shared_final_latent_needs_a_multiscale_model(single_level, tmp_path):
    with pytest.raises(ValueError, match="multiscale"):
        analysis.plot_shared_final_latent(single_level, tmp_path / "s.png")


def test_temperature_sweep_uses_the_same_base_noise(multiscale, tmp_path):
    same = analysis.temperature_sweep_samples(multiscale, temperatures=(0.7, 0.7), num_cols=4)
    assert torch.equal(same[:4], same[4:])
    path, images = analysis.plot_temperature_sweep(multiscale, tmp_path / "t.png", temperatures=(0.2, 1.0), num_cols=4)
    assert images.shape == (8, *SHAPE)
    zoom = 48 // 8
    assert _png_shape(path) == (24 + zoom * (2 * 9 + 1), 60 + zoom * (4 * 9 + 1), 4)
    with pytest.raises(ValueError, match="temperatures"):
        analysis.temperature_sweep_samples(multiscale, temperatures=(0.5, 0.0))


def test_analyze_writes_every_applicable_picture(tmp_path, multiscale, single_level):
    files = analysis.analyze(multiscale, _images(6), tmp_path / "ms", repeats=1)
    assert set(files) == {
        "dequantization_distribution",
        "dequantization_distribution_prior",
        "dequantization_noise",
        "interpolation",
        "temperature_sweep",
        "shared_final_latent",
    }
    for path in files.values():
        h, w, c = _png_shape(path)
        assert h >= 100 and w >= 200 and c == 4
    files = analysis.analyze(single_level, _images(4), tmp_path / "simple", repeats=1)
    assert "shared_final_latent" not in files and len(files) == 5


def test_cli_analyze_on_a_trained_checkpoint(tmp_path, capsys):
    from flowkit.cli import main
    from flowkit.training import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig(
            data="digits",
            model="glow",
            epochs=1,
            batch_size=32,
            out=str(run),
            importance_samples=0,
            max_train_batches=2,
            max_eval_batches=1,
            num_samples=4,
            init_batch_size=32,
            progress=False,
            device="cpu",
            model_kwargs={
                "num_scales": 2,
                "steps_per_scale": 1,
                "hidden_channels": 8,
                "num_layers": 1,
                "dequantization": "uniform",
            },
        )
    )
    out = tmp_path / "analysis"
    assert (
        main(
            [
                "analyze",
                "--checkpoint",
                str(run / "last.pt"),
                "--out",
                str(out),
                "--num-images",
                "4",
                "--temperatures",
                "0.5,1",
            ]
        )
        == 0
    )
    index = json.loads((out / "analysis.json").read_text())
    assert len(index["files"]) == 6
    for path in index["files"].values():
        assert _png_shape(path)[2] == 4
    assert "wrote 6 pictures" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse rejects a non-positive temperature
        main(["analyze", "--checkpoint", str(run / "last.pt"), "--out", str(out), "--temperatures", "0.5,-1"])
    assert "positive temperatures" in capsys.readouterr().err
