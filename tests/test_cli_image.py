"""``flowkit train`` / ``evaluate`` / ``sample`` / ``demo`` on tiny settings."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from flowkit.cli import main

TINY = {"levels": 1, "steps_per_level": 1, "hidden_channels": 4, "num_layers": 0, "dequantization": "uniform"}


def _train_args(out, epochs, *extra):
    return [
        "train",
        "--data",
        "digits",
        "--model",
        "glow",
        "--model-kwargs",
        json.dumps(TINY),
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--max-train-batches",
        "2",
        "--max-eval-batches",
        "2",
        "--importance-samples",
        "2",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(_train_args(out, 1)) == 0
    return out


def test_train_then_resume(run_dir, capsys):
    capsys.readouterr()
    assert main(_train_args(run_dir, 2, "--resume")) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2" in text and "epoch 1/2" not in text  # resumed after epoch 1
    assert re.search(r"test bpd \d+\.\d+ \(importance sampling, 2 samples\)", text)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for name in ("best.pt", "last.pt", "samples.png", "curves.png", "metrics.json"):
        assert (run_dir / name).is_file()


def test_train_reports_bad_options(tmp_path, capsys):
    assert main(_train_args(tmp_path, 1, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().out
    assert main(_train_args(tmp_path, 1, "--lr", "-1")) == 2
    assert "lr" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(_train_args(tmp_path, 1, "--model-kwargs", "[1]"))


def test_evaluate_prints_the_test_bpd(run_dir, capsys):
    capsys.readouterr()
    args = [
        "evaluate",
        "--checkpoint",
        str(run_dir / "best.pt"),
        "--split",
        "test",
        "--importance-samples",
        "2",
        "--max-batches",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    match = re.search(r"test bpd: (\d+\.\d+) \(importance sampling, 2 samples; 32 images of digits", text)
    assert match, text
    assert 0.5 < float(match.group(1)) < 6.0
    assert main(["evaluate", "--checkpoint", str(run_dir / "missing.pt")]) == 2
    assert "no file" in capsys.readouterr().out


def test_sample_writes_a_png_grid(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = [
        "sample",
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--n",
        "9",
        "--temperature",
        "0.7",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 9 samples" in capsys.readouterr().out
    assert main(args[:-4] + ["--temperature", "0", "--out", str(out)]) == 2


def test_demo_on_tiny_settings(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--epochs",
            "1",
            "--max-train-batches",
            "2",
            "--importance-samples",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "independent-pixel baseline" in text and "parameters" in text
    baseline = float(re.search(r"independent-pixel baseline .* (\d+\.\d+)\n", text).group(1))
    assert baseline == pytest.approx(2.41, abs=0.01)  # sklearn digits, 17 levels
    # two steps of training cannot beat the baseline: the demo says so and fails
    assert code == 1 and "NOT below" in text
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "curves.png").is_file()
    assert str(tmp_path / "samples.png") in text


@pytest.mark.cuda
def test_train_cli_on_cuda(tmp_path):
    args = _train_args(tmp_path, 1)
    args[args.index("cpu")] = "cuda"
    assert main(args) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
