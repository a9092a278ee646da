"""Class-conditional image flows (issue 16): the model API, the engine, the command line.

Models are tiny (8x8 digits, 17 levels); training runs take a few batches.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import normflows as nf
import pytest
import torch
from nflows.transforms import IdentityTransform

from flowkit.cli import main
from flowkit.layers import ClassConditionalPrior
from flowkit.models import ImageFlow, build_model, glow, tutorial_flow
from flowkit.training import ConfigError, TrainConfig, evaluate_bpd, load_checkpoint, read_checkpoint, train

SHAPE, LEVELS, K = (1, 8, 8), 17, 10
TINY = {"num_scales": 2, "steps_per_scale": 1, "hidden_channels": 8, "num_layers": 1, "dequantization": "uniform"}


def _batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, LEVELS, (n, *SHAPE), generator=gen), torch.randint(0, K, (n,), generator=gen)


def _perturbed(model, scale=0.3, seed=1):
    """Parameters moved away from the (label-blind) zero initialisation, so the label matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = glow(SHAPE, num_levels=LEVELS, num_classes=K, **TINY)
    x, y = _batch(16)
    m.initialize(x, y)
    return m.eval()


# -- the prior ---------------------------------------------------------------------------------


def test_prior_is_the_per_class_diagonal_gaussian_of_normflows():
    torch.manual_seed(0)
    prior = ClassConditionalPrior(3, (2, 2, 2))
    with torch.no_grad():
        prior.loc.normal_()
        prior.log_scale.normal_(std=0.5)
    reference = nf.distributions.ClassCondDiagGaussian((2, 2, 2), 3)  # loc/log_scale: [*shape, classes]
    with torch.no_grad():
        reference.loc.copy_(prior.loc.permute(1, 2, 3, 0))
        reference.log_scale.copy_(prior.log_scale.permute(1, 2, 3, 0))
    z, y = torch.randn(5, 2, 2, 2), torch.tensor([0, 2, 1, 2, 0])
    u, ladj = prior(z, context=y)
    ours = -0.5 * (u.pow(2).sum((1, 2, 3)) + 8 * math.log(2 * math.pi)) + ladj
    torch.testing.assert_close(ours, reference.log_prob(z, y))
    z_back, ladj_inv = prior.inverse(u, context=y)
    torch.testing.assert_close(z_back, z)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros(5))


def test_prior_refuses_missing_or_float_labels():
    prior = ClassConditionalPrior(3, (4,))
    with pytest.raises(ValueError, match="context: the class labels y are needed"):
        prior(torch.randn(2, 4))
    with pytest.raises(TypeError, match="context: expected integer class labels"):
        prior(torch.randn(2, 4), context=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"context: expected class labels of shape \[2\]"):
        prior(torch.randn(2, 4), context=torch.tensor([0, 1, 2]))


