"""The training engine (flowkit.training): any image flow trains, typed results and checkpoints,
exact resume, non-finite steps, run folders that never lose a run, no host sync per step."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import sys
import types

import pytest
import torch
from user_flows import hand_glow

import flowkit.io
from flowkit.errors import UserError
from flowkit.layers import Dequantization
from flowkit.training import (
    Checkpoint,
    CheckpointError,
    ConfigError,
    Hook,
    NonFiniteLossError,
    RunFolderError,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    evaluate_bpd,
    independent_pixel_bpd,
    load_checkpoint,
    read_checkpoint,
    resolve_device,
    resume_config,
    save_checkpoint,
    train,
)
from flowkit.training.loop import StepMeter, train_step

TINY = {"num_scales": 1, "steps_per_scale": 1, "hidden_channels": 4, "num_layers": 0, "dequantization": "uniform"}


def tiny_config(out, **overrides) -> TrainConfig:
    options = dict(
        data="digits",
        model="glow",
        model_kwargs=dict(TINY),
        epochs=1,
        batch_size=16,
        lr=2e-3,
        seed=3,
        device="cpu",
        out=str(out),
        importance_samples=2,
        max_train_batches=3,
        max_eval_batches=2,
        num_samples=4,
        init_batch_size=32,
        progress=False,
        # the plain path: the warm-up and the weight average have their own tests (test_training_schedule.py)
        warmup_steps=0,
        ema_decay=0.0,
    )
    options.update(overrides)
    return TrainConfig(**options)


def user_model(seed: int = 0):
    torch.manual_seed(seed)
    return hand_glow((1, 8, 8), 17, num_scales=2, steps=1, hidden=4)


def snapshot(folder) -> dict:
    """``{name: (bytes, mtime)}`` of every file in ``folder``."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


# -- what a run writes and returns -------------------------------------------------------------


def test_train_writes_checkpoints_metrics_and_pictures(tmp_path):
    result = train(tiny_config(tmp_path, epochs=2))
    assert isinstance(result, TrainResult)
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.json", "samples.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] == [h.epoch for h in result.history]
    assert all(math.isfinite(float(r["val_bpd"])) and math.isfinite(float(r["train_bpd"])) for r in rows)
    assert float(rows[1]["lr"]) == pytest.approx(2e-3 * TrainConfig.lr_decay)  # decayed after one epoch
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["test_bpd"] == pytest.approx(result.test_bpd) and math.isfinite(result.test_bpd)
    assert summary["best_epoch"] == result.best_epoch and len(summary["history"]) == 2
    assert result.files.best == tmp_path / "best.pt" and result.model_name == "glow"

    model, checkpoint = load_checkpoint(tmp_path / "last.pt", device="cpu")
    assert isinstance(checkpoint, Checkpoint) and checkpoint.epoch == 2
    assert checkpoint.recipe.name == "glow" and checkpoint.recipe.kwargs == TINY
    assert checkpoint.recipe.image_shape == (1, 8, 8) and checkpoint.recipe.num_levels == 17
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == result.num_parameters
    state = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_resume_continues_the_same_trajectory(tmp_path):
    full = train(tiny_config(tmp_path / "full", epochs=3))
    train(tiny_config(tmp_path / "cut", epochs=1))  # "interrupted" after one epoch
    resumed = train(resume_config(tmp_path / "cut", epochs=3))

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert b["epoch"] == 3 and b["config"]["epochs"] == 3  # the new epoch count is recorded
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for ha, hb in zip(full.history, resumed.history, strict=True):
        assert hb.train_bpd == pytest.approx(ha.train_bpd, abs=1e-6)
        assert hb.val_bpd == pytest.approx(ha.val_bpd, abs=1e-6)
        assert hb.lr == pytest.approx(ha.lr, rel=1e-12)
    assert resumed.test_bpd == pytest.approx(full.test_bpd, abs=1e-6)


def test_resume_refuses_changed_options_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train(tiny_config(tmp_path, resume=True))
    assert not tmp_path.joinpath("last.pt").exists()
    train(tiny_config(tmp_path, max_train_batches=1, importance_samples=0))
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError, match="model_kwargs is .* but the run was started with"):
        train(tiny_config(tmp_path, epochs=2, resume=True, model_kwargs={**TINY, "hidden_channels": 8}))
    with pytest.raises(RunFolderError, match=r"lr is 0\.1 but the run was started with 0\.002"):
        resume_config(tmp_path, epochs=2, lr=0.1)
    assert snapshot(tmp_path) == before
    config = resume_config(tmp_path, epochs=2, importance_samples=1, threads=1)  # options that may change
    assert (config.epochs, config.importance_samples, config.threads, config.resume) == (2, 1, 1, True)
    assert (config.lr, config.model_kwargs, config.max_train_batches) == (2e-3, TINY, 1)  # restored


