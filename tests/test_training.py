"""The training pipeline (flowkit.training): outputs, resume, non-finite losses, checkpoints."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import flowkit.training as training
from flowkit.training import (
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    independent_pixel_bpd,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    train,
)

TINY = {"levels": 1, "steps_per_level": 1, "hidden_channels": 4, "num_layers": 0, "dequantization": "uniform"}


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
    )
    options.update(overrides)
    return TrainConfig(**options)


def test_train_writes_checkpoints_metrics_and_pictures(tmp_path):
    result = train(tiny_config(tmp_path, epochs=2))
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.json", "samples.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["val_bpd"])) and math.isfinite(float(r["train_bpd"])) for r in rows)
    assert float(rows[1]["lr"]) == pytest.approx(2e-3 * 0.99)  # StepLR after one epoch
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["test_bpd"] == pytest.approx(result["test_bpd"]) and math.isfinite(result["test_bpd"])
    assert summary["best_epoch"] == result["best_epoch"] and len(summary["history"]) == 2

    model, payload = load_checkpoint(tmp_path / "last.pt", "cpu")
    assert payload["epoch"] == 2 and payload["model"]["name"] == "glow" and payload["model"]["kwargs"] == TINY
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == result["num_parameters"]
    # the rebuilt model is the trained one: same ActNorm init flag and parameters
    state = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_resume_continues_the_same_trajectory(tmp_path):
    full = train(tiny_config(tmp_path / "full", epochs=3))
    train(tiny_config(tmp_path / "cut", epochs=1))  # "interrupted" after one epoch
    resumed = train(tiny_config(tmp_path / "cut", epochs=3, resume=True))

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert b["epoch"] == 3
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for ha, hb in zip(full["history"], resumed["history"], strict=True):
        assert hb["train_bpd"] == pytest.approx(ha["train_bpd"], abs=1e-6)
        assert hb["val_bpd"] == pytest.approx(ha["val_bpd"], abs=1e-6)
        assert hb["lr"] == pytest.approx(ha["lr"], rel=1e-12)
    assert resumed["test_bpd"] == pytest.approx(full["test_bpd"], abs=1e-6)


def test_resume_without_checkpoint_or_with_other_model_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path, resume=True))
    train(tiny_config(tmp_path, max_train_batches=1, importance_samples=0))
    with pytest.raises(ValueError, match="resume"):
        train(tiny_config(tmp_path, epochs=2, resume=True, model_kwargs={**TINY, "hidden_channels": 8}))


def _poison_training_loss(monkeypatch, bad_calls):
    """Make the model's training-mode ``bpd`` return NaN on the listed calls (1-based)."""
    build = training._build_model
    calls = {"n": 0}

    def build_poisoned(spec):
        model = build(spec)
        clean_bpd = model.bpd

        def bpd(x):
            out = clean_bpd(x)
            if model.training:
                calls["n"] += 1
                if bad_calls is None or calls["n"] in bad_calls:
                    return out * torch.nan
            return out

        model.bpd = bpd
        return model

    monkeypatch.setattr(training, "_build_model", build_poisoned)
    return calls


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, bad_calls={2, 3})
    result = train(tiny_config(tmp_path, max_train_batches=4, importance_samples=0))
    assert result["skipped_steps"] == 2 and result["history"][0]["skipped_steps"] == 2
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in payload["state_dict"].values() if v.is_floating_point())


def test_nonfinite_losses_in_a_row_stop_the_run_without_a_checkpoint(tmp_path, monkeypatch):
    _poison_training_loss(monkeypatch, bad_calls=None)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        train(tiny_config(tmp_path, max_nonfinite=3, max_train_batches=10))
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_nonfinite_loss_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # epoch 1 has 3 clean steps; everything after is NaN -> stop during epoch 2
    _poison_training_loss(monkeypatch, bad_calls=set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match="last.pt"):
        train(tiny_config(tmp_path, epochs=2, max_nonfinite=2))
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["epoch"] == 1


def test_save_checkpoint_refuses_nonfinite_state_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    good = {"format": training.CHECKPOINT_FORMAT, "state_dict": {"w": torch.ones(3)}, "optimizer": {}}
    save_checkpoint(good, path)
    before = path.read_bytes()
    for bad in ({"w": torch.tensor([1.0, math.nan, 0.0])}, {"w": torch.tensor([math.inf])}):
        with pytest.raises(NonFiniteLossError, match="state_dict.w"):
            save_checkpoint({**good, "state_dict": bad}, path)
    with pytest.raises(NonFiniteLossError, match="optimizer"):
        save_checkpoint({**good, "optimizer": {"state": {0: {"exp_avg": torch.tensor([math.nan])}}}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_checkpoint_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(training.os, "fsync", failing_fsync)  # fails after the temp file is half written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_evaluate_matches_the_model_bounds(tmp_path):
    from flowkit.data import load_splits
    from flowkit.models import build_model

    torch.manual_seed(0)
    model = build_model("glow", (1, 8, 8), 17, **TINY)
    data = load_splits("digits")["test"]
    x = torch.stack([data[i][0] for i in range(32)])
    model.initialize(x)
    loader = [(x[:16], None), (x[16:], None)]  # a DataLoader would draw from the global RNG

    torch.manual_seed(1)
    one = evaluate(model, loader, importance_samples=1)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = torch.cat([model.bpd(x[:16]), model.bpd(x[16:])]).mean().item()
    assert one == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(1)
    many = evaluate(model, loader, importance_samples=4)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = torch.cat([model.bpd_importance(x[:16], 4), model.bpd_importance(x[16:], 4)]).mean().item()
    assert many == pytest.approx(expected, abs=1e-6)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="importance_samples"):
        evaluate(model, loader, importance_samples=0)


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
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", -1),
        ("lr", 0.0),
        ("lr_decay", 1.5),
        ("grad_clip", -1.0),
        ("device", "tpu"),
        ("importance_samples", -1),
        ("max_train_batches", 0),
    ],
)
def test_config_rejects_bad_options(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(tmp_path, **{field: value}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_but_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.cuda
def test_train_runs_on_cuda(tmp_path):
    result = train(tiny_config(tmp_path, device="cuda", model_kwargs={**TINY, "dequantization": "variational"}))
    assert math.isfinite(result["test_bpd"])
    model, _ = load_checkpoint(tmp_path / "best.pt", "cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.sample(2).device.type == "cuda"
