"""``flowkit train`` / ``evaluate`` / ``sample`` / ``analyze`` / ``demo``: tiny runs, the README's
commands as written, a user's own flow by import path in fresh processes, run folders, user
errors (one ``error:`` line, exit 2), Ctrl-C (exit 130) and a closed pipe."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowkit.cli import main
from flowkit.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_scales": 1, "steps_per_scale": 1, "hidden_channels": 4, "num_layers": 0, "dequantization": "uniform"}
FLOWKIT = Path(sys.executable).parent / "flowkit"  # the console script a user runs


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


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


def _one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "glow"
    assert main(_train_args(out, 1)) == 0
    return out


def test_train_then_resume_with_the_stored_options(run_dir, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--epochs", "2", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2" in text and "epoch 1/2" not in text  # resumed after epoch 1
    assert re.search(r"test bpd \d+\.\d+ \(importance sampling, 2 samples\)", text)
    assert "\r" not in text  # not a terminal: no progress bars, one line per epoch
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    stored = torch.load(run_dir / "last.pt", weights_only=True)["config"]
    assert stored["epochs"] == 2 and stored["model_kwargs"] == TINY and stored["batch_size"] == 16
    assert stored["threads"] == 1  # the CPU default
    for name in ("best.pt", "last.pt", "samples.png", "curves.png", "metrics.json"):
        assert (run_dir / name).is_file()


def test_resume_refuses_a_changed_option_naming_its_flag(run_dir, capsys):
    before = (run_dir / "last.pt").read_bytes()
    assert main(["train", "--out", str(run_dir), "--epochs", "3", "--resume", "--lr", "0.01"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--lr is 0.01 but the run was started with {TrainConfig.lr}" in line and "--epochs" in line
    assert main(["train", "--out", str(run_dir), "--resume", "--overwrite"]) == 2
    assert "overwrite: a resumed run continues the run in out" in _one_error_line(capsys.readouterr().err)
    assert main(["train", "--out", str(run_dir), "--resume", "--batch-size", "16", "--epochs", "1"]) == 0  # same value
    assert (run_dir / "last.pt").read_bytes() == before  # epochs=1 < 2 done: nothing to train


def test_a_folder_holding_a_run_is_refused_untouched(run_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(_train_args(run_dir, 1)) == 2
    assert "already holds a run" in _one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(_train_args(copy, 1, "--overwrite", "--seed", "7")) == 0
    assert torch.load(copy / "last.pt", weights_only=True)["config"]["seed"] == 7


def test_evaluate_prints_the_test_bpd(run_dir, capsys):
    capsys.readouterr()
    args = ["evaluate", "--checkpoint", str(run_dir / "best.pt"), "--split", "test", "--importance-samples", "2"]
    assert main([*args, "--max-batches", "2", "--batch-size", "16", "--device", "cpu", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    match = re.search(r"test bpd: (\d+\.\d+) \(importance sampling, 2 samples; 32 images of digits; glow", text)
    assert match, text
    assert 0.5 < float(match.group(1)) < 6.0


def test_sample_writes_a_png_grid(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(run_dir / "last.pt"), "--n", "9", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 9 samples" in capsys.readouterr().out


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    good = next(Path(folder).glob("*/last.pt"), None)
    files = {"missing": folder / "missing.pt", "folder": folder}
    for name, content in {"empty": b"", "random": os.urandom(500), "truncated": good.read_bytes()[:300]}.items():
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(content)
    files["foreign"] = folder / "foreign.pt"
    torch.save({"a": 1}, files["foreign"])
    return files


@pytest.mark.parametrize("command", ["evaluate", "sample", "analyze"])
def test_bad_checkpoints_are_one_error_line_in_every_command(run_dir, tmp_path, capsys, command):
    shutil.copytree(run_dir, tmp_path / "run")
    for name, path in _bad_checkpoints(tmp_path).items():
        args = [command, "--checkpoint", str(path), "--device", "cpu"]
        args += ["--out", str(tmp_path / ("a" if command == "analyze" else "s.png"))] if command != "evaluate" else []
        assert main(args) == 2, name
        line = _one_error_line(capsys.readouterr().err)
        assert "checkpoint" in line and "weights_only" not in line, (name, line)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sample", "--n", "0"], "--n: expected an int >= 1, got 0"),
        (["sample", "--temperature", "0"], "--temperature: expected a finite number > 0"),
        (["sample", "--out", "{tmp}"], "is a folder; expected a file name"),
        (["sample", "--out", "{tmp}/file.txt/grid.png"], "is a file, not a folder"),
        (["analyze", "--out", "{tmp}/file.txt"], "is a file; expected a folder"),
        (["analyze", "--num-images", "1", "--out", "{tmp}/a"], "--num-images: expected an int >= 2"),
        (["analyze", "--data", "mnist", "--data-root", "{tmp}/nodata", "--out", "{tmp}/a"], "is not in"),
        (["evaluate", "--importance-samples", "0"], "--importance-samples: expected an int >= 1"),
        (["evaluate", "--data-root", "{tmp}/nodata"], None),  # digits needs no files: works
    ],
)
def test_user_errors_are_one_line_and_exit_2(run_dir, tmp_path, capsys, args, expected):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv += ["--checkpoint", str(run_dir / "best.pt"), "--device", "cpu"]
    if argv[0] == "evaluate":
        argv += ["--max-batches", "1", "--importance-samples", "1"] if expected is None else []
    code = main(argv)
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0, err
        return
    assert code == 2 and expected in _one_error_line(err), err


@pytest.mark.parametrize("command", ["train", "sample", "analyze", "demo"])
def test_an_out_that_cannot_be_written_is_one_error_line(run_dir, tmp_path, capsys, monkeypatch, command):
    """A read-only folder (simulated: the tests may run as root, who may write anywhere)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    out = str(locked / ("grid.png" if command == "sample" else "out"))
    argv = {
        "train": _train_args(out, 1),
        "sample": ["sample", "--checkpoint", str(run_dir / "best.pt"), "--out", out, "--device", "cpu"],
        "analyze": ["analyze", "--checkpoint", str(run_dir / "best.pt"), "--out", out, "--device", "cpu"],
        "demo": ["demo", "--epochs", "1", "--out", out, "--no-progress"],
    }[command]
    assert main(argv) == 2
    assert f"cannot write in {locked} (permission denied)" in _one_error_line(capsys.readouterr().err)
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write in a read-only folder")
def test_a_really_read_only_out_is_one_error_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(_train_args(locked / "run", 1)) == 2
        assert "permission denied" in _one_error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--out", "{tmp}/file.txt"], "out: {tmp}/file.txt is a file; expected a folder"),
        (["--data", "mnist", "--data-root", "{tmp}/nodata"], "data set 'mnist' (MNIST) is not in"),
        (["--data", "cifar10", "--data-root", "{tmp}/nodata"], "data set 'cifar10' (CIFAR10) is not in"),
        (["--model", "no_such_module:build"], "cannot import 'no_such_module'"),
        (["--model", "realnvp"], "model: expected one of glow"),
        (["--model-kwargs", '{"num_scales": 9}'], "model: glow(image_shape=(1, 8, 8)"),
        (["--lr", "-1"], "lr: expected a finite number > 0"),
        (["--data", "svhn"], "data: expected one of 'digits'"),
        (["--val-size", "5000"], "val_size: 5000 leaves no training images"),
        (["--resume", "--out", "{tmp}/none"], "resume: no checkpoint at"),
        (["--resume", "--overwrite", "--out", "{tmp}/none"], "resume: no checkpoint at"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_train_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, extra, expected, monkeypatch):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    import torchvision.datasets as tvd

    (tmp_path / "file.txt").write_text("x")
    argv = _train_args(tmp_path / "run", 1) + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "--device" in extra:
        del argv[argv.index("cpu") - 1 : argv.index("cpu") + 1]  # the first --device cpu
    monkeypatch.setattr(tvd.MNIST, "download", _no_internet)  # fail fast, as without a network
    monkeypatch.setattr(tvd.CIFAR10, "download", _no_internet)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected.replace("{tmp}", str(tmp_path)) in _one_error_line(err), err
    assert not (tmp_path / "run").exists()