# -- any image flow trains ---------------------------------------------------------------------


def test_a_hand_built_instance_trains_and_loads_back_with_model(tmp_path):
    model = user_model()
    result = train(tiny_config(tmp_path, model=None, model_kwargs={}), model=model)
    assert result.model_name == "flowkit.models.image_flow.ImageFlow"  # an instance: named by its class
    checkpoint = read_checkpoint(tmp_path / "best.pt")
    assert checkpoint.recipe is None and checkpoint.image_shape == (1, 8, 8)
    with pytest.raises(CheckpointError, match=r"no recipe .* load_checkpoint\(path, model=\.\.\.\)"):
        load_checkpoint(tmp_path / "best.pt")
    loaded, _ = load_checkpoint(tmp_path / "last.pt", model=user_model(seed=1))
    for key, value in model.state_dict().items():  # the instance ends with the last epoch's weights
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="does not fit the given ImageFlow"):
        load_checkpoint(tmp_path / "last.pt", model=hand_glow((1, 8, 8), 17, num_scales=2, steps=2, hidden=4))


def test_an_import_path_model_is_rebuilt_from_its_recipe(tmp_path):
    kwargs = {"num_scales": 2, "steps": 1, "hidden": 4}
    train(tiny_config(tmp_path, model="user_flows:hand_glow", model_kwargs=kwargs))
    model, checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint.recipe.name == "user_flows:hand_glow" and checkpoint.recipe.kwargs == kwargs
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in user_model().parameters())
    x = torch.randint(0, 17, (4, 1, 8, 8))
    assert torch.isfinite(model.bpd(x)).all()


def test_wrong_models_are_one_short_error(tmp_path):
    with pytest.raises(TypeError, match="model: expected a flowkit ImageFlow instance, got Linear") as info:
        train(tiny_config(tmp_path, model=None), model=torch.nn.Linear(2, 2))
    assert len(str(info.value)) < 120  # names the type, never prints the whole module
    with pytest.raises(ConfigError, match="either as an instance .* or by name"):
        train(tiny_config(tmp_path), model=user_model())
    with pytest.raises(UserError, match="takes images .* but data 'digits' has"):
        train(tiny_config(tmp_path, model=None), model=hand_glow((1, 16, 16), 17))
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        train(tiny_config(tmp_path, model="no_such_module:build"))
    with pytest.raises(ValueError, match="model: expected one of glow"):
        train(tiny_config(tmp_path, model="realnvp"))
    assert list(tmp_path.iterdir()) == []  # a failed start writes nothing


