"""Verify that a transform honours flowkit's contract, numerically, sample by sample.

:func:`check_transform` runs a small batch through ``forward`` and ``inverse`` and reports, as
failures with a reason (never as an exception):

* an exception in ``forward``, ``inverse`` or the Jacobian;
* a layer that modifies its input (or context) in place;
* outputs of the wrong shape, a log-det that is not ``[batch]`` (e.g. ``[batch, D]``), a dtype
  that differs from the inputs';
* the round trip ``|inverse(forward(x)) - x|`` above ``atol + rtol * |x|``;
* ``|logabsdet_forward + logabsdet_inverse|`` above ``atol + rtol * |logabsdet_forward|`` (0 for a
  bijection; for stochastic layers ``+ log q(u | x)``);
* ``|logabsdet - log|det J||`` above ``atol + rtol * |log|det J||`` **on every sample** (up to
  ``max_samples``), ``J`` from :func:`torch.autograd.functional.jacobian` of that one sample, on
  a float64 copy of the transform; the log-dets compared are those of the whole batch, so a
  layer wrong only at some batch positions is caught.

A normflows ``Flow`` is bridged (:func:`flowkit.bridge.to_nflows`) first; one that is not a
bijection gives a failing report with the bridge's reason.

Stochastic layers (dequantization) are checked with their noise fixed: they expose
``forward_with_noise(x, noise) -> (z, logabsdet, log_q)``; the Jacobian is taken with respect
to the base noise ``r ~ U[0, 1)`` and the round trip must be exact on the integers.

:data:`LAYER_CASES` is the registry of every built-in layer (used by ``flowkit check`` and by
the shared transform test); a new layer joins it with :func:`register_case`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import normflows as nf
import torch
from nflows.transforms import Transform

from flowkit.bridge import NormflowsAsNflows, to_nflows, why_not_bijective
from flowkit.validation import check_float, check_optional_int

__all__ = [
    "CheckReport",
    "LayerCase",
    "LAYER_CASES",
    "Tolerance",
    "check_transform",
    "default_tolerance",
    "format_header",
    "format_reports",
    "format_row",
    "perturb_parameters",
    "register_case",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A comparison passes where ``|error| <= atol + rtol * |reference|`` (and is finite)."""

    atol: float
    rtol: float

    def worst(self, error: torch.Tensor, reference: torch.Tensor) -> tuple[float, int, bool]:
        """``(max |error|, index of the worst sample, within tolerance)`` over a batch.

        The worst sample is the one furthest beyond its bound (the largest error when all pass).
        """
        error = error.detach().abs().reshape(error.shape[0], -1).to(torch.float64)
        bound = self.atol + self.rtol * reference.detach().abs().reshape(error.shape[0], -1).to(torch.float64)
        excess = torch.where(torch.isfinite(error), error - bound, torch.full_like(error, float("inf")))
        per_sample = excess.max(dim=1).values
        index = int(per_sample.argmax())
        return float(error.max()), index, bool(per_sample.max() <= 0)


_DEFAULT_TOLERANCE = {
    torch.float64: Tolerance(1e-9, 1e-9),
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.float16: Tolerance(1e-2, 1e-2),
    torch.bfloat16: Tolerance(1e-2, 1e-2),
}


def default_tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance :func:`check_transform` uses for computations in ``dtype`` when none is given.

    Example:
        >>> default_tolerance(torch.float64)
        Tolerance(atol=1e-09, rtol=1e-09)
    """
    return _DEFAULT_TOLERANCE.get(dtype, _DEFAULT_TOLERANCE[torch.float32])


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_transform`.

    Attributes:
        name: the layer's label.
        dtype: the dtype the layer ran in (``"float32"``, ``"float64"``).
        roundtrip_error: ``max |inverse(forward(x)) - x|`` (NaN when not measured).
        jacobian_error: ``max |logabsdet - log|det J||`` over the checked samples.
        ladj_sum_error: ``max |logabsdet_forward + logabsdet_inverse|`` (``+ log q`` for
            stochastic layers).
        samples: how many samples' Jacobians were compared.
        tolerance: for the round trip and the log-det sum (in ``dtype``).
        jacobian_tolerance: for the Jacobian comparison (on the float64 copy).
        failures: one reason per failed check; empty when everything passed.
        ok: no failures.
    """

    name: str
    dtype: str
    roundtrip_error: float
    jacobian_error: float
    ladj_sum_error: float
    samples: int
    tolerance: Tolerance
    jacobian_tolerance: Tolerance
    failures: list[str] = dataclasses.field(default_factory=list)
    ok: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.ok = not self.failures

    @property
    def reason(self) -> str:
        """The failures in one line (empty when ok)."""
        return "; ".join(self.failures)

    def __str__(self) -> str:
        return format_reports([self])