def _no_internet(*args, **kwargs):
    raise RuntimeError("no internet in the tests")


def test_demo_on_tiny_settings(tmp_path, capsys):
    argv = ["demo", "--epochs", "1", "--max-train-batches", "2", "--importance-samples", "1", "--out", str(tmp_path)]
    code = main([*argv, "--no-progress"])
    text = capsys.readouterr().out
    assert "independent-pixel baseline" in text and "parameters" in text
    baseline = float(re.search(r"independent-pixel baseline .* (\d+\.\d+)\n", text).group(1))
    assert baseline == pytest.approx(2.41, abs=0.01)  # sklearn digits, 17 levels
    # two steps of training cannot beat the baseline: the demo says so and fails
    assert code == 1 and "NOT below" in text
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "curves.png").is_file()
    assert str(tmp_path / "samples.png") in text
    assert main([*argv, "--no-progress"]) == 1  # a demo run is replaced by the next demo
    train_dir = tmp_path / "train"
    assert main(_train_args(train_dir, 1)) == 0
    assert main(["demo", "--epochs", "1", "--out", str(train_dir)]) == 2  # any other run is not
    assert "already holds a run" in capsys.readouterr().err


# -- the README's commands, as written (only the epochs made smaller) -------------------------------


def _readme_training_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training\n") : text.index("\n## ", text.index("## Training\n") + 1)]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


