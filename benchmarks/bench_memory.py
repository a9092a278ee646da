"""Memory and time of plain vs memory-saving (invertible) backprop for Glow.

Not a test.  Two measurements:

* default: for a Glow on 32x32x3 images at several steps per level, the bytes of tensors
  autograd saves for backward in one training forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, unique storages only, parameters included)
  and the wall and CPU time of one training step (forward + backward), plain vs
  ``glow(..., memory_saving=True)``, the two timed interleaved (one step of each per round,
  alternating which goes first) and reported as medians and their ratio; on CUDA also
  ``torch.cuda.max_memory_allocated``.
* ``--drift``: relative gradient difference between memory-saving and plain autograd over
  deep stacks of Glow steps, in float32 and float64 (the numbers in
  :mod:`flowkit.layers.memory_saving`'s docstring).

Usage::

    .venv/bin/python benchmarks/bench_memory.py                  # table, 1 thread, ~ 2 minutes
    .venv/bin/python benchmarks/bench_memory.py --depths 4 8 --batch 4 --coupling clamped-affine
    .venv/bin/python benchmarks/bench_memory.py --drift
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm import tqdm

import flowkit  # noqa: F401  (applies the nflows fixes)
from flowkit.models import glow

__all__ = ["saved_tensor_bytes", "measure", "gradient_drift", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_tensor_bytes(loss_fn) -> tuple[int, torch.Tensor]:
    """``(bytes, loss)``: unique storages saved for backward while ``loss_fn()`` runs."""
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return sum(storages.values()), loss


def _step_seconds(model, x: torch.Tensor) -> tuple[float, float]:
    """Wall and process CPU seconds of one training step (forward + backward)."""
    _sync(x.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    (-model.log_prob(x).mean()).backward()
    _sync(x.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model.zero_grad(set_to_none=True)
    return wall, cpu


def _peak_bytes(model, x: torch.Tensor) -> int | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(x.device)
    _step_seconds(model, x)
    return torch.cuda.max_memory_allocated(x.device)


def measure(models: dict, x: torch.Tensor, rounds: int) -> dict:
    """Saved bytes, median wall and process CPU time (s) of a training step and, on CUDA, peak
    allocated bytes, for each of ``models`` (name -> model), timed interleaved: every round
    runs one step of each model, in alternating order, so load on a shared machine hits all
    alike.  CPU time (all threads) is less disturbed than wall time by other processes."""
    out = {}
    for name, model in models.items():
        model.train()
        nbytes, loss = saved_tensor_bytes(lambda m=model: -m.log_prob(x).mean())
        loss.backward()  # also the warm-up step (allocator, kernels)
        model.zero_grad(set_to_none=True)
        out[name] = {"saved": nbytes, "walls": [], "cpus": [], "peak": _peak_bytes(model, x)}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = _step_seconds(models[name], x)
            out[name]["walls"].append(wall)
            out[name]["cpus"].append(cpu)
    for res in out.values():
        res["time"], res["cpu"] = statistics.median(res.pop("walls")), statistics.median(res.pop("cpus"))
    return out


def run_table(args) -> None:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), generator=gen).to(device)
    rows = []
    for depth in tqdm(args.depths, desc="depths"):
        torch.manual_seed(depth)
        kwargs = dict(
            num_scales=args.num_scales,
            steps_per_scale=depth,
            hidden_channels=args.hidden,
            num_layers=args.num_layers,
            dequantization="uniform",
            coupling=args.coupling,
        )
        plain = glow((3, 32, 32), **kwargs).to(device)
        plain.initialize(x)  # ActNorm data-dependent init, outside the measurement
        saving = glow((3, 32, 32), memory_saving=True, **kwargs).to(device)
        saving.load_state_dict(plain.state_dict())  # same weights (same state_dict keys)
        res = measure({"plain": plain, "saving": saving}, x, args.repeats)
        del plain, saving
        rows.append((depth, res["plain"], res["saving"]))
        tqdm.write(_format_row(rows[-1]))
    print()
    print(
        f"Glow on 32x32x3, num_scales={args.num_scales}, hidden={args.hidden}, num_layers={args.num_layers}, "
        f"coupling={args.coupling}, batch={args.batch}, uniform dequantization, {device}, "
        f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved steps"
    )
    header = (
        f"{'steps/level':>11} {'saved MB plain':>14} {'saved MB saving':>15} {'ratio':>6} "
        f"{'step s plain':>12} {'step s saving':>13} {'ratio':>6} {'CPU s plain':>11} {'CPU s saving':>12} {'ratio':>6}"
    )
    if device.type == "cuda":
        header += f" {'peak MB plain':>13} {'peak MB saving':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(_format_row(row))


def _format_row(row) -> str:
    depth, p, s = row
    mb = 1024.0**2
    line = (
        f"{depth:>11d} {p['saved'] / mb:>14.1f} {s['saved'] / mb:>15.2f} {p['saved'] / s['saved']:>6.1f} "
        f"{p['time']:>12.3f} {s['time']:>13.3f} {s['time'] / p['time']:>6.2f} "
        f"{p['cpu']:>11.3f} {s['cpu']:>12.3f} {s['cpu'] / p['cpu']:>6.2f}"
    )
    if p["peak"] is not None:
        line += f" {p['peak'] / mb:>13.1f} {s['peak'] / mb:>14.1f}"
    return line


def _glow_steps(num_steps: int, channels: int, hidden: int) -> list:
    from nflows.transforms import ActNorm, AffineCouplingTransform, OneByOneConvolution

    from flowkit.layers import gated_conv_net

    steps = []
    for i in range(num_steps):
        mask = [1 if j >= channels // 2 else -1 for j in range(channels)]
        if i % 2:
            mask = [-m for m in mask]
        steps += [
            ActNorm(channels),
            OneByOneConvolution(channels),
            AffineCouplingTransform(mask, gated_conv_net(hidden, 1)),
        ]
    return steps


def _gradients(flow, x: torch.Tensor) -> list[torch.Tensor]:
    flow.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    z, ladj = flow(x)
    (0.5 * z.square().flatten(1).sum(1) - ladj).mean().backward()
    # clones: a later flow.float() would convert the .grad tensors in place
    return [x.grad.clone()] + [p.grad.clone() for p in flow.parameters()]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max over tensors of ``max|u - v| / max|v|``, skipping tensors whose reference gradient
    is (numerically) zero, e.g. the inner layers of a zero-initialised coupling net."""
    top = max(v.abs().max().item() for v in b)
    return max(
        ((u.double() - v.double()).abs().max() / v.double().abs().max()).item()
        for u, v in zip(a, b, strict=False)
        if v.abs().max().item() > 1e-6 * top
    )