@dataclasses.dataclass
class LayerCase:
    """A layer, an input for it and (optionally) a context: one row of the registry."""

    transform: Transform | nf.flows.Flow
    inputs: torch.Tensor
    context: torch.Tensor | None = None


LAYER_CASES: dict[str, Callable[[], LayerCase]] = {}


def register_case(name: str) -> Callable[[Callable[[], LayerCase]], Callable[[], LayerCase]]:
    """Decorator adding ``fn() -> LayerCase`` to :data:`LAYER_CASES` under ``name``."""

    def deco(fn: Callable[[], LayerCase]) -> Callable[[], LayerCase]:
        if name in LAYER_CASES:
            raise ValueError(f"name: a layer case called {name!r} is already registered")
        LAYER_CASES[name] = fn
        return fn

    return deco


@torch.no_grad()
def perturb_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add ``N(0, scale^2)`` noise to every parameter (so a zero-initialised coupling is no
    longer the identity and a check exercises it). Returns ``module``."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return module


# -- running the layer ------------------------------------------------------------------------


def _is_stochastic(transform: Any) -> bool:
    return hasattr(transform, "forward_with_noise") and hasattr(transform, "sample_noise")


def _to_dtype(t: Any, dtype: torch.dtype) -> Any:
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _raised(where: str, err: Exception) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{where} raised {type(err).__name__}" + (f": {message[:200]}" if message else "")


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _changed_in_place(where: str, what: str, handed: torch.Tensor | None, kept: torch.Tensor | None) -> list[str]:
    """A failure when the tensor handed to the layer no longer equals the copy kept of it."""
    if handed is None or kept is None or _equal(handed, kept):
        return []
    if handed.shape != kept.shape:
        detail = f"shape {list(kept.shape)} -> {list(handed.shape)}"
    else:
        detail = f"max change {(handed.to(torch.float64) - kept.to(torch.float64)).abs().max().item():.1e}"
    return [f"{where} modified its {what} in place ({detail})"]


@dataclasses.dataclass
class _Pass:
    """What one direction returned (``None`` where it failed) and why it failed."""

    outputs: torch.Tensor | None = None
    ladj: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    failures: list[str] = dataclasses.field(default_factory=list)


def _output_failures(where: str, outputs: Any, ladj: Any, inputs: torch.Tensor, run_dtype: torch.dtype) -> list[str]:
    """Shape and dtype problems of one direction's ``(outputs, logabsdet)``."""
    batch = inputs.shape[0]
    if not isinstance(outputs, torch.Tensor):
        return [f"{where} returned a {type(outputs).__name__} as outputs, not a tensor"]
    failures = []
    if outputs.shape[0] != batch or outputs[0].numel() != inputs[0].numel():
        failures.append(f"{where} returned outputs of shape {list(outputs.shape)} for inputs {list(inputs.shape)}")
    if outputs.is_floating_point() and outputs.dtype != run_dtype:
        failures.append(f"{where} returned {_dtype_name(outputs.dtype)} outputs for {_dtype_name(run_dtype)} inputs")
    if not isinstance(ladj, torch.Tensor) or ladj.shape != (batch,):
        shape = list(ladj.shape) if isinstance(ladj, torch.Tensor) else type(ladj).__name__
        failures.append(f"{where} returned a log-det of shape {shape}; expected [{batch}]")
    elif ladj.dtype != run_dtype:
        failures.append(f"{where} returned {_dtype_name(ladj.dtype)} log-dets for {_dtype_name(run_dtype)} inputs")
    return failures


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.no_grad()
def _forward(
    transform: Transform,
    inputs: torch.Tensor,
    context: torch.Tensor | None,
    noise: torch.Tensor | None,
    run_dtype: torch.dtype,
) -> _Pass:
    """``forward`` on copies of ``inputs``/``context``; flags exceptions, in-place edits, shapes, dtypes."""
    x, ctx = _clone(inputs), _clone(context)
    try:
        if noise is not None:
            z, ladj, log_q = transform.forward_with_noise(x, noise, ctx)
        else:
            (z, ladj), log_q = transform(x, ctx), None
    except Exception as err:  # a failing row, not a crash
        return _Pass(failures=[_raised("forward", err)])
    failures = _changed_in_place("forward", "input", x, inputs) + _changed_in_place("forward", "context", ctx, context)
    failures += _output_failures("forward", z, ladj, inputs, run_dtype)
    return _Pass(z, ladj, log_q, failures)


