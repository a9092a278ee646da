"""Distributed training (flowkit.training under torchrun / DDP) on 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowkit.training.hooks
import flowkit.training.run
from flowkit.distributed import DistributedContext, setup
from flowkit.layers.dequantization import Dequantization
from flowkit.models import build_model
from flowkit.training import ConfigError, TrainConfig, train

TINY = {"num_scales": 1, "steps_per_scale": 1, "hidden_channels": 4, "num_layers": 0, "dequantization": "uniform"}
GLOBAL_BATCH = 16


def _config(out, batch_size=GLOBAL_BATCH, **overrides) -> TrainConfig:
    options = dict(
        data="digits",
        model="glow",
        model_kwargs=dict(TINY),
        epochs=2,
        batch_size=batch_size,
        lr=2e-3,
        seed=5,
        device="cpu",
        out=str(out),
        importance_samples=2,
        max_train_batches=3,
        max_eval_batches=2,
        num_samples=4,
        init_batch_size=32,
        progress=False,
        ema_decay=0.0,  # the checkpoints hold the ranks' weights themselves (compared below)
        warmup_steps=0,  # the full lr from the first step: a wrong gradient average shows (below)
    )
    options.update(overrides)
    return TrainConfig(**options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed_noise(inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantization noise as a fixed function of each image (pixel values and positions),
    independent of the rank, the batch and the RNG: the same image gets the same noise in a
    2-process and a 1-process run, so their only difference is the gradient averaging."""
    pos = torch.arange(inputs[0].numel(), dtype=dtype).view(inputs.shape[1:])
    return torch.frac(0.5 + 0.6180339887 * inputs.to(dtype) + 0.7548776662 * pos)


def _instrument(setattr_, record: dict, poison_call: int | None, conditional: bool = False):
    """Fixed noise (the RNG's noise is still drawn and its first draw recorded), a count of
    checkpoint writes, and the model to train (an instance, as a user passes one; class-conditional
    with ``conditional``) with a NaN loss on training call ``poison_call``."""
    record.update(noise=None, saves=0, calls=0)
    real_noise = Dequantization.sample_noise

    def sample_noise(self, inputs):
        drawn = real_noise(self, inputs)
        if record["noise"] is None and record["calls"] > 0:  # training noise (not ActNorm's init batch)
            record["noise"] = drawn.flatten()[:64].clone()
        return _fixed_noise(inputs, drawn.dtype)

    save = flowkit.training.hooks.save_checkpoint

    def counting_save(checkpoint, path):
        record["saves"] += 1
        return save(checkpoint, path)

    setattr_(Dequantization, "sample_noise", sample_noise)
    setattr_(flowkit.training.hooks, "save_checkpoint", counting_save)

    torch.manual_seed(5)  # every rank builds the same model (and train() broadcasts rank 0's anyway)
    classes = {"num_classes": 10} if conditional else {}
    model = record["model"] = build_model("glow", (1, 8, 8), 17, **TINY, **classes)
    clean_bpd = model.bpd

    def bpd(x, *args, **kwargs):
        if model.training:
            record["calls"] += 1
        out = clean_bpd(x, *args, **kwargs)
        if model.training and record["calls"] == poison_call:
            return out * torch.nan
        return out

    model.bpd = bpd
    return model