FEWER_EPOCHS = {"40": "1", "60": "2", "10": "1", "20": "2"}


@pytest.mark.slow
def test_readme_training_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    blocks = _readme_training_blocks()
    commands = 0
    for kind, body in blocks:
        if kind == "python" and body.startswith("# my_flows.py"):
            (tmp_path / "my_flows.py").write_text(body)
        elif kind == "python":
            body = re.sub(r"epochs=(\d+)", lambda m: f"epochs={FEWER_EPOCHS[m.group(1)]}", body)
            exec(compile(body, "README.md", "exec"), {})
        else:
            for line in body.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                assert argv[0] == "flowkit", line
                argv = [FEWER_EPOCHS[a] if argv[i - 1] == "--epochs" else a for i, a in enumerate(argv) if i]
                assert main(argv) == 0, (line, capsys.readouterr().err)
                commands += 1
    assert commands == 8
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "runs/mine/analysis/analysis.json").is_file()
    assert torch.load(tmp_path / "runs/glow/last.pt", weights_only=True)["epoch"] == 2  # resumed to "60"
    assert torch.load(tmp_path / "runs/x/last.pt", weights_only=True)["epoch"] == 2  # resumed to "20"
    sys.modules.pop("my_flows", None)


# -- a user's own flow by import path, in fresh processes -------------------------------------------


@pytest.mark.slow
def test_a_user_module_flow_trains_and_a_fresh_process_evaluates_samples_and_analyzes_it(tmp_path):
    shutil.copy(Path(__file__).with_name("user_flows.py"), tmp_path / "my_flows.py")
    train = [str(FLOWKIT), "train", "--model", "my_flows:hand_glow", "--model-kwargs", '{"hidden": 4, "steps": 1}']
    train += ["--epochs", "1", "--out", "run", "--batch-size", "32", "--max-train-batches", "3"]
    train += ["--max-eval-batches", "1", "--importance-samples", "1", "--device", "cpu"]
    proc = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "my_flows:hand_glow on digits" in proc.stdout
    script = """
import sys
from flowkit.cli import main
codes = [
    main(["evaluate", "--checkpoint", "run/best.pt", "--importance-samples", "1", "--max-batches", "1", "--device", "cpu"]),
    main(["sample", "--checkpoint", "run/best.pt", "--n", "4", "--out", "grid.png", "--device", "cpu"]),
    main(["analyze", "--checkpoint", "run/best.pt", "--num-images", "4", "--temperatures", "0.5,1", "--out", "an"]),
]
assert "my_flows" in sys.modules  # rebuilt from the recipe, by importing the user's module
sys.exit(max(codes))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test bpd:" in proc.stdout and "my_flows:hand_glow from epoch 1" in proc.stdout
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "an" / "analysis.json").is_file()


# -- signals -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_within_a_second_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [str(FLOWKIT), *_train_args(out, 10_000)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)  # inside a later epoch
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"continue with: flowkit train --out {out} --resume" in lines[0], stderr
    print(f"stopped {stopped_in:.2f} s after SIGINT")
    assert stopped_in < 1.5, stopped_in  # a second, with slack for a shared machine
    epoch = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and main(["train", "--out", str(out), "--resume", "--epochs", str(epoch + 1)]) == 0


def test_a_closed_pipe_exits_quietly(tmp_path):
    # `flowkit check | head -c 10`, with check printing far more than a pipe holds
    script = (
        "import sys, flowkit.check as c, flowkit.commands.check as cc; from flowkit.cli import main; "
        "cc.run_checks = lambda: []; c.format_reports = lambda reports: 'x' * 2_000_000; sys.exit(main(['check']))"
    )
    shell = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.strip() == "141" and proc.stderr == "", proc.stderr


@pytest.mark.cuda
def test_train_cli_on_cuda(tmp_path):
    args = _train_args(tmp_path, 1)
    args[args.index("cpu")] = "cuda"
    assert main(args) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