def test_gated_conv_net_broadcasts_a_vector_context_over_the_image():
    from flowkit.check import perturb_parameters
    from flowkit.layers import GatedConvNet

    net = perturb_parameters(GatedConvNet(2, 4, 8, 1, context_channels=3))
    x, e = torch.randn(5, 2, 4, 4), torch.randn(5, 3)
    torch.testing.assert_close(net(x, e), net(x, e[:, :, None, None].expand(-1, -1, 4, 4)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"context: expected shape \[5, 3, 4, 4\] \(or \[5, 3\], broadcast"):
        net(x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="context: expected shape"):
        net(x, torch.randn(5, 3, 2, 2))


# -- the model ---------------------------------------------------------------------------------


def test_a_fresh_conditional_model_ignores_the_label_and_a_trained_one_does_not(model):
    x, _ = _batch(4)
    lp = []
    for label in (0, 7):
        torch.manual_seed(3)  # the same dequantization noise
        lp.append(model.log_prob(x, torch.full((4,), label)))
    torch.testing.assert_close(lp[0], lp[1], rtol=0, atol=0)  # zero-initialised: the unconditional model
    _perturbed(model)
    lp = []
    for label in (0, 7):
        torch.manual_seed(3)
        lp.append(model.log_prob(x, torch.full((4,), label)))
    assert (lp[0] - lp[1]).abs().min() > 1e-3


def test_labels_are_checked_at_the_boundary(model):
    x, y = _batch(4)
    with pytest.raises(TypeError, match=r"y: this model is conditional on 10 classes; pass the class labels y"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"y: class labels must lie in \[0, 10\), got min 0 and max 10"):
        model.bpd(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"y: class labels must lie in \[0, 10\), got min -1"):
        model.bpd(x, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(TypeError, match="y: expected integer class labels"):
        model.bpd(x, y.float())
    with pytest.raises(TypeError, match="y: expected integer class labels"):
        model.bpd(x, y > 4)
    with pytest.raises(ValueError, match=r"y: expected class labels of shape \[4\] \(one per image\), got \(4, 1\)"):
        model.bpd(x, y[:, None])
    with pytest.raises(TypeError, match="y: got the int 4 where the class labels go"):
        model.bpd_importance(x, 4)
    unconditional = glow(SHAPE, num_levels=LEVELS, **TINY)
    with pytest.raises(TypeError, match=r"y: this model is unconditional \(built without num_classes\)"):
        unconditional.log_prob(x, y)
    with pytest.raises(TypeError, match="unconditional"):
        unconditional.sample(2, y=3)


def test_encode_decode_round_trip_and_the_label_changes_the_image(model):
    _perturbed(model, scale=0.1)
    x, y = _batch(6)
    u = model.encode(x, y)
    assert u.shape == (6, 64)
    assert torch.equal(model.decode(u, y), x)
    assert not torch.equal(model.decode(u, (y + 1) % K), x)
    with pytest.raises(TypeError, match="conditional on 10 classes"):
        model.decode(u)


def test_sample_draws_the_asked_class(model):
    gen = torch.Generator().manual_seed(0)
    threes = model.sample(5, 0.7, gen, y=3)
    gen = torch.Generator().manual_seed(0)
    same = model.sample(5, 0.7, gen, y=torch.full((5,), 3))
    assert threes.shape == (5, *SHAPE) and threes.dtype == torch.long and torch.equal(threes, same)
    with pytest.raises(ValueError, match=r"y: expected an int in \[0, 9\], got 10"):
        model.sample(2, y=10)
    with pytest.raises(ValueError, match=r"y: expected class labels of shape \[2\]"):
        model.sample(2, y=torch.tensor([1, 2, 3]))


def test_interpolate_within_a_class_reproduces_the_ends(model):
    x, _ = _batch(2)
    line = model.interpolate(x[0], x[1], steps=5, y=4)
    assert line.shape == (5, *SHAPE)
    assert torch.equal(line[0], x[0]) and torch.equal(line[-1], x[1])
    assert torch.equal(model.interpolate(x[0], x[1], steps=3, y=torch.tensor([4]))[0], x[0])
    with pytest.raises(ValueError, match="y: expected one class for both images"):
        model.interpolate(x[0], x[1], y=torch.tensor([1, 2]))


def test_importance_sampled_bpd_takes_labels_and_is_tighter(model):
    x, y = _batch(8)
    torch.manual_seed(0)
    one = torch.stack([model.bpd(x, y) for _ in range(4)]).mean()
    torch.manual_seed(0)
    many = model.bpd_importance(x, y, num_samples=4).mean()
    assert many <= one + 1e-6


def test_tutorial_models_and_the_registry_build_conditional_models():
    x, y = _batch(4)
    for kind in ("simple", "vardeq", "multiscale"):
        torch.manual_seed(0)
        m = tutorial_flow(kind, SHAPE, LEVELS, num_classes=K)
        assert m.is_conditional and torch.isfinite(m.bpd(x, y)).all()
        assert m.num_parameters() > tutorial_flow(kind, SHAPE, LEVELS).num_parameters()
    prior_only = build_model("multiscale", SHAPE, LEVELS, num_classes=K, label_channels=0)
    assert prior_only.context_encoder is None and isinstance(prior_only.prior, ClassConditionalPrior)
    with pytest.raises(ValueError, match="label_channels: 4 needs a conditional model"):
        glow(SHAPE, num_levels=LEVELS, label_channels=4, **TINY)


def test_image_flow_checks_its_conditioning_parts():
    flow = glow(SHAPE, num_levels=LEVELS, **TINY).flow
    from flowkit.layers import Dequantization

    with pytest.raises(ValueError, match="num_classes: prior condition on a class label"):
        ImageFlow(Dequantization(LEVELS), flow, SHAPE, prior=IdentityTransform())
    with pytest.raises(TypeError, match="prior: expected an nflows Transform"):
        ImageFlow(Dequantization(LEVELS), flow, SHAPE, num_classes=3, prior=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        ImageFlow(Dequantization(LEVELS), flow, SHAPE, num_classes=1)
    plain = ImageFlow(Dequantization(LEVELS), flow, SHAPE, num_classes=3, prior=IdentityTransform())
    x, _ = _batch(2)
    torch.manual_seed(0)
    a = plain.log_prob(x, torch.tensor([0, 1]))
    torch.manual_seed(0)
    b = ImageFlow(Dequantization(LEVELS), flow, SHAPE).log_prob(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # an identity prior and no context: the unconditional model


def test_memory_saving_backprop_passes_the_label_context_and_its_gradient():
    kw = dict(TINY, steps_per_scale=2, num_levels=LEVELS, num_classes=K)
    torch.manual_seed(0)
    plain = glow(SHAPE, **kw).double()
    saving = glow(SHAPE, memory_saving=True, **kw).double()
    x, y = _batch(8)
    plain.initialize(x, y)
    saving.load_state_dict(_perturbed(plain, scale=0.05).state_dict())
    grads = []
    for model in (plain, saving):
        torch.manual_seed(1)
        model.bpd(x, y).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[1]["context_encoder.weight"].abs().sum() > 0
    assert max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0]) < 1e-10


# -- the engine --------------------------------------------------------------------------------


def _config(out, **overrides) -> TrainConfig:
    options = dict(
        data="digits",
        model="glow",
        model_kwargs=dict(TINY),
        epochs=1,
        batch_size=32,
        seed=1,
        device="cpu",
        out=str(out),
        importance_samples=2,
        max_train_batches=4,
        max_eval_batches=2,
        num_samples=20,
        init_batch_size=64,
        progress=False,
        conditional=True,
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "run"
    return train(_config(out))


def test_a_conditional_run_records_its_classes_and_reloads(run):
    checkpoint = read_checkpoint(run.files.best)
    assert checkpoint.num_classes == K and checkpoint.config["conditional"] is True
    assert checkpoint.recipe.kwargs == {**TINY, "num_classes": K}
    model, _ = load_checkpoint(run.files.best, device="cpu")
    assert model.is_conditional and model.num_classes == K
    assert model.sample(3, 0.7, y=2).shape == (3, *SHAPE)
    from flowkit.data import load_splits

    test = load_splits("digits")["test"]
    loader = [test[torch.arange(0, 32)], test[torch.arange(32, 64)]]
    torch.manual_seed(0)
    measured = evaluate_bpd(model, loader, importance_samples=1)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = torch.cat([model.bpd(x, y) for x, y in loader]).mean().item()
    assert measured == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match=r"loader: the model is conditional on 10 classes, so its batches"):
        evaluate_bpd(model, [test.images[:4].long()])


def test_a_conditional_run_resumes_on_the_same_trajectory(tmp_path, run):
    whole = train(_config(tmp_path / "whole", epochs=2))
    train(_config(tmp_path / "split", epochs=1))
    from flowkit.training import resume_config

    resumed = train(resume_config(tmp_path / "split", epochs=2))
    a = read_checkpoint(whole.files.last).state_dict
    b = read_checkpoint(resumed.files.last).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1].val_bpd == whole.history[-1].val_bpd


def test_conditional_options_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_kwargs: num_classes is 3 but the data set 'digits' has 10 classes"):
        train(_config(tmp_path / "a", model_kwargs={**TINY, "num_classes": 3}))
    with pytest.raises(ValueError, match="conditional: the data set 'digits' has 10 classes but the model .* is "):
        train(_config(tmp_path / "b", model=None), model=glow(SHAPE, num_levels=LEVELS, **TINY))
    with pytest.raises(ValueError, match="conditional: the model .* is conditional on 10 classes; train it"):
        train(
            _config(tmp_path / "c", conditional=False, model=None),
            model=glow(SHAPE, num_levels=LEVELS, num_classes=K, **TINY),
        )
    with pytest.raises(TypeError, match="conditional: expected True or False, got int"):
        _config(tmp_path / "d", conditional=1).validate()
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_instance_conditional_model_trains_and_loads_with_the_architecture(tmp_path):
    torch.manual_seed(0)
    result = train(_config(tmp_path / "i", model=None), model=tutorial_flow("simple", SHAPE, LEVELS, num_classes=K))
    assert math.isfinite(result.test_bpd)
    model, checkpoint = load_checkpoint(result.files.best, model=tutorial_flow("simple", SHAPE, LEVELS, num_classes=K))
    assert checkpoint.recipe is None and checkpoint.num_classes == K
    from flowkit.training import CheckpointError

    with pytest.raises(
        CheckpointError, match="holds a model conditional on 10 classes; the given model is unconditional"
    ):
        load_checkpoint(result.files.best, model=tutorial_flow("simple", SHAPE, LEVELS))


# -- the command line ------------------------------------------------------------------------


def _one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def _train_args(out, *extra):
    return [
        "train",
        "--data",
        "digits",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-train-batches",
        "3",
        "--max-eval-batches",
        "1",
        "--importance-samples",
        "1",
        "--num-samples",
        "10",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _png_size(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    h, w, _ = imread(str(path)).shape
    return h, w


def test_cli_a_users_conditional_module_trains_samples_evaluates_and_analyzes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the command puts the current folder on sys.path, as python -m does
    shutil.copy(Path(__file__).with_name("user_conditional_flows.py"), tmp_path / "my_conditional_flows.py")
    sys.modules.pop("my_conditional_flows", None)
    try:
        args = _train_args("run", "--model", "my_conditional_flows:labelled_glow", "--conditional")
        assert main([*args, "--model-kwargs", '{"hidden": 4}']) == 0, capsys.readouterr().err
        text = capsys.readouterr().out
        assert "my_conditional_flows:labelled_glow on digits" in text and "test bpd given the label" in text
        assert main(["sample", "--checkpoint", "run/best.pt", "--label", "3", "--n", "6", "--out", "threes.png"]) == 0
        assert "wrote 6 samples of class 3" in capsys.readouterr().out
        assert (
            main(["sample", "--checkpoint", "run/best.pt", "--labels", "0,1,2", "--n", "4", "--out", "rows.png"]) == 0
        )
        three_rows = _png_size(tmp_path / "rows.png")
        assert main(["sample", "--checkpoint", "run/best.pt", "--n", "4", "--out", "all.png"]) == 0  # every class
        ten_rows = _png_size(tmp_path / "all.png")
        zoom = 48 // 8
        assert ten_rows[0] - three_rows[0] == zoom * 7 * 9 and ten_rows[1] == three_rows[1]  # 7 more rows of 9 px
        evaluate_args = ["evaluate", "--checkpoint", "run/best.pt", "--importance-samples", "2", "--max-batches", "1"]
        assert main(evaluate_args) == 0
        assert re.search(r"test bpd given the label \(10 classes\): \d+\.\d+", capsys.readouterr().out)
        assert main(["analyze", "--checkpoint", "run/best.pt", "--out", "an", "--temperatures", "0.5,1"]) == 0
        index = json.loads((tmp_path / "an" / "analysis.json").read_text())["files"]
        assert "class_samples" in index and (tmp_path / "an" / "class_samples.png").is_file()
        assert main(["train", "--out", "run", "--resume", "--epochs", "2"]) == 0  # resumes as conditional
        assert read_checkpoint(tmp_path / "run" / "last.pt").epoch == 2
    finally:
        sys.modules.pop("my_conditional_flows", None)


@pytest.fixture(scope="module")
def unconditional_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(_train_args(out, "--model", "glow", "--model-kwargs", json.dumps(TINY))) == 0
    return out / "best.pt"


def test_cli_sample_errors_are_one_line(run, unconditional_checkpoint, tmp_path, capsys):
    capsys.readouterr()
    best = str(run.files.best)
    cases = [
        (["--checkpoint", best, "--label", "10"], "--label: 10 is not a class of this model (it has 10 classes, 0..9)"),
        (["--checkpoint", best, "--labels", "1,-1"], "--labels: -1 is not a class of this model"),
        (
            ["--checkpoint", str(unconditional_checkpoint), "--label", "3"],
            "holds an unconditional model (trained without --conditional), which cannot sample a chosen class",
        ),
    ]
    for argv, expected in cases:
        assert main(["sample", *argv, "--out", str(tmp_path / "x.png")]) == 2
        assert expected in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):  # argparse: not a list of labels
        main(["sample", "--checkpoint", best, "--labels", "1,a"])


def test_cli_train_conditional_names_the_argument_an_unconditional_builder_lacks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).with_name("user_flows.py"), tmp_path / "plain_user_flows.py")
    try:
        assert main(_train_args("run", "--model", "plain_user_flows:hand_glow", "--conditional")) == 2
    finally:
        sys.modules.pop("plain_user_flows", None)
    line = _one_error_line(capsys.readouterr().err)
    assert "unexpected keyword argument 'num_classes'" in line and "calls the builder with num_classes=K" in line
    assert not (tmp_path / "run").exists()