def _max_diff(a: dict, b: dict) -> float:
    """Largest ``|a - b|`` over the floating tensors of two state dicts (the others must be equal)."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


def _worker(rank: int, world: int, port: int, out: str, results: str, conditional: bool = False) -> None:
    # exactly what torchrun gives each process; train() sets up the process group itself
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    record: dict = {}
    model = _instrument(setattr, record, 2 if rank == 1 else None, conditional)  # a NaN loss on rank 1 only
    result = train(_config(out, model=None, conditional=conditional), model=model)
    assert not dist.is_initialized(), "train() must destroy the process group it created"
    torch.save(
        {
            "state": record["model"].state_dict(),
            "noise": record["noise"],
            "saves": record["saves"],
            "result": {
                "history": [h.to_dict() for h in result.history],
                "test_bpd": result.test_bpd,
                "skipped_steps": result.skipped_steps,
                "world_size": result.world_size,
            },
        },
        os.path.join(results, f"rank{rank}.pt"),
    )


def _single_process(out, batch_size: int = GLOBAL_BATCH, conditional: bool = False) -> tuple[dict, dict]:
    """``(final state_dict, summary)`` of an instrumented one-process run."""
    record: dict = {}
    with pytest.MonkeyPatch.context() as mp_:
        model = _instrument(mp_.setattr, record, 2, conditional)
        result = train(_config(out, batch_size, model=None, conditional=conditional), model=model)
    return model.state_dict(), result


def _two_processes(tmp, conditional: bool = False) -> tuple[object, list[dict]]:
    """``(out, [rank 0's record, rank 1's])`` of a 2-process gloo run (forked workers with
    torchrun's environment variables; forked after the caller imported everything)."""
    out, results = tmp / "ddp", tmp / "ranks"
    results.mkdir()
    args = (2, _free_port(), str(out), str(results), conditional)
    procs = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 300  # a hung collective must fail the test, not stall CI
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("2-process gloo run did not finish within 300 s")
    return out, [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process runs (global batch, half batch), then one 2-process gloo run."""
    tmp = tmp_path_factory.mktemp("runs")
    single = _single_process(tmp / "single")
    half = _single_process(tmp / "half", GLOBAL_BATCH // 2)
    out, ranks = _two_processes(tmp)
    return {"out": out, "ranks": ranks, "single": single, "half": half}


def test_ranks_end_identical_and_match_one_process_on_the_same_global_batch(runs):
    out, (r0, r1) = runs["out"], runs["ranks"]
    # both ranks hold bit-identical parameters and buffers; rank 0's last.pt is that state
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["world_size"] == 2 and saved["epoch"] == 2
    for key, value in r0["state"].items():
        assert torch.equal(saved["state_dict"][key], value), key

    # one process with global batch 16 sees the same images per step (the sampler's permutation
    # is shared) and, with the fixed noise, differs only in how the gradient is summed
    single_state, single = runs["single"]
    diff = _max_diff(single_state, r0["state"])
    print(f"max |2-process - 1-process| = {diff:.2e}")
    assert diff < 1e-5, f"2-process and 1-process training differ by {diff:.2e}"
    # the comparison can fail: half the global batch per step (what a rank that did not average
    # its gradients would use) lands far away
    half = _max_diff(runs["half"][0], single_state)
    print(f"max |half batch - global batch| = {half:.2e}")
    assert half > 100 * 1e-5, half

    # metrics reduced over the ranks equal the single-process ones (fixed noise: deterministic bpd)
    for a, b in zip(r0["result"]["history"], single.history, strict=True):
        assert a["val_bpd"] == pytest.approx(b.val_bpd, abs=1e-4)
        assert a["train_bpd"] == pytest.approx(b.train_bpd, abs=1e-4)
    assert r0["result"]["test_bpd"] == pytest.approx(single.test_bpd, abs=1e-4)
    untimed = [[{k: v for k, v in h.items() if k != "time_s"} for h in r["result"]["history"]] for r in (r0, r1)]
    assert untimed[0] == untimed[1]  # every rank returns the same reduced metrics
    assert r0["result"]["test_bpd"] == r1["result"]["test_bpd"]
    assert r0["result"]["world_size"] == 2


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(runs):
    r0, r1 = runs["ranks"]
    assert r0["result"]["skipped_steps"] == r1["result"]["skipped_steps"] == 1
    assert r0["result"]["history"][0]["skipped_steps"] == 1


def test_ranks_draw_different_noise_and_only_rank_0_writes(runs):
    out, (r0, r1) = runs["out"], runs["ranks"]
    assert r0["noise"].shape == r1["noise"].shape
    assert not torch.allclose(r0["noise"], r1["noise"])
    assert r0["saves"] == 4 and r1["saves"] == 0  # last.pt + best.pt, 2 epochs (val improves with fixed noise)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "curves.png", "last.pt", "metrics.csv", "metrics.json", "samples.png"]


def test_a_conditional_model_trains_on_two_processes_as_on_one(tmp_path):
    """Labels travel with their images: both ranks end identical and equal one process on the
    same global batch, as for an unconditional model."""
    single_state, single = _single_process(tmp_path / "single", conditional=True)
    out, (r0, r1) = _two_processes(tmp_path, conditional=True)
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert "prior.loc" in r0["state"] and "context_encoder.weight" in r0["state"]
    diff = _max_diff(single_state, r0["state"])
    print(f"conditional: max |2-process - 1-process| = {diff:.2e}")
    assert diff < 1e-5, diff
    assert r0["result"]["test_bpd"] == pytest.approx(single.test_bpd, abs=1e-4)
    assert torch.load(out / "last.pt", weights_only=True)["num_classes"] == 10


@pytest.mark.slow
def test_torchrun_cli_trains_on_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "flowkit",
        "train",
        "--data",
        "digits",
        "--model",
        "glow",
        "--model-kwargs",
        json.dumps(TINY),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-train-batches",
        "2",
        "--max-eval-batches",
        "1",
        "--importance-samples",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("epoch 1/1: train") == 1, proc.stdout  # rank 0 prints, once
    assert proc.stdout.count("on 2 processes") == 1, proc.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["test_bpd"] > 0
    assert (out / "best.pt").is_file() and (out / "samples.png").is_file()
    saved = torch.load(out / "last.pt", weights_only=True)  # the default weight average, on every rank alike
    assert saved["ema"]["updates"] == 2 and saved["train_state_dict"].keys() == saved["state_dict"].keys()


def test_global_batch_must_divide_over_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(
        flowkit.training.run, "setup_distributed", lambda device: DistributedContext(rank=0, world_size=3)
    )
    with pytest.raises(ConfigError, match="batch_size: 16 is the global batch .* 3 processes"):
        train(_config(tmp_path))
    assert not tmp_path.joinpath("last.pt").exists()


def test_setup_outside_torchrun_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        setup("cpu")