class SpoilAt(Hook):
    """Scales every parameter of the model by 3 at the start of epoch ``epoch``: that epoch ends worse."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, run, epoch, num_batches):
        if epoch == self.epoch:
            with torch.no_grad():
                for p in run.model.parameters():
                    p.mul_(3.0)


def test_the_final_test_measures_best_pt_not_the_last_epoch(tmp_path):
    from flowkit.data import load_splits
    from flowkit.training.evaluation import bpd_sum
    from flowkit.training.runtime import seed_all

    config = tiny_config(tmp_path, epochs=2)
    result = train(config, hooks=[SpoilAt(1)])
    assert result.best_epoch == 1 and result.history[1].val_bpd > result.history[0].val_bpd

    test_loader = torch.utils.data.DataLoader(load_splits("digits")["test"], batch_size=16)

    def test_bpd(path):
        model, _ = load_checkpoint(path)
        seed_all(config.seed, 0, 1)  # the final evaluation's noise
        total, count = bpd_sum(model, test_loader, config.importance_samples, config.max_eval_batches)
        return float(total) / count

    assert result.test_bpd == pytest.approx(test_bpd(tmp_path / "best.pt"), abs=1e-6)
    assert abs(result.test_bpd - test_bpd(tmp_path / "last.pt")) > 1e-3  # the check can tell them apart


# -- non-finite steps ----------------------------------------------------------------------------


def poisoned(model, bad_calls):
    """``model`` whose training-mode ``bpd`` is NaN on the listed calls (1-based; None: all)."""
    clean_bpd, calls = model.bpd, {"n": 0}

    def bpd(x, **kwargs):
        out = clean_bpd(x, **kwargs)
        if model.training:
            calls["n"] += 1
            if bad_calls is None or calls["n"] in bad_calls:
                return out * torch.nan
        return out

    model.bpd = bpd
    return model


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    model = poisoned(user_model(), bad_calls={2, 3})
    result = train(tiny_config(tmp_path, model=None, max_train_batches=4, importance_samples=0), model=model)
    assert result.skipped_steps == 2 and result.history[0].skipped_steps == 2
    assert math.isfinite(result.history[0].train_bpd)  # the mean of the two good steps
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in payload["state_dict"].values() if v.is_floating_point())


def test_a_skipped_step_leaves_parameters_and_adam_untouched():
    model = poisoned(user_model(), bad_calls={2})
    x = torch.randint(0, 17, (8, 1, 8, 8))
    model.initialize(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    run = types.SimpleNamespace(
        model=model,
        step_loss=lambda batch: model.bpd(batch, validate=False),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        ema=None,
        config=types.SimpleNamespace(grad_clip=1.0),
        ctx=types.SimpleNamespace(all_true=lambda flag: flag),
    )
    meter = StepMeter.zeros(torch.device("cpu"))
    train_step(run, x, meter)  # a good step
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    train_step(run, x, meter)  # NaN: skipped on the device
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    for before, after in zip(state, optimizer.state.values(), strict=True):
        assert all(torch.equal(after[k], v) for k, v in before.items())
    train_step(run, x, meter)  # a good step moves them again
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    stats = meter.read()
    assert (stats.skipped, stats.max_in_a_row) == (1, 1) and math.isfinite(stats.train_bpd)


def test_nonfinite_losses_in_a_row_stop_the_run_and_leave_no_folder(tmp_path):
    out = tmp_path / "run"
    model = poisoned(user_model(), bad_calls=None)
    with pytest.raises(NonFiniteLossError, match="10 steps in a row had a non-finite loss .* max_nonfinite, is 3"):
        train(tiny_config(out, model=None, max_nonfinite=3, max_train_batches=10), model=model)
    assert not out.exists()  # no checkpoint, and no empty folder


def test_nonfinite_loss_stop_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 has 3 clean steps; everything after is NaN -> stop during epoch 2
    model = poisoned(user_model(), bad_calls=set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match="last.pt"):
        train(tiny_config(tmp_path, model=None, epochs=2, max_nonfinite=2), model=model)
    assert read_checkpoint(tmp_path / "last.pt").epoch == 1


# -- checkpoints -------------------------------------------------------------------------------


def tiny_checkpoint(**state) -> Checkpoint:
    return Checkpoint(
        state_dict=state or {"w": torch.ones(3)}, recipe=None, model_class="m.M", image_shape=(1, 2, 2), num_levels=2
    )


def test_save_checkpoint_refuses_nonfinite_state_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(tiny_checkpoint(), path)
    before = path.read_bytes()
    for bad in ({"w": torch.tensor([1.0, math.nan, 0.0])}, {"w": torch.tensor([math.inf])}):
        with pytest.raises(NonFiniteLossError, match="state_dict.w"):
            save_checkpoint(tiny_checkpoint(**bad), path)
    with pytest.raises(NonFiniteLossError, match="optimizer"):
        bad_optimizer = tiny_checkpoint()
        bad_optimizer.optimizer = {"state": {0: {"exp_avg": torch.tensor([math.nan])}}}
        save_checkpoint(bad_optimizer, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_checkpoint_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(tiny_checkpoint(), path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(flowkit.io.os, "fsync", failing_fsync)  # fails after the temp file is half written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_checkpoint(w=torch.zeros(2)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Foreign:
    pass


def broken_files(folder) -> dict:
    good = folder / "good.pt"
    save_checkpoint(tiny_checkpoint(), good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": os.urandom(2000),
        "text": b"hello world\n",
        "pickle": pickle.dumps(Foreign()),
        "pickled dict": pickle.dumps({"format": "flowkit-checkpoint-2"}),
    }
    for name, content in files.items():
        (folder / f"{name}.pt").write_bytes(content)
    torch.save({"a": 1}, folder / "foreign.pt")
    torch.save({"format": "flowkit-checkpoint-99"}, folder / "future.pt")
    torch.save({"format": "flowkit-checkpoint-2", "state_dict": [1]}, folder / "damaged.pt")
    (folder / "folder.pt").mkdir()
    return {name: folder / f"{name}.pt" for name in [*files, "foreign", "future", "damaged", "folder", "missing"]}


BROKEN = ("empty", "truncated", "random", "text", "pickle", "pickled dict", "foreign", "future", "damaged", "folder")


@pytest.mark.parametrize("name", [*BROKEN, "missing"])
def test_unusable_checkpoints_are_one_clear_sentence(tmp_path, name):
    path = broken_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 300, message
    assert "weights_only" not in message and "Traceback" not in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_checkpoints_of_flowkit_0_1_load_and_resume(tmp_path):
    """flowkit 0.1 wrote format 1: the recipe under "model", an unfused Adam, fewer options."""
    train(tiny_config(tmp_path, importance_samples=0))
    for name in ("last.pt", "best.pt"):
        payload = torch.load(tmp_path / name, weights_only=True)
        for key in ("model_class", "image_shape", "num_levels"):
            del payload[key]
        payload.update(format="flowkit-checkpoint-1", model=payload.pop("recipe"))
        for group in payload["optimizer"]["param_groups"]:
            group["fused"] = None
        for key in ("overwrite", "threads", "tensorboard"):
            del payload["config"][key]
        torch.save(payload, tmp_path / name)
    model, checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint.recipe.name == "glow" and checkpoint.recipe.kwargs == TINY and checkpoint.epoch == 1
    assert train(resume_config(tmp_path, epochs=2)).epochs == 2
    assert read_checkpoint(tmp_path / "last.pt").recipe == checkpoint.recipe  # written in today's format


# -- the run folder ------------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_untouched_unless_overwrite(tmp_path):
    train(tiny_config(tmp_path, importance_samples=0))
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError, match="already holds a run .* --resume .* --overwrite"):
        train(tiny_config(tmp_path, seed=4))
    assert snapshot(tmp_path) == before  # nothing touched
    with pytest.raises(TrainingInterrupted):  # a replacement that stops before its first checkpoint...
        train(tiny_config(tmp_path, seed=4, overwrite=True), hooks=[InterruptAt(0)])
    assert snapshot(tmp_path) == before  # ...leaves the old run as it was
    result = train(tiny_config(tmp_path, seed=4, overwrite=True, epochs=2, importance_samples=0))
    assert result.history[-1].epoch == 2 and read_checkpoint(tmp_path / "last.pt").config["seed"] == 4
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_out_must_be_a_writable_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file; expected a folder"):
        train(tiny_config(tmp_path / "file"))
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        train(tiny_config(tmp_path / "file" / "run"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(readonly) else real_access(p, mode))
    with pytest.raises(RunFolderError, match="cannot write in .*readonly"):
        train(tiny_config(readonly / "run"))
    assert list(readonly.iterdir()) == []


class InterruptAt(Hook):
    """Ctrl-C at the start of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, run, epoch, num_batches):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_finishes_the_run(tmp_path):
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_config(tmp_path, epochs=3), hooks=[InterruptAt(1)])
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.checkpoint == tmp_path / "last.pt" and info.value.epoch == 1
    assert "last.pt holds epoch 1 of 3" in str(info.value)
    assert read_checkpoint(tmp_path / "last.pt").epoch == 1
    assert train(resume_config(tmp_path)).epochs == 3
    with pytest.raises(TrainingInterrupted, match="nothing was saved"):
        train(tiny_config(tmp_path / "early", epochs=3), hooks=[InterruptAt(0)])
    assert not (tmp_path / "early").exists()


