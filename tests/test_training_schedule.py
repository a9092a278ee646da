"""The per-step learning-rate schedule (warm-up, decay per epoch), the weight average that a run
evaluates (ema_decay), their checkpoints and resume, and the per-data-set default model."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import tiny_config

from flowkit.commands.train import register
from flowkit.training import load_checkpoint, read_checkpoint, resume_config, train
from flowkit.training.config import DEFAULT_MODELS, default_model
from flowkit.training.hooks import Hook
from flowkit.training.schedule import WeightAverage, lr_factor


class Recorder(Hook):
    """After every step: the learning rate of the next step and the training weights."""

    def __init__(self):
        self.lrs, self.weights = [], []

    def on_step_end(self, run, step):
        self.lrs.append(run.optimizer.param_groups[0]["lr"])
        self.weights.append([p.detach().clone() for p in run.model.parameters()])


def test_lr_factor_warms_up_linearly_then_decays_per_epoch():
    assert [lr_factor(s, 4, 0.5, 3) for s in range(8)] == [0.25, 0.5, 0.75, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert [lr_factor(s, 0, 0.9, 2) for s in range(4)] == pytest.approx([1.0, 1.0, 0.9, 0.9])


def test_the_optimizer_follows_the_schedule_step_by_step(tmp_path):
    recorder = Recorder()
    result = train(tiny_config(tmp_path, epochs=3, warmup_steps=4, lr_decay=0.5), hooks=[recorder])
    expected = [2e-3 * lr_factor(s + 1, 4, 0.5, 3) for s in range(9)]  # after step s: the lr of step s + 1
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
    assert [h.lr for h in result.history] == pytest.approx([2e-3 * lr_factor(s, 4, 0.5, 3) for s in (0, 3, 6)])


def test_weight_average_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for e, a in zip(expected, average.model.parameters(), strict=True):
        torch.testing.assert_close(a, e)
    assert not any(p.requires_grad for p in average.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, 1.0)


def test_a_run_with_ema_saves_the_average_as_the_model_and_the_training_weights_apart(tmp_path):
    recorder = Recorder()
    train(tiny_config(tmp_path, epochs=2, ema_decay=0.8, importance_samples=0), hooks=[recorder])
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert checkpoint.ema["updates"] == len(recorder.weights) == 6
    model, _ = load_checkpoint(tmp_path / "last.pt")
    differs = []
    for (name, p), trained in zip(model.named_parameters(), recorder.weights[-1], strict=True):
        torch.testing.assert_close(checkpoint.train_state_dict[name], trained, rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), checkpoint.state_dict[name], rtol=0, atol=0)  # loaded: the average
        differs.append(not torch.equal(p.detach(), trained))
    assert any(differs)


def test_weight_average_matches_a_hand_computed_average(tmp_path):
    recorder = Recorder()
    torch.manual_seed(0)
    config = tiny_config(tmp_path, epochs=1, ema_decay=0.5, importance_samples=0, max_train_batches=2)
    initial = {}

    class Initial(Hook):
        def on_fit_start(self, run):
            initial.update({k: v.detach().clone() for k, v in run.model.named_parameters()})

    train(config, hooks=[Initial(), recorder])
    state = read_checkpoint(tmp_path / "last.pt").state_dict
    names = list(initial)
    expected = [initial[k] for k in names]
    for n, weights in enumerate(recorder.weights):
        d = min(0.5, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
    for name, e in zip(names, expected, strict=True):
        torch.testing.assert_close(state[name], e, msg=name)


def test_resume_with_warmup_and_ema_continues_the_same_trajectory(tmp_path):
    options = dict(warmup_steps=5, ema_decay=0.9, lr_decay=0.7)
    full = train(tiny_config(tmp_path / "full", epochs=3, **options))
    train(tiny_config(tmp_path / "cut", epochs=1, **options))
    resumed = train(resume_config(tmp_path / "cut", epochs=3))
    a, b = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(tmp_path / "cut" / "last.pt")
    for key in a.state_dict:
        torch.testing.assert_close(b.state_dict[key], a.state_dict[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(b.train_state_dict[key], a.train_state_dict[key], rtol=0, atol=1e-6, msg=key)
    assert a.ema == b.ema and b.scheduler["last_epoch"] == 9
    assert [h.lr for h in resumed.history] == pytest.approx([h.lr for h in full.history], rel=1e-12)
    assert resumed.test_bpd == pytest.approx(full.test_bpd, abs=1e-6)


def test_a_run_from_before_the_per_step_schedule_resumes_with_its_lr(tmp_path):
    """Older checkpoints hold a per-epoch StepLR and no warmup_steps/ema_decay options."""
    full = train(tiny_config(tmp_path / "full", epochs=2, lr_decay=0.5, importance_samples=0))
    train(tiny_config(tmp_path / "old", epochs=1, lr_decay=0.5, importance_samples=0))
    payload = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    payload["scheduler"] = {"step_size": 1, "gamma": 0.5, "base_lrs": [2e-3], "last_epoch": 1, "_last_lr": [1e-3]}
    for key in ("warmup_steps", "ema_decay", "train_state_dict", "ema"):
        payload["config"].pop(key, None)
        payload.pop(key, None)
    torch.save(payload, tmp_path / "old" / "last.pt")
    config = resume_config(tmp_path / "old", epochs=2)
    assert (config.warmup_steps, config.ema_decay) == (0, 0.0)
    resumed = train(config)
    assert resumed.history[1].lr == pytest.approx(full.history[1].lr, rel=1e-12) == 1e-3
    with pytest.raises(Exception, match="ema_decay is 0.5 but the run was started with 0.0"):
        train(tiny_config(tmp_path / "old", epochs=3, lr_decay=0.5, resume=True, ema_decay=0.5))


@pytest.mark.parametrize("data", ["digits", "cifar10"])
def test_default_model_is_the_data_sets_and_is_recorded(data):
    name, kwargs = default_model(data)
    assert (name, kwargs) == DEFAULT_MODELS[data]
    kwargs["changed"] = True  # a copy
    assert "changed" not in default_model(data)[1]
    with pytest.raises(ValueError, match="data"):
        default_model("imagenet")


def test_model_none_trains_the_default_and_checkpoints_name_it(tmp_path):
    name, kwargs = default_model("digits")
    config = tiny_config(tmp_path, model=None, model_kwargs={}, importance_samples=0, max_train_batches=1)
    result = train(config)
    assert result.model_name == name
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    assert (checkpoint.recipe.name, checkpoint.recipe.kwargs) == (name, kwargs)
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["model"] == name
    model, _ = load_checkpoint(tmp_path / "best.pt")
    assert sum(p.numel() for p in model.parameters()) == result.num_parameters
    # a resumed run given model=None resolves to the same default, so nothing conflicts
    assert (
        train(
            tiny_config(
                tmp_path, model=None, model_kwargs={}, epochs=2, resume=True, importance_samples=0, max_train_batches=1
            )
        ).epochs
        == 2
    )


def test_model_kwargs_without_model_update_the_defaults(tmp_path):
    config = tiny_config(
        tmp_path, model=None, model_kwargs={"num_layers": 0}, importance_samples=0, max_train_batches=1
    )
    train(config)
    recipe = read_checkpoint(tmp_path / "last.pt").recipe
    assert recipe.kwargs == {**default_model("digits")[1], "num_layers": 0}


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("warmup_steps", -1, ValueError),
        ("warmup_steps", 1.5, TypeError),
        ("ema_decay", 1.0, ValueError),
        ("ema_decay", -0.1, ValueError),
        ("ema_decay", "0.9", TypeError),
    ],
)
def test_config_rejects_bad_schedule_options(tmp_path, field, value, error):
    with pytest.raises(error, match=field):
        tiny_config(tmp_path, **{field: value}).validate()


def test_cli_flags_set_the_schedule_options():
    import argparse

    from flowkit.commands.train import config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--warmup-steps", "7", "--ema-decay", "0.99", "--out", "x"])
    config = config_from_args(args)
    assert (config.warmup_steps, config.ema_decay, config.model) == (7, 0.99, None)


def test_glow_options_without_a_model_name_say_to_name_it(tmp_path):
    from flowkit.models import ModelBuildError

    with pytest.raises(ModelBuildError, match="update the data set's default model .'multiscale'.: name the model"):
        train(tiny_config(tmp_path, model=None, model_kwargs={"num_scales": 2}))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