@torch.no_grad()
def _inverse(
    transform: Transform, z: torch.Tensor, inputs: torch.Tensor, context: torch.Tensor | None, run_dtype: torch.dtype
) -> _Pass:
    """``inverse`` of the latents on copies; the outputs must have the inputs' shape and dtype."""
    z_given, ctx = _clone(z), _clone(context)
    try:
        x_back, ladj = transform.inverse(z_given, ctx)
    except Exception as err:
        return _Pass(failures=[_raised("inverse", err)])
    failures = _changed_in_place("inverse", "input", z_given, z) + _changed_in_place("inverse", "context", ctx, context)
    failures += _output_failures("inverse", x_back, ladj, z, run_dtype)
    if isinstance(x_back, torch.Tensor) and x_back.shape != inputs.shape:
        failures.append(f"inverse returned shape {list(x_back.shape)}, expected the inputs' {list(inputs.shape)}")
    if isinstance(x_back, torch.Tensor) and not inputs.is_floating_point() and x_back.dtype != inputs.dtype:
        failures.append(f"inverse returned {_dtype_name(x_back.dtype)} for {_dtype_name(inputs.dtype)} inputs")
    return _Pass(x_back, ladj, None, failures)


# -- comparisons ------------------------------------------------------------------------------


def _compare(error: torch.Tensor, reference: torch.Tensor, tol: Tolerance, message: str) -> tuple[float, list[str]]:
    """``(max |error|, [failure])`` with ``message`` formatted with ``{err}`` and ``{i}`` (the worst sample)."""
    worst, index, ok = tol.worst(error, reference)
    return worst, [] if ok else [message.format(err=worst, i=index)]


def _roundtrip(inputs: torch.Tensor, x_back: torch.Tensor, stochastic: bool, tol: Tolerance) -> tuple[float, list[str]]:
    if stochastic:  # integers must come back exactly
        tol = Tolerance(0.0, 0.0)
    x64 = inputs.to(torch.float64)
    return _compare(x_back.to(torch.float64) - x64, x64, tol, "inverse(forward(x)) misses x by {err:.1e} (sample {i})")


def _ladj_sum(fwd: _Pass, inv: _Pass, tol: Tolerance) -> tuple[float, list[str]]:
    assert fwd.ladj is not None and inv.ladj is not None
    total = fwd.ladj + inv.ladj + (0 if fwd.log_q is None else fwd.log_q)
    return _compare(total, fwd.ladj, tol, "forward and inverse log-dets do not cancel: |sum| = {err:.1e} (sample {i})")