# -- hooks: TensorBoard, the hot path ----------------------------------------------------------------


def test_tensorboard_logs_epoch_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, epochs=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("bpd/val")] == [1, 2]
    assert len(events.Scalars("bpd/test")) == 1


def test_tensorboard_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"tensorboard package \(pip install tensorboard\)"):
        train(tiny_config(tmp_path, tensorboard=True))
    assert list(tmp_path.iterdir()) == []


def test_the_loop_reads_the_device_a_fixed_number_of_times_per_epoch(tmp_path, monkeypatch):
    """Host reads (``item``, ``tolist``, ``bool``, ``float``, ``int``) made by flowkit/training
    code during a run do not grow with the number of steps (the model's own checks aside)."""
    training_dir = os.path.dirname(sys.modules["flowkit.training"].__file__)
    reads = {"n": 0}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(training_dir):
                reads["n"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for steps in (2, 12):
        reads["n"] = 0
        train(tiny_config(tmp_path / str(steps), max_train_batches=steps, importance_samples=0))
        counts.append(reads["n"])
    assert counts[0] == counts[1] and counts[0] > 0, counts


# -- evaluation, baseline, options ---------------------------------------------------------------


def test_evaluate_matches_the_model_bounds():
    from flowkit.data import load_splits
    from flowkit.models import build_model

    torch.manual_seed(0)
    model = build_model("glow", (1, 8, 8), 17, **TINY)
    data = load_splits("digits")["test"]
    x = torch.stack([data[i][0] for i in range(32)])
    model.initialize(x)
    loader = [(x[:16], None), (x[16:], None)]  # a DataLoader would draw from the global RNG

    torch.manual_seed(1)
    one = evaluate_bpd(model, loader, importance_samples=1)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = torch.cat([model.bpd(x[:16]), model.bpd(x[16:])]).mean().item()
    assert one == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(1)
    many = evaluate_bpd(model, loader, importance_samples=4)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = (
            torch.cat([model.bpd_importance(x[:16], num_samples=4), model.bpd_importance(x[16:], num_samples=4)])
            .mean()
            .item()
        )
    assert many == pytest.approx(expected, abs=1e-6)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="importance_samples"):
        evaluate_bpd(model, loader, importance_samples=0)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_bpd(model, [], importance_samples=1)