def gradient_drift(num_steps: int, scale: float = 0.1, shape=(4, 8, 8, 8), hidden: int = 16, seed: int = 0) -> dict:
    """Drift of memory-saving gradients for ``num_steps`` Glow steps whose parameters are
    perturbed with ``perturb_parameters(scale=scale)`` (ActNorm initialised on the batch).

    Returns max over tensors (input, every parameter) of ``max|g - g_ref| / max|g_ref|`` for
    ``saving32`` vs plain float32, ``saving64`` vs plain float64, ``plain32`` vs plain
    float64 (float32's own error, for scale) and ``saving32_vs_64``, memory-saving float32 vs
    plain float64 (the error a user gets, to compare with ``plain32``); ``roundtrip32``/``roundtrip64`` are
    ``max|f^-1(f(x)) - x| / max|x|`` of the whole stack, the error that drives the drift.
    """
    from nflows.transforms import CompositeTransform

    from flowkit.check import perturb_parameters
    from flowkit.layers import MemorySavingComposite

    torch.manual_seed(seed)
    saving = MemorySavingComposite(_glow_steps(num_steps, shape[1], hidden)).double()
    perturb_parameters(saving, scale=scale, seed=seed)
    x = 1.0 + 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        saving.train()(x)  # ActNorm init (in float64)
    plain = CompositeTransform(copy.deepcopy(list(saving._transforms)))
    out = {}

    def roundtrip(flow, x):
        with torch.no_grad():
            return ((flow.inverse(flow(x)[0])[0] - x).abs().max() / x.abs().max()).item()

    g = {"plain64": _gradients(plain, x), "saving64": _gradients(saving, x)}
    out["roundtrip64"] = roundtrip(plain, x)
    plain.float(), saving.float()
    g["plain32"] = _gradients(plain, x.float())
    g["saving32"] = _gradients(saving, x.float())
    out["roundtrip32"] = roundtrip(plain, x.float())
    out["saving32"] = _max_rel(g["saving32"], g["plain32"])
    out["saving64"] = _max_rel(g["saving64"], g["plain64"])
    out["plain32"] = _max_rel(g["plain32"], g["plain64"])
    out["saving32_vs_64"] = _max_rel(g["saving32"], g["plain64"])
    return out


def run_drift(args) -> None:
    print("max relative gradient difference (input and every parameter), Glow steps on [4, 8, 8, 8]")
    header = (
        f"{'perturb':>7} {'steps':>5} {'saving32 vs plain32':>20} {'saving64 vs plain64':>20} "
        f"{'plain32 vs plain64':>19} {'saving32 vs plain64':>20} {'roundtrip32':>12} {'roundtrip64':>12}"
    )
    print(header)
    print("-" * len(header))
    for scale in args.drift_scales:
        for n in args.drift_depths:
            d = gradient_drift(n, scale)
            print(
                f"{scale:>7g} {n:>5d} {d['saving32']:>20.1e} {d['saving64']:>20.1e} {d['plain32']:>19.1e} {d['saving32_vs_64']:>20.1e} "
                f"{d['roundtrip32']:>12.1e} {d['roundtrip64']:>12.1e}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32], help="steps per level")
    parser.add_argument("--num-scales", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=16, help="hidden channels of the coupling nets")
    parser.add_argument("--num-layers", type=int, default=1, help="gated residual blocks per coupling net")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed steps per model and depth (interleaved; after one warm-up step)"
    )
    parser.add_argument("--coupling", default="affine", choices=["affine", "additive", "clamped-affine"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are per thread count)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--drift", action="store_true", help="measure float32/float64 gradient drift instead")
    parser.add_argument("--drift-depths", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument(
        "--drift-scales", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1], help="parameter perturbations"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.drift:
        run_drift(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