def _sample_indices(batch: int, max_samples: int | None) -> list[int]:
    """Every sample, or ``max_samples`` spread over the batch (the first and the last among them)."""
    if max_samples is None or max_samples >= batch:
        return list(range(batch))
    if max_samples == 1:
        return [batch - 1]
    return sorted({round(k * (batch - 1) / (max_samples - 1)) for k in range(max_samples)})


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Tensors held directly, or one attribute deep in a plain helper object (nflows' LinearCache)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module) or not hasattr(value, "__dict__"):
        return []
    return [v for v in vars(value).values() if isinstance(v, torch.Tensor)]


def _copy_of(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy``, also of a layer caching tensors that are part of an autograd graph
    (nflows' eval-mode weight cache filled with gradients on): those are copied detached."""
    try:
        return copy.deepcopy(module)
    except RuntimeError:
        memo: dict[int, Any] = {}
        for m in module.modules():
            for value in vars(m).values():
                memo.update({id(t): t.detach().clone() for t in _tensors_in(value) if not t.is_leaf})
        return copy.deepcopy(module, memo)


class _OnCopy:
    """``forward`` of a copy of the layer in ``dtype``, on rows of the batch (noise fixed for stochastic layers)."""

    def __init__(self, transform: Transform, inputs: torch.Tensor, context: Any, noise: Any, dtype: torch.dtype):
        self.layer: Any = _copy_of(transform).to(dtype)
        self.inputs, self.context = inputs, _to_dtype(context, dtype)
        self.noise = None if noise is None else noise.to(dtype)
        # the Jacobian is taken with respect to the noise for stochastic layers, else the inputs
        self.points = self.noise if self.noise is not None else _to_dtype(inputs, dtype)

    def __call__(self, points: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        # the layer gets copies (a differentiable clone of the points): an in-place layer, already
        # reported, changes neither the caller's batch nor the next sample's point
        context = _clone(_rows(self.context, rows))
        if self.noise is not None:
            z, ladj, _ = self.layer.forward_with_noise(self.inputs[rows].clone(), points.clone(), context)
            return z, ladj
        return self.layer(points.clone(), context)

    def logdet_of_jacobian(self, i: int) -> torch.Tensor:
        """``log|det d z_i / d p_i|`` of sample ``i`` run on its own."""
        point = self.points[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda q: self(q, slice(i, i + 1))[0].reshape(-1), point)
        return torch.linalg.slogdet(jac.reshape(point.numel(), point.numel()))[1]


def _jacobian(
    transform: Transform, inputs: torch.Tensor, context: Any, noise: Any, indices: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(the batch's log-dets at ``indices``, ``log|det J|`` of each of those samples alone), or why not."""
    try:
        run = _OnCopy(transform, inputs, context, noise, dtype)
    except Exception as err:
        return _raised(f"copying the layer to {_dtype_name(dtype)}", err)
    try:
        with torch.no_grad():
            ladj = run(run.points, slice(None))[1]
        if ladj.shape != (inputs.shape[0],):
            return f"the {_dtype_name(dtype)} copy returned a log-det of shape {list(ladj.shape)}"
        logdets = torch.stack([run.logdet_of_jacobian(i) for i in indices])
    except Exception as err:
        return _raised("the Jacobian check", err)
    return ladj[indices], logdets


# -- the check --------------------------------------------------------------------------------


def _as_transform(transform: Any, name: str | None) -> tuple[Transform | None, str, str | None]:
    """``(nflows transform or None, label, refusal)``: a normflows flow is bridged, or refused with the reason."""
    if isinstance(transform, nf.flows.Flow):
        reason = why_not_bijective(transform)
        label = name or type(transform).__name__
        return (None, label, reason) if reason else (to_nflows(transform), label, None)
    if not isinstance(transform, Transform):
        raise TypeError(f"transform: expected an nflows Transform or a normflows Flow, got {type(transform).__name__}")
    if name is None and isinstance(transform, NormflowsAsNflows):
        name = type(transform.flow).__name__
    return transform, name or type(transform).__name__, None


def _check_batch(inputs: Any, context: Any) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] < 1:
        got = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs: expected a batch tensor [B, ...] with B >= 1, got {got}")
    if context is not None and (not isinstance(context, torch.Tensor) or context.shape[:1] != inputs.shape[:1]):
        got = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"context: expected a tensor with the inputs' batch size {inputs.shape[0]}, got {got}")


def _max_samples(max_samples: Any, max_jacobian_samples: Any) -> int | None:
    if max_jacobian_samples is not None:
        warnings.warn(
            "check_transform(max_jacobian_samples=...) is deprecated; use max_samples=",
            DeprecationWarning,
            stacklevel=3,
        )
        max_samples = max_jacobian_samples if max_samples is None else max_samples
    return check_optional_int("max_samples", max_samples, low=1)


def _tolerance(dtype: torch.dtype, atol: float | None, rtol: float | None) -> Tolerance:
    default = default_tolerance(dtype)
    return Tolerance(
        default.atol if atol is None else check_float("atol", atol, low=0),
        default.rtol if rtol is None else check_float("rtol", rtol, low=0),
    )


def _run_dtype(transform: Transform, inputs: torch.Tensor) -> torch.dtype:
    """The inputs' dtype, or (integer inputs) the layer's own floating dtype."""
    if inputs.is_floating_point():
        return inputs.dtype
    tensors = [*transform.parameters(), *transform.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())


@dataclasses.dataclass
class _Settings:
    run_dtype: torch.dtype
    jacobian_dtype: torch.dtype
    tolerance: Tolerance
    jacobian_tolerance: Tolerance
    indices: list[int]


@dataclasses.dataclass
class _Measured:
    roundtrip: float = float("nan")
    jacobian: float = float("nan")
    ladj_sum: float = float("nan")
    samples: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


def _batch_shaped(t: Any, batch: int) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == (batch,)


def _measure_passes(
    transform: Transform, inputs: torch.Tensor, context: Any, noise: Any, s: _Settings, m: _Measured
) -> _Pass:
    """Forward, inverse, round trip and log-det sum into ``m``; returns the forward pass."""
    fwd = _forward(transform, inputs, context, noise, s.run_dtype)
    m.failures += fwd.failures
    if fwd.outputs is None:
        return fwd
    inv = _inverse(transform, fwd.outputs, inputs, context, s.run_dtype)
    m.failures += inv.failures
    if isinstance(inv.outputs, torch.Tensor) and inv.outputs.shape == inputs.shape:
        m.roundtrip, more = _roundtrip(inputs, inv.outputs, noise is not None, s.tolerance)
        m.failures += more
    if _batch_shaped(fwd.ladj, inputs.shape[0]) and _batch_shaped(inv.ladj, inputs.shape[0]):
        m.ladj_sum, more = _ladj_sum(fwd, inv, s.tolerance)
        m.failures += more
    return fwd


def _measure_jacobian(
    transform: Transform, inputs: torch.Tensor, context: Any, noise: Any, s: _Settings, m: _Measured
) -> None:
    """The batch's log-dets against each checked sample's ``log|det J|``, into ``m``."""
    found = _jacobian(transform, inputs, context, noise, s.indices, s.jacobian_dtype)
    if isinstance(found, str):
        m.failures.append(found)
        return
    batch_ladj, logdets = found
    message = "log-det differs from log|det J| by {err:.1e} (sample {i})"
    m.jacobian, more = _compare(batch_ladj - logdets, logdets, s.jacobian_tolerance, message)
    m.samples = len(s.indices)
    m.failures += [_renumber(f, s.indices) for f in more]


def _measure(transform: Transform, inputs: torch.Tensor, context: Any, s: _Settings) -> _Measured:
    """Every check of a layer (in eval mode); a failing step never stops the others that do not need it."""
    m = _Measured()
    noise = None
    if _is_stochastic(transform):
        try:
            noise = transform.sample_noise(inputs)
        except Exception as err:
            m.failures.append(_raised("sample_noise", err))
            return m
    fwd = _measure_passes(transform, inputs, context, noise, s, m)
    if fwd.outputs is not None and _batch_shaped(fwd.ladj, inputs.shape[0]):
        _measure_jacobian(transform, inputs, context, noise, s, m)
    return m


def _renumber(failure: str, indices: list[int]) -> str:
    """Turn ``(sample k)`` (position among the checked samples) into the batch index."""
    head, _, tail = failure.rpartition("(sample ")
    return f"{head}(sample {indices[int(tail.rstrip(')'))]})" if head else failure


def check_transform(
    transform: Transform | nf.flows.Flow,
    inputs: torch.Tensor,
    context: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_samples: int | None = None,
    name: str | None = None,
    jacobian_dtype: torch.dtype = torch.float64,
    max_jacobian_samples: int | None = None,
) -> CheckReport:
    """Check ``transform`` on ``inputs``, sample by sample (small: the Jacobian is ``D x D`` per sample).

    Args:
        transform: an nflows ``Transform`` (data -> latent in ``forward``), or a normflows
            ``Flow`` (bridged with :func:`flowkit.bridge.to_nflows`).
        inputs: a batch ``[B, ...]``; integer images for stochastic (dequantization) layers.
            Never modified: the layer gets copies.
        context: optional context batch passed to ``forward``/``inverse``.
        atol, rtol: every comparison passes where ``|error| <= atol + rtol * |reference|``.
            Default: :func:`default_tolerance` of the dtype the comparison runs in (the inputs'
            for the round trip and the log-det sum, ``jacobian_dtype`` for the Jacobian), e.g.
            1e-9 in float64, 1e-4 in float32.
        max_samples: compare the Jacobian on at most this many samples, spread over the batch
            (first and last included). Default: every sample.
        name: label for the report (default: the class name).
        jacobian_dtype: dtype of the copy on which the Jacobian is computed.
        max_jacobian_samples: deprecated name of ``max_samples``.

    Returns:
        A :class:`CheckReport` whose ``failures`` say what failed; the layer is left in the
        train/eval mode it was in.

    Raises:
        TypeError / ValueError: for arguments that are not a layer, a batch or a tolerance.

    Example:
        >>> import torch, flowkit
        >>> from nflows.transforms import ActNorm
        >>> flowkit.check_transform(ActNorm(3), torch.randn(4, 3)).ok
        True
        >>> class Doubles(ActNorm):                # modifies its input in place
        ...     def forward(self, inputs, context=None):
        ...         return super().forward(inputs.mul_(2), context)
        >>> flowkit.check_transform(Doubles(3), torch.ones(4, 3)).failures[0]
        'forward modified its input in place (max change 1.0e+00)'
    """
    layer, label, refusal = _as_transform(transform, name)
    _check_batch(inputs, context)
    indices = _sample_indices(inputs.shape[0], _max_samples(max_samples, max_jacobian_samples))
    run_dtype = _run_dtype(layer, inputs) if layer is not None else inputs.dtype
    settings = _Settings(
        run_dtype, jacobian_dtype, _tolerance(run_dtype, atol, rtol), _tolerance(jacobian_dtype, atol, rtol), indices
    )
    if layer is None:
        measured = _Measured(failures=[str(refusal)])
    else:
        modes = {module: module.training for module in layer.modules()}
        layer.eval()
        try:
            measured = _measure(layer, inputs, context, settings)
        finally:
            for module, mode in modes.items():
                module.training = mode
    return CheckReport(
        name=label,
        dtype=_dtype_name(run_dtype),
        roundtrip_error=measured.roundtrip,
        jacobian_error=measured.jacobian,
        ladj_sum_error=measured.ladj_sum,
        samples=measured.samples,
        tolerance=settings.tolerance,
        jacobian_tolerance=settings.jacobian_tolerance,
        failures=measured.failures,
    )


# -- the table --------------------------------------------------------------------------------

_HEADER = f"{'layer':<46} {'dtype':<8} {'roundtrip':>10} {'|ladj-logdetJ|':>15} {'|fwd+inv ladj|':>15}  ok"


def format_header() -> str:
    """The table's header and rule (what :func:`format_row` lines go under)."""
    return f"{_HEADER}\n{'-' * len(_HEADER)}"


def format_row(report: CheckReport) -> str:
    """One report as a table line; a failing one ends with its reasons."""
    line = (
        f"{report.name:<46} {report.dtype:<8} {report.roundtrip_error:>10.2e} {report.jacobian_error:>15.2e} "
        f"{report.ladj_sum_error:>15.2e}  {'yes' if report.ok else 'NO'}"
    )
    return line if report.ok else f"{line}  {report.reason}"


def format_reports(reports: Iterable[CheckReport]) -> str:
    """A text table of reports."""
    return "\n".join([format_header(), *(format_row(r) for r in reports)])


# --------------------------------------------------------------------------------------
# Registry of built-in layers. Each case is small (<= 32 dims per sample) and, where the
# layer has parameters, perturbed away from its (identity) initialisation by the caller.
# --------------------------------------------------------------------------------------


def _images(c=1, h=4, w=4, b=3, levels=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (b, c, h, w), generator=gen)


def _floats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@register_case("ScaledLogit")
def _case_scaled_logit() -> LayerCase:
    from flowkit.layers import ScaledLogit

    v = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 255.0 + 0.5
    return LayerCase(ScaledLogit(256), v)


@register_case("Dequantization")
def _case_dequantization() -> LayerCase:
    from flowkit.layers import Dequantization

    return LayerCase(Dequantization(256), _images())


@register_case("VariationalDequantization")
def _case_vardeq() -> LayerCase:
    from nflows.transforms import CompositeTransform

    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, VariationalDequantization, checkerboard_mask

    flow = CompositeTransform(
        [
            MaskedAffineCoupling(
                checkerboard_mask(4, 4, invert=i % 2 == 1), GatedConvNet(1, 2, 8, 1, context_channels=1), 1
            )
            for i in range(2)
        ]
    )
    return LayerCase(VariationalDequantization(flow, 256), _images())


@register_case("MaskedAffineCoupling[checkerboard]")
def _case_coupling_checkerboard() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, checkerboard_mask

    return LayerCase(MaskedAffineCoupling(checkerboard_mask(4, 4), GatedConvNet(2, 4, 8, 2), 2), _floats(3, 2, 4, 4))


@register_case("MaskedAffineCoupling[channel]")
def _case_coupling_channel() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, channel_mask

    return LayerCase(
        MaskedAffineCoupling(channel_mask(4, invert=True), GatedConvNet(4, 8, 8, 1), 4), _floats(3, 4, 2, 2)
    )


@register_case("MaskedAffineCoupling[context]")
def _case_coupling_context() -> LayerCase:
    from flowkit.layers import GatedConvNet, MaskedAffineCoupling, checkerboard_mask

    net = GatedConvNet(1, 2, 8, 1, context_channels=1)
    return LayerCase(
        MaskedAffineCoupling(checkerboard_mask(4, 4), net, 1), _floats(3, 1, 4, 4), _floats(3, 1, 4, 4, seed=1)
    )


@register_case("nflows.AffineCoupling+GatedConvNet")
def _case_nflows_affine() -> LayerCase:
    from nflows.transforms import AffineCouplingTransform

    from flowkit.layers import gated_conv_net

    return LayerCase(AffineCouplingTransform([1, -1, 1, -1], gated_conv_net(8, 1)), _floats(3, 4, 2, 2))


@register_case("ClampedAffineCoupling+GatedConvNet")
def _case_clamped_affine() -> LayerCase:
    from flowkit.layers import ClampedAffineCoupling, gated_conv_net

    return LayerCase(ClampedAffineCoupling([1, -1, 1, -1], gated_conv_net(8, 1)), _floats(3, 4, 2, 2))


@register_case("nflows.GlowStep(ActNorm,1x1,coupling)")
def _case_glow_step() -> LayerCase:
    from nflows.transforms import ActNorm, AffineCouplingTransform, CompositeTransform, OneByOneConvolution

    from flowkit.layers import gated_conv_net

    step = CompositeTransform(
        [ActNorm(4), OneByOneConvolution(4), AffineCouplingTransform([1, 1, -1, -1], gated_conv_net(8, 1))]
    )
    return LayerCase(step, _floats(3, 4, 2, 2))


@register_case("nflows.OneByOneConvolution[cached]")
def _case_onebyone_cached() -> LayerCase:
    from nflows.transforms import OneByOneConvolution

    return LayerCase(OneByOneConvolution(4, using_cache=True), _floats(3, 4, 2, 2))


@register_case("nflows.Logit")
def _case_logit() -> LayerCase:
    from nflows.transforms import Logit

    return LayerCase(
        Logit(temperature=0.5), torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    )


@register_case("tutorial multiscale flow")
def _case_multiscale() -> LayerCase:
    from flowkit.models import tutorial_flow

    model = tutorial_flow("multiscale", image_shape=(1, 4, 4))
    return LayerCase(model.flow, _floats(2, 1, 4, 4))


@register_case("MemorySavingComposite(glow steps)")
def _case_memory_saving() -> LayerCase:
    from nflows.transforms import ActNorm, AffineCouplingTransform, OneByOneConvolution

    from flowkit.layers import MemorySavingComposite, gated_conv_net

    steps = []
    for i in range(2):
        mask = [1, 1, -1, -1] if i % 2 == 0 else [-1, -1, 1, 1]
        steps += [ActNorm(4), OneByOneConvolution(4), AffineCouplingTransform(mask, gated_conv_net(8, 1))]
    return LayerCase(MemorySavingComposite(steps), _floats(3, 4, 2, 2))


@register_case("glow flow (2 scales)")
def _case_glow_flow() -> LayerCase:
    from flowkit.models import glow

    model = glow((1, 4, 4), num_scales=2, steps_per_scale=2, hidden_channels=8, num_layers=1, dequantization="uniform")
    return LayerCase(model.flow, _floats(2, 1, 4, 4))


# -- class-conditional parts: the label as context ------------------------------------------


def _labels(b=3, num_classes=4, seed=0):
    return torch.randint(0, num_classes, (b,), generator=torch.Generator().manual_seed(seed))


@register_case("ClassConditionalPrior[context y]")
def _case_class_conditional_prior() -> LayerCase:
    from flowkit.layers import ClassConditionalPrior

    return LayerCase(ClassConditionalPrior(4, (2, 2, 2)), _floats(3, 2, 2, 2), torch.tensor([0, 3, 0]))


@register_case("nflows.AffineCoupling+GatedConvNet[label]")
def _case_coupling_label_context() -> LayerCase:
    from nflows.transforms import AffineCouplingTransform

    from flowkit.layers import gated_conv_net

    coupling = AffineCouplingTransform([1, -1, 1, -1], gated_conv_net(8, 1, context_channels=3))
    return LayerCase(coupling, _floats(3, 4, 2, 2), _floats(3, 3, seed=1))  # context [B, 3], broadcast over the image


class _LabelledFlow(Transform):
    """A conditional :class:`~flowkit.models.ImageFlow`'s flow and prior as one transform of the
    dequantized logits, with the labels as context (embedded for the flow as the model does)."""

    def __init__(self, model):
        super().__init__()
        self.context_encoder, self.flow, self.prior = model.context_encoder, model.flow, model.prior

    def forward(self, inputs, context=None):
        z, ladj = self.flow(inputs, context=self.context_encoder(context))
        u, ladj_prior = self.prior(z, context=context)
        return u, ladj + ladj_prior

    def inverse(self, inputs, context=None):
        z, ladj_prior = self.prior.inverse(inputs, context=context)
        x, ladj = self.flow.inverse(z, context=self.context_encoder(context))
        return x, ladj + ladj_prior


@register_case("conditional glow flow+prior[context y]")
def _case_conditional_glow() -> LayerCase:
    from flowkit.models import glow

    model = glow(
        (1, 4, 4),
        num_scales=2,
        steps_per_scale=1,
        hidden_channels=8,
        num_layers=1,
        dequantization="uniform",
        num_classes=4,
    )
    return LayerCase(_LabelledFlow(model), _floats(3, 1, 4, 4), _labels())


@register_case("MemorySavingComposite(glow steps)[label]")
def _case_memory_saving_context() -> LayerCase:
    from flowkit.layers import MemorySavingComposite
    from flowkit.models.glow import glow_step

    steps = MemorySavingComposite([glow_step(4, i, 8, 1, context_channels=3) for i in range(2)])
    return LayerCase(steps, _floats(3, 4, 2, 2), _floats(3, 3, seed=1))


# -- flowkit.bridge: normflows flows as nflows Transforms (and back) -----------------------


@register_case("bridge.to_nflows(nf.AffineCouplingBlock)")
def _case_bridge_affine() -> LayerCase:
    return LayerCase(to_nflows(nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 8, 4], init_zeros=True))), _floats(3, 4))


@register_case("bridge.to_nflows(nf.CoupledRQSpline)")
def _case_bridge_spline() -> LayerCase:
    return LayerCase(to_nflows(nf.flows.CoupledRationalQuadraticSpline(2, 1, 8, num_bins=4)), _floats(3, 2))


@register_case("bridge.to_nflows(nf.MaskedAffineFlow)")
def _case_bridge_masked_affine() -> LayerCase:
    mask = torch.tensor([1.0, 0.0])
    flow = nf.flows.MaskedAffineFlow(
        mask, t=nf.nets.MLP([2, 8, 2], init_zeros=True), s=nf.nets.MLP([2, 8, 2], init_zeros=True)
    )
    return LayerCase(to_nflows(flow), _floats(3, 2))


@register_case("bridge.to_nflows(to_normflows(RQ coupling))")
def _case_bridge_roundtrip() -> LayerCase:
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform

    from flowkit.bridge import to_normflows

    inner = PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor([1, 0]),
        lambda i, o: ResidualNet(i, o, 8, num_blocks=1),
        num_bins=4,
        tails="linear",
        tail_bound=3.0,
    )
    return LayerCase(to_nflows(to_normflows(inner)), _floats(3, 2))


@register_case("bridge.to_nflows(nf.Planar[leaky_relu])")
def _case_bridge_planar() -> LayerCase:
    return LayerCase(to_nflows(nf.flows.Planar((3,), act="leaky_relu")), _floats(3, 3))


@register_case("bridge.to_nflows(nf.CCAffineConst)[context y]")
def _case_bridge_class_conditional() -> LayerCase:
    classes = torch.eye(3)[[0, 2, 1]]  # one-hot class vectors: CCAffineConst takes them as ``y``
    return LayerCase(to_nflows(nf.flows.CCAffineConst((2,), 3)), _floats(3, 2), classes)