def test_independent_pixel_bpd_is_the_smoothed_histogram_entropy():
    train_images = torch.zeros(8, 1, 1, 2, dtype=torch.long)
    train_images[:2, 0, 0, 1] = 1  # pixel 1: two 1s, six 0s
    test_images = torch.tensor([[[[0, 1]]]])
    # pixel 0: p(0) = (8+1)/(8+2); pixel 1: p(1) = (2+1)/(8+2)
    expected = -(math.log2(9 / 10) + math.log2(3 / 10)) / 2
    assert independent_pixel_bpd(train_images, test_images, 2) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="test_images"):
        independent_pixel_bpd(train_images, torch.tensor([[[[0, 2]]]]), 2)


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("epochs", 0, ValueError),
        ("batch_size", -1, ValueError),
        ("lr", 0.0, ValueError),
        ("lr_decay", 1.5, ValueError),
        ("grad_clip", -1.0, ValueError),
        ("device", "tpu", ValueError),
        ("importance_samples", -1, ValueError),
        ("max_train_batches", 0, ValueError),
        ("threads", -1, ValueError),
        ("epochs", True, TypeError),
        ("tensorboard", 1, TypeError),
        ("model", 3, TypeError),
        ("model", "pkg.mod", ValueError),
        ("overwrite", True, ValueError),  # with resume=True below
    ],
)
def test_config_rejects_bad_options(tmp_path, field, value, error):
    config = tiny_config(tmp_path, **{field: value})
    if field == "overwrite":
        config.resume = True
    with pytest.raises(error, match=field):
        config.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_but_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_threads_apply_during_the_run_and_are_restored(tmp_path):
    seen = []

    class Threads(Hook):
        def on_epoch_start(self, run, epoch, num_batches):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    train(tiny_config(tmp_path, threads=2, importance_samples=0), hooks=[Threads()])
    assert seen == [2] and torch.get_num_threads() == before


def test_uniform_dequantization_in_float64_trains(tmp_path):
    """A user's model in float64 (what catches dtype slips): fused Adam and the masks follow it."""
    model = hand_glow((1, 8, 8), 17, num_scales=1, steps=1, hidden=4).double()
    assert isinstance(model.dequantization, Dequantization)
    result = train(tiny_config(tmp_path, model=None, importance_samples=1), model=model)
    assert math.isfinite(result.test_bpd) and next(model.parameters()).dtype == torch.float64


@pytest.mark.cuda
def test_train_runs_on_cuda(tmp_path):
    result = train(tiny_config(tmp_path, device="cuda", model_kwargs={**TINY, "dequantization": "variational"}))
    assert math.isfinite(result.test_bpd)
    model, _ = load_checkpoint(tmp_path / "best.pt", device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.sample(2).device.type == "cuda"


def test_evaluate_is_a_deprecated_alias_of_evaluate_bpd():
    from flowkit.models import glow
    from flowkit.training import evaluate

    model = glow((1, 8, 8), num_levels=17, **TINY)
    batch = torch.randint(0, 17, (4, 1, 8, 8))
    torch.manual_seed(0)
    expected = evaluate_bpd(model, [batch], importance_samples=1)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="evaluate_bpd"):
        assert evaluate(model, [batch], importance_samples=1) == expected