def test_cli_train_refuses_a_conditional_builder_without_the_flag(tmp_path, capsys):
    args = _train_args(tmp_path / "run", "--model", "glow", "--model-kwargs", json.dumps({**TINY, "num_classes": 10}))
    assert main(args) == 2
    assert "is conditional on 10 classes; train it with conditional=True (--conditional)" in _one_error_line(
        capsys.readouterr().err
    )


def test_docstring_examples_run():
    import doctest

    import flowkit.layers.conditional
    import flowkit.validation

    for module in (flowkit.layers.conditional, flowkit.validation, sys.modules["flowkit.models.glow"]):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.slow
def test_readme_conditional_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's "Conditional flows" commands and code, as written (one epoch instead of 40)."""
    import shlex

    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## Conditional flows\n")
    blocks = re.findall(r"```(bash|python)\n(.*?)```", text[start : text.index("\n## ", start + 1)], re.S)
    assert [kind for kind, _ in blocks] == ["bash", "python"]
    for line in blocks[0][1].replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[0] == "flowkit", line
        argv = ["1" if argv[i - 1] == "--epochs" else a for i, a in enumerate(argv) if i]
        assert main(argv) == 0, (line, capsys.readouterr().err)
    namespace: dict = {}
    exec(compile(blocks[1][1], "README.md", "exec"), namespace)
    assert namespace["bpd"].shape == (64,) and namespace["threes"].shape == (16, *SHAPE)
    assert namespace["sevens"].shape == (64, *SHAPE) and namespace["checkpoint"].num_classes == K
    assert (tmp_path / "threes.png").is_file() and (tmp_path / "rows.png").is_file()
    assert (tmp_path / "runs/cond/analysis/class_samples.png").is_file()


@pytest.mark.cuda
def test_conditional_model_trains_and_samples_on_cuda(tmp_path):
    """Labels given on the CPU move to the model's device at the boundary; the engine on CUDA."""
    from flowkit.analysis import class_samples

    torch.manual_seed(0)
    model = glow(SHAPE, num_levels=LEVELS, num_classes=K, **TINY).to("cuda")
    x, y = _batch(8)
    model.initialize(x.cuda(), y)  # CPU labels
    lp = model.log_prob(x.cuda(), y.cuda())
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    lp.mean().backward()
    assert model.prior.loc.grad.device.type == "cuda"
    assert model.sample(3, 0.7, y=3).device.type == "cuda"
    assert class_samples(model, per_class=2).shape == (2 * K, *SHAPE)
    result = train(_config(tmp_path / "gpu", device="cuda"))
    assert math.isfinite(result.test_bpd)
    reloaded, _ = load_checkpoint(result.files.best, device="cuda")
    assert reloaded.sample(2, 0.7, y=torch.tensor([1, 2])).device.type == "cuda"
