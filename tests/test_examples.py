"""Every script in examples/ runs in --quick mode and writes sane outputs.

The examples start together (each single-threaded, as subprocesses of this interpreter) so the
machine's cores share the work; each test then waits for its own example and checks what it
printed and wrote: finite numbers, the JSON it promises, PNGs of the expected size.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = (
    "tutorial_comparison",
    "glow_from_library_parts",
    "mixing_layers",
    "custom_layer",
    "reverse_kl_two_modes",
    "conditional_digits",
    "two_modes_seed",
)
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONWARNINGS": "ignore",
    }
    started = {}
    for name in EXAMPLES:
        work = tmp_path_factory.mktemp(name)
        log = open(work / "stdout.txt", "w")
        cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(work / "out")]
        started[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env), log, work)
    yield started
    for proc, log, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def finish(runs, name) -> tuple[str, Path]:
    """Wait for an example; returns its output and its --out folder (fails with the output's tail)."""
    proc, log, work = runs[name]
    proc.wait(timeout=TIMEOUT_S)
    log.flush()
    text = (work / "stdout.txt").read_text()
    assert proc.returncode == 0, f"examples/{name}.py --quick failed ({proc.returncode}):\n{text[-4000:]}"
    return text, work / "out"


def png_shape(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.is_file(), f"missing picture {path}"
    return imread(str(path)).shape


@pytest.fixture(scope="module")
def samples_grid_shape(tmp_path_factory):
    """Shape of the PNG flowkit.viz.save_image_grid writes for 64 digits with a title."""
    import torch

    from flowkit.viz import save_image_grid

    path = save_image_grid(
        torch.zeros(64, 1, 8, 8, dtype=torch.long), tmp_path_factory.mktemp("grid") / "g.png", 17, title="t"
    )
    return png_shape(path)


def load_json(path: Path) -> dict:
    assert path.is_file(), f"missing {path}"
    return json.loads(path.read_text())


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def engine_run(out: Path) -> dict:
    """The run folder flowkit's engine wrote: checkpoints, metrics.json, samples.png, curves.png."""
    for name in ("last.pt", "best.pt", "samples.png", "curves.png"):
        assert (out / name).is_file(), f"missing {out / name}"
    return load_json(out / "metrics.json")


def test_glow_from_library_parts(runs, samples_grid_shape):
    text, out = finish(runs, "glow_from_library_parts")
    m = engine_run(out)
    history = m["history"]
    assert finite(m["test_bpd"], history[0]["train_bpd"], history[-1]["train_bpd"]) and m["num_parameters"] > 0
    assert 0.5 < m["test_bpd"] < 6.0  # 8x8 digits, 17 levels: uniform would be log2(17) = 4.09 bits
    assert history[-1]["train_bpd"] < history[0]["train_bpd"]
    assert m["model_name"] == "flowkit.models.image_flow.ImageFlow"  # an instance, trained by the engine
    printed = float(re.search(r"test bpd \(\d+ importance samples\): ([0-9.]+)", text).group(1))
    assert printed == pytest.approx(m["test_bpd"], abs=1e-3)
    assert png_shape(out / "samples.png") == samples_grid_shape


def test_mixing_layers(runs, samples_grid_shape):
    text, out = finish(runs, "mixing_layers")
    engine_run(out)
    m = load_json(out / "example.json")
    assert len(m["checks"]) == 3 and all(c["ok"] for c in m["checks"])
    assert all(finite(c["roundtrip_error"], c["jacobian_error"], c["ladj_sum_error"]) for c in m["checks"])
    assert finite(m["test_bpd_before"], m["test_bpd_after"]) and m["test_bpd_after"] < m["test_bpd_before"]
    for source in (
        "flowkit.MaskedAffineCoupling",
        "nflows.SqueezeTransform",
        "nflows.OneByOneConvolution",
        "nflows.AffineCouplingTransform",
        "normflows.AffineCouplingBlock",
    ):
        assert source in text
    assert png_shape(out / "samples.png") == samples_grid_shape


def test_custom_layer_is_verified_and_bugs_are_caught(runs, samples_grid_shape):
    text, out = finish(runs, "custom_layer")
    engine_run(out)
    m = load_json(out / "example.json")
    checks = m["checks"]
    assert checks["LeakyReLUFlow"]["ok"]
    assert not checks["WrongSignInverse"]["ok"] and checks["WrongSignInverse"]["ladj_sum_error"] > 1e-3
    assert not checks["CountsTheWrongHalf"]["ok"] and checks["CountsTheWrongHalf"]["jacobian_error"] > 1e-3
    assert m["learned_slopes"] and all(finite(s) and s > 0 for s in m["learned_slopes"])
    assert finite(m["test_bpd_before"], m["test_bpd_after"]) and m["test_bpd_after"] < m["test_bpd_before"]
    assert png_shape(out / "samples.png") == samples_grid_shape


def test_image_examples_train_through_the_engine():
    """No example hand-writes a training loop: none calls backward or an optimizer itself."""
    for name in (
        "glow_from_library_parts",
        "mixing_layers",
        "custom_layer",
        "tutorial_comparison",
        "conditional_digits",
    ):
        source = (ROOT / "examples" / f"{name}.py").read_text()
        assert "train(" in source, name
        assert ".backward(" not in source and "optim." not in source, name


def test_tutorial_comparison_prints_the_tutorial_table(runs):
    text, out = finish(runs, "tutorial_comparison")
    assert "| Model | Val bpd | Test bpd | Inference time | Sampling time | Parameters |" in text
    md_rows = re.findall(
        r"^\| (simple|vardeq|multiscale) \| ([0-9.]+) \| ([0-9.]+) \| (\d+) ms \| (\d+) ms \| ([0-9,]+) \|$", text, re.M
    )
    assert [r[0] for r in md_rows] == ["simple", "vardeq", "multiscale"]
    # the tutorial's parameter counts (they do not depend on the image size)
    assert [int(r[5].replace(",", "")) for r in md_rows] == [335_128, 379_556, 1_062_090]
    results = load_json(out / "results.json")
    for row in results["rows"]:
        assert finite(row["val_bpd"], row["test_bpd"], row["inference_s"], row["sampling_s"])
        assert (
            0.5 < row["val_bpd"] < 8.0
            and 0.5 < row["test_bpd"] < 8.0
            and row["inference_s"] > 0
            and row["sampling_s"] > 0
        )
    assert (out / "table.md").read_text().count("\n| ") == 4  # separator + three rows
    assert png_shape(out / "dequantization_noise.png") == (480, 800, 4)
    assert png_shape(out / "shared_final_latent.png") == (24 + 6 * (3 * 9 + 1), 60 + 6 * (8 * 9 + 1), 4)
    for kind in ("simple", "vardeq", "multiscale"):
        assert (out / kind / "last.pt").is_file()


def test_reverse_kl_two_modes(runs):
    text, out = finish(runs, "reverse_kl_two_modes")
    m = load_json(out / "metrics.json")
    for run in m["runs"].values():
        assert finite(run["reverse_kl"], run["ess"], run["log_z"], run["log_z_estimate"])
        assert run["reverse_kl"] > -0.05 and 0.0 < run["ess"] <= 1.0
    assert "KL(q||p)" in text
    for name in m["files"]:
        h, w, c = png_shape(out / name)
        assert h >= 200 and w >= 200 and c in (3, 4)


def test_conditional_digits_draws_one_row_per_class(runs):
    text, out = finish(runs, "conditional_digits")
    m = engine_run(out)
    assert m["config"]["conditional"] is True and finite(m["test_bpd"]) and 0.5 < m["test_bpd"] < 6.0
    example = load_json(out / "example.json")
    assert example["test_bpd"] == m["test_bpd"]
    # a few seconds of training already classify the real test digits far above chance (10 %)
    assert 0.2 < example["bayes_accuracy"] <= 1.0, example
    assert f"{example['bayes_accuracy']:.1%}" in text
    zoom = 48 // 8  # save_image_grid: 6 px per pixel of an 8x8 digit; 60 px of row labels, 24 of title
    assert png_shape(out / "class_samples.png") == (24 + zoom * (10 * 9 + 1), 60 + zoom * (10 * 9 + 1), 4)
    assert png_shape(out / "threes.png") == (24 + zoom * (2 * 9 + 1), zoom * (8 * 9 + 1), 4)


def test_two_modes_seed_script_fits_with_one_call(runs):
    text, out = finish(runs, "two_modes_seed")
    m = load_json(out / "metrics.json")
    assert finite(m["reverse_kl"], m["ess"], m["seconds"]) and m["steps"] == 500 and m["seed_kl"] == 0.124
    assert 0.0 <= m["reverse_kl"] < 1.5 and 0.0 < m["ess"] <= 1.0  # 500 quick steps from a random start
    printed = float(re.search(r"KL\(q\|\|p\) = ([0-9.]+) nats", text).group(1))
    assert printed == pytest.approx(m["reverse_kl"], abs=1e-4)
    for name in ("target.png", "initial.png", "learned.png", "snapshots.png", "loss.png"):
        h, w, c = png_shape(out / name)
        assert h >= 200 and w >= 200 and c in (3, 4)
