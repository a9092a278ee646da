"""Invertible backprop: run a stack of bijections without storing their activations.

:class:`MemorySavingComposite` computes exactly what ``nflows.transforms.CompositeTransform``
computes, ``z = f_K(... f_1(x))`` and ``logabsdet = sum_k log|det J_{f_k}|``, but in training
it keeps only the final output.  In the backward pass it walks the steps in reverse, rebuilds
each step's input from its output, ``x_{k-1} = f_k^{-1}(x_k)``, and backpropagates the
incoming gradients of ``z`` and ``logabsdet`` through that one step (Gomez et al., 2017, "The
Reversible Residual Network"; the memory argument of Kingma & Dhariwal, 2018, Glow).  Memory
for activations is then one step's worth instead of ``K`` steps' worth.

What a step costs in the backward pass depends on the layer (nested ``CompositeTransform``\\s,
e.g. flowkit's ``glow_step``, are flattened first):

* **Couplings** (nflows' ``CouplingTransform`` contract: ``transform_net``,
  ``_coupling_transform_forward/_inverse``, identity/transform features, no unconditional
  transform; nflows' affine, additive and spline couplings, flowkit's
  ``ClampedAffineCoupling``): the inverse needs the net on the unchanged half ``x_a = y_a``,
  which is also what the recomputed forward needs, so the two are fused as reversible-network
  libraries (RevTorch, MemCNN, FrEIA) do: one net call with grad on ``y_a`` gives the
  parameters that rebuild ``x_b = g^-1(y_b)`` and the local graph; for affine maps
  (``y_b = x_b * scale + shift``) the elementwise gradients are written by hand.
* **Runs of ActNorm / OneByOneConvolution** (nflows' own): one ``C x C`` map ``y = A x + c``
  per run, built for all runs of a composite at once; backward ``x = A^-1 (y - c)``,
  ``dL/dx = A^T dL/dy``, ``dL/dA = sum dL/dy x^T`` and the chain to the parameters by hand,
  no recomputed forward and no autograd graph.
* **Anything else** (a user's layer, ``SqueezeTransform``, flowkit's ``MaskedAffineCoupling``,
  a subclass that overrides ``forward``/``inverse``, a layer with forward hooks): the generic
  walk, ``inverse`` under no_grad, then the step re-run with grad and differentiated.

So a training step costs the plain step plus about one no-grad forward of the nets.  Measured
with ``.venv/bin/python benchmarks/bench_memory.py`` (Glow on 32x32x3, 3 levels, hidden 16,
1 gated block, batch 4, 1 thread, plain and memory-saving steps interleaved, medians of 7, CPU
time; a 2-core machine shared with other jobs):

===========  ===============  ===============  ======================  =====================
steps/level  saved MB plain   saved MB saving  step time ratio, before  step time ratio, now
===========  ===============  ===============  ======================  =====================
4            5.3              0.13             2.02                    1.32
8            10.5             0.13             2.06                    1.25
16           21.0             0.13             1.95                    1.23
32           41.9             0.13             1.94                    1.23
===========  ===============  ===============  ======================  =====================

("before": every step rebuilt with its ``inverse`` and re-run, two net calls per coupling.)

Rules:

* Only deterministic bijections: every step needs a working ``inverse`` and must compute
  the same function each time it is called.  Stochastic layers (flowkit's
  :class:`~flowkit.layers.Dequantization`, anything with ``forward_with_noise``), dropout,
  batch norm (batch statistics, running-stat updates) and transforms without an
  ``inverse`` are rejected when the composite is built.  Keep dequantization outside
  (``ImageFlow`` applies it before its flow); put split/multiscale logic around the
  composites, one composite per level.
* The memory-saving path runs only when it can matter: module in ``train()`` mode, grad
  enabled, and something (inputs, context or a parameter) requiring grad.  Everything
  else (``eval()``, ``torch.no_grad()``) runs the plain composite.
* ActNorm's data-dependent init: if an ``ActNorm`` of a fused run is uninitialised when a
  training forward arrives, the composite first runs one plain forward under
  ``torch.no_grad()`` (which initialises every ActNorm on this batch, in order, exactly as the
  plain composite would) and then the memory-saving pass.  In the ``inverse`` direction it
  falls back to the plain composite instead (nflows initialises ActNorm only in ``forward``).
* ``context`` is passed to every step; its gradient is returned when it requires grad.
* Parameters get their gradients through the autograd graph (they are inputs of the
  custom ``autograd.Function``), so optimisers, ``clip_grad_norm_`` and
  DistributedDataParallel's gradient hooks see them as usual.  A parameter the loss cannot
  reach gets a zero gradient where plain autograd leaves ``None``.  Double backward
  (``create_graph=True``) is not supported.  A layer with forward hooks takes the generic
  path, whose hooks run twice per training step (forward and recompute); a coupling net's
  hooks run twice too (forward and the one backward call).  Autocast state is recorded in
  the forward and restored for the nets re-run in the backward pass; inputs are rebuilt in
  full precision.
* ``state_dict`` keys are those of ``CompositeTransform`` (``_transforms.<i>....``), so a
  checkpoint moves between the plain and the memory-saving model.

Numerical drift.  The rebuilt inputs ``f^-1(f(x))`` differ from the true ones by round-off,
and the reverse walk compounds it by the condition numbers of the steps.  Measured with
``python benchmarks/bench_memory.py --drift --drift-scales 0.01 0.03 0.1``: K Glow steps
(nflows ``ActNorm -> OneByOneConvolution -> AffineCouplingTransform`` with
``gated_conv_net(16, 1)``) on ``[4, 8, 8, 8]`` inputs, parameters perturbed with
``perturb_parameters(scale=p)`` (larger ``p``: couplings further from the identity, worse
conditioned), ActNorm initialised on the batch, loss = mean NLL under N(0, I).  Each error is
the max over the input and every parameter of ``max|g - g_ref| / max|g_ref|``: "saving32" and
"plain32" are memory-saving and plain float32 gradients against plain float64 ones (the
error a user gets, and float32's own), "saving64" memory-saving against plain in float64;
"roundtrip" = ``max|f^-1(f(x)) - x| / max|x|`` of the whole stack:

===  ===  ==========  ==========  ==========  ============  ============
p    K    saving32    plain32     saving64    roundtrip32   roundtrip64
===  ===  ==========  ==========  ==========  ============  ============
.01  8    4.5e-06     3.5e-06     7.1e-15     4.6e-07       8.6e-16
.01  32   3.8e-06     4.8e-06     7.6e-15     1.1e-06       2.0e-15
.01  64   4.8e-06     8.3e-06     1.1e-14     1.7e-06       3.3e-15
.03  8    1.8e-06     1.3e-06     2.0e-15     5.9e-07       1.3e-15
.03  32   1.9e-05     2.9e-06     1.6e-14     7.4e-06       1.2e-14
.03  64   2.8e-04     8.6e-06     4.5e-13     1.7e-04       3.4e-13
.1   8    9.9e-05     2.7e-06     1.7e-13     1.7e-04       3.8e-13
.1   32   2.4e+02     2.1e-05     8.7e-05     2.9e+03       4.5e-04
.1   64   3.6e+09     1.5e-04     1.2e+03     4.1e+10       8.1e+04
===  ===  ==========  ==========  ==========  ============  ============

So: with well-conditioned steps the float32 gradients are as accurate as plain float32 ones
even at 64 steps (float64 agrees to ~1e-14); but the drift tracks the stack's round-trip
error, and a stack whose steps contract strongly (nflows' affine scale
``sigmoid(h + 2) + 1e-3`` can reach 1e-3) becomes numerically non-invertible: at p=0.1
and 32 steps float32 gradients are garbage, and at 64 steps even float64 fails.  Guard
against it with ``max_reconstruction_error`` (checks the rebuilt input in every backward
and warns), by splitting a deep stack into several shorter composites (each stores its
output; memory then grows with the number of composites, not of steps), or by monitoring
``flowkit.check_transform(flow, batch).roundtrip_error`` during training.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import NamedTuple

import torch
import torch.nn.functional as F
from nflows.transforms import ActNorm, CompositeTransform, OneByOneConvolution, Transform
from nflows.transforms.coupling import AffineCouplingTransform, CouplingTransform
from nflows.transforms.normalization import BatchNorm as _NflowsBatchNorm
from nflows.transforms.permutations import Permutation
from torch import nn

from flowkit.layers.base import Context, TransformResult
from flowkit.validation import check_float

__all__ = ["MemorySavingComposite"]


def _autocast_state(device_type: str):
    """``(enabled, dtype)`` of autocast for ``device_type``, or ``None`` if unsupported."""
    if device_type not in ("cpu", "cuda"):
        return None
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cuda":
            return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# A step is what the forward pass runs and the backward pass undoes.  Every step has
# ``modules`` (whose parameters it differentiates), ``run(x, context) -> (y, ladj)`` (the
# step in the direction being computed; called under no_grad) and ``backprop(y, grad_y,
# grad_ladj, context, need) -> _Rebuilt`` (rebuild the input from the output and push the
# gradients of ``y`` and ``ladj`` through the step).


class _Need(NamedTuple):
    """What one step's backward must produce."""

    x: bool  # the gradient of the step's input
    context: bool  # the gradient of the context
    params: list[torch.Tensor]  # the step's parameters whose gradients are wanted
    recompute: Callable[[], contextlib.AbstractContextManager]  # the forward's autocast state, for re-run layers


class _Rebuilt(NamedTuple):
    """One step undone: its input (detached) and the gradients of input, parameters, context."""

    x: torch.Tensor
    grad_x: torch.Tensor | None
    grad_params: list[torch.Tensor | None]
    grad_context: torch.Tensor | None


def _vjp(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], inputs: list, context, need: _Need):
    """``(input grads, param grads, context grad)`` of ``sum_i <outputs[i], grads[i]>``, each
    ``None`` where unused; ``inputs`` are differentiated only if ``need.x``."""
    wrt = (inputs if need.x else []) + need.params + ([context] if need.context else [])
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    found: list[torch.Tensor | None] = [None] * len(wrt)
    if pairs and wrt:
        found = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    context_grad = found.pop() if need.context else None
    n = len(inputs) if need.x else 0
    return found[:n], found[n:], context_grad


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


class _GenericStep:
    """Any invertible transform: rebuild the input with the inverse, re-run the step with grad
    and backpropagate through it (one inverse and one forward per backward)."""

    def __init__(self, module: Transform, inverse: bool):
        self.modules = (module,)
        self.params: list[torch.Tensor] = []  # set by _collect_parameters
        self._apply, self._rebuild = (module.inverse, module) if inverse else (module, module.inverse)

    def run(self, x: torch.Tensor, context):
        return self._apply(x, context)

    def backprop(self, y, grad_y, grad_ladj, context, need: _Need) -> _Rebuilt:
        with torch.no_grad():
            x, _ = self._rebuild(y, context)
        x = x.detach().requires_grad_(need.x)
        with torch.enable_grad(), need.recompute():
            y_again, ladj = self._apply(x, context)
        grad_xs, grad_params, grad_context = _vjp((y_again, ladj), (grad_y, grad_ladj), [x], context, need)
        grad_x = _or_zeros(grad_xs[0], x) if need.x else None
        return _Rebuilt(x.detach(), grad_x, grad_params, grad_context)


class _Halves(NamedTuple):
    """Where a coupling's identity and transformed features sit along dim 1: two slices
    when both are contiguous ranges (split = views, merge = one ``cat``), else ``None`` and the
    module's index buffers are used."""

    identity: slice | None
    transform: slice | None


# module -> _Halves, read once per module (reading the index buffers would sync a GPU every call)
_HALVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _as_range(index: torch.Tensor) -> slice | None:
    values = index.tolist()
    if values and values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return None


def _halves(module) -> _Halves:
    if module not in _HALVES:
        identity, transform = _as_range(module.identity_features), _as_range(module.transform_features)
        _HALVES[module] = _Halves(identity, transform) if identity and transform else _Halves(None, None)
    return _HALVES[module]


def _scale_and_shift_of(module) -> Callable | None:
    """``params -> (scale, shift)`` for a coupling whose elementwise map is known to be
    ``y_b = x_b * scale + shift``, ``ladj = sum log scale`` (its gradients are then written
    by hand); ``None`` for any other coupling (spline couplings, user subclasses that change
    the map), which gets the generic local graph."""
    cls = type(module)
    if (
        isinstance(module, AffineCouplingTransform)  # also AdditiveCouplingTransform (scale 1)
        and cls._coupling_transform_forward is AffineCouplingTransform._coupling_transform_forward
        and cls._coupling_transform_inverse is AffineCouplingTransform._coupling_transform_inverse
    ):
        return module._scale_and_shift
    from flowkit.layers.coupling import ClampedAffineCoupling

    if (
        isinstance(module, ClampedAffineCoupling)
        and cls._coupling_transform_forward is ClampedAffineCoupling._coupling_transform_forward
        and cls._coupling_transform_inverse is ClampedAffineCoupling._coupling_transform_inverse
        and hasattr(module, "_log_scale_and_shift")
    ):  # z_b = x_b * exp(s) + t, ladj = sum(s)

        def scale_and_shift(params: torch.Tensor):
            log_scale, shift = module._log_scale_and_shift(params)
            return log_scale.exp(), shift

        return scale_and_shift
    return None


def _affine_backward(inverse: bool, y_b, scale, shift, grad_b, grad_ladj):
    """``(x_b, dL/dx_b, dL/dscale, dL/dshift)`` of ``y_b = x_b * scale + shift``,
    ``ladj = sum log scale`` (``inverse``: ``y_b = (x_b - shift) / scale``, ``ladj = -sum log
    scale``), with ``x_b`` rebuilt from ``y_b``."""
    grad_ladj = grad_ladj.view(-1, *[1] * (y_b.dim() - 1))
    if not inverse:
        x_b = (y_b - shift) / scale
        return x_b, grad_b * scale, grad_b * x_b + grad_ladj / scale, grad_b
    x_b = y_b * scale + shift
    grad_x_b = grad_b / scale
    return x_b, grad_x_b, -(grad_x_b * y_b) - grad_ladj / scale, -grad_x_b


class _CouplingStep:
    """A coupling ``y_a = x_a, y_b = g(x_b; net(x_a, context))`` (nflows' ``CouplingTransform``
    contract: ``transform_net``, ``_coupling_transform_forward/_inverse``, identity and
    transform feature indices; nflows' affine/additive couplings, flowkit's
    ``ClampedAffineCoupling``, nflows' spline couplings).

    The backward pass runs the net once, with grad, on ``x_a = y_a`` (the fused inverse +
    recompute of reversible-network libraries: RevTorch, MemCNN, FrEIA); its output rebuilds
    ``x_b = g^-1(y_b)`` without a second net call.  For affine maps ``g`` (scale and shift)
    the elementwise gradients are written by hand and one autograd call goes from
    ``(scale, shift)`` through the net; for other maps the local graph of ``g`` is rebuilt
    from ``x_b`` and differentiated with the net.
    """

    def __init__(self, module, inverse: bool):
        self.modules = (module,)
        self.params: list[torch.Tensor] = []  # set by _collect_parameters
        self.module = module
        self.inverse = inverse
        forward, backward = module._coupling_transform_forward, module._coupling_transform_inverse
        self._apply, self._rebuild = (backward, forward) if inverse else (forward, backward)
        self._halves = _halves(module)
        self._scale_and_shift = _scale_and_shift_of(module)

    def _split(self, x: torch.Tensor):
        halves = self._halves
        if halves.identity is None:
            return x.index_select(1, self.module.identity_features), x.index_select(1, self.module.transform_features)
        return x[:, halves.identity], x[:, halves.transform]

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        halves = self._halves
        if halves.identity is None:
            out = a.new_empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]))
            out[:, self.module.identity_features] = a
            out[:, self.module.transform_features] = b
            return out
        return torch.cat([a, b] if halves.identity.start == 0 else [b, a], dim=1)

    def run(self, x: torch.Tensor, context):
        if x.dim() not in (2, 4) or x.shape[1] != self.module.features:
            raise ValueError(
                f"inputs: {type(self.module).__name__} expects a [batch, {self.module.features}] or "
                f"[batch, {self.module.features}, height, width] tensor, got shape {tuple(x.shape)}"
            )
        x_a, x_b = self._split(x)
        y_b, ladj = self._apply(x_b, self.module.transform_net(x_a.contiguous(), context))
        return self._merge(x_a, y_b), ladj

    def backprop(self, y, grad_y, grad_ladj, context, need: _Need) -> _Rebuilt:
        y_a, y_b = self._split(y)
        grad_a, grad_b = self._split(grad_y)
        x_a = y_a.contiguous().requires_grad_(need.x)  # the unchanged half: x_a = y_a
        with torch.enable_grad(), need.recompute():
            params = self.module.transform_net(x_a, context)  # the one net call of this backward
            if self._scale_and_shift is not None:
                scale, shift = self._scale_and_shift(params)
        if self._scale_and_shift is not None:
            with torch.no_grad():
                x_b, grad_x_b, grad_scale, grad_shift = _affine_backward(
                    self.inverse, y_b, scale, shift, grad_b, grad_ladj
                )
            grad_xs, grad_params, grad_context = _vjp((scale, shift), (grad_scale, grad_shift), [x_a], context, need)
        else:
            x_b, (grad_xs, grad_params, grad_context) = self._local_graph(
                y_b, params, grad_b, grad_ladj, [x_a], context, need
            )
            grad_x_b = grad_xs.pop() if need.x else None
        grad_x = None
        if need.x:
            through_net = grad_xs[0]
            grad_x = self._merge(grad_a if through_net is None else grad_a + through_net, _or_zeros(grad_x_b, x_b))
        return _Rebuilt(self._merge(x_a.detach(), x_b.detach()), grad_x, grad_params, grad_context)

    def _local_graph(self, y_b, params, grad_b, grad_ladj, inputs, context, need: _Need):
        """Any elementwise map: rebuild ``x_b``, re-run the map on it with grad, differentiate
        it together with the net.  Returns ``(x_b, _vjp(...))`` with ``x_b``'s gradient last
        among the input gradients."""
        with torch.no_grad():
            x_b, _ = self._rebuild(y_b, params.detach())
        x_b.requires_grad_(need.x)
        with torch.enable_grad(), need.recompute():
            y_b_again, ladj = self._apply(x_b, params)
        return x_b, _vjp((y_b_again, ladj), (grad_b, grad_ladj), [*inputs, x_b], context, need)


def _channel_affine(matrix: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x + bias`` over dim 1 of ``x`` ``[B, C, ...]`` at every other index."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    out = torch.baddbmm(bias.view(1, -1, 1), matrix.expand(x3.shape[0], -1, -1), x3)
    return out.view((x.shape[0], matrix.shape[0], *x.shape[2:]))


class _Affine(NamedTuple):
    """K stacked per-pixel affine maps ``y = A x + c``: ``matrix [K, C, C]``, ``bias [K, C]``
    and ``logdet [K] = log|det A|``."""

    matrix: torch.Tensor
    bias: torch.Tensor
    logdet: torch.Tensor


class _ChannelLinearStep:
    """A run of ``ActNorm`` / ``OneByOneConvolution`` layers: ``y = A x + c`` at every pixel,
    ``ladj = H * W * log|det A|``, with ``A`` one ``C x C`` matrix for the whole run (ActNorm
    scales, permutation and LU product folded together).

    Forward: one batched matmul.  Backward: ``x = A^-1 (y - c)``, ``dL/dx = A^T dL/dy``,
    ``dL/dA = sum dL/dy x^T``, ``dL/dc = sum dL/dy`` (no recomputed forward, no
    activation-sized graph); ``A`` and its inverse come from :class:`_ChannelMaps`, which also
    carries ``dL/dA`` etc. on to the parameters for all such steps at once.
    """

    def __init__(self, modules: Sequence[Transform], inverse: bool):
        self.modules = tuple(modules)
        self.params: list[torch.Tensor] = []  # set by _collect_parameters
        self.inverse = inverse
        self._four_d = any(isinstance(m, OneByOneConvolution) for m in modules)
        # set by _ChannelMaps for the duration of one forward / one backward pass:
        self.applied: _Affine | None = None  # (A, c, logdet) applied, no grad
        self.rebuild: tuple[torch.Tensor, ...] | None = None  # (R, r): x = R y + r
        self.grads: _Affine | None = None  # dL/dA, dL/dc, dL/dlogdet

    def signature(self) -> tuple:
        """Runs with equal signatures are built together (same layer types, sizes, dtypes)."""
        return tuple(
            (type(m), m.shift.shape, m.shift.dtype, m.shift.device)
            if isinstance(m, ActNorm)
            else (type(m), m.features, m.eps, m.bias.dtype, m.bias.device)
            for m in self.modules
        )

    def run(self, x: torch.Tensor, context):
        assert self.applied is not None, "_ChannelMaps.assign() first"
        matrix, bias, logdet = self.applied
        dims = (4,) if self._four_d else (2, 4)
        if x.dim() not in dims or x.shape[1] != matrix.shape[1]:
            names = "/".join(sorted({type(m).__name__ for m in self.modules}))
            expected = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(
                f"inputs: {names} expects a {expected} tensor with {matrix.shape[1]} channels, got shape {tuple(x.shape)}"
            )
        return _channel_affine(matrix, bias, x), (logdet * x[0, 0].numel()).expand(x.shape[0])

    def backprop(self, y, grad_y, grad_ladj, context, need: _Need) -> _Rebuilt:
        assert self.applied is not None and self.rebuild is not None, "_ChannelMaps.assign(backward=True) first"
        matrix = self.applied.matrix
        with torch.no_grad():  # in full precision even under autocast: rebuild errors compound
            dtype = torch.promote_types(y.dtype, matrix.dtype)
            x = _channel_affine(self.rebuild[0].to(dtype), self.rebuild[1].to(dtype), y.to(dtype))
            b, c = x.shape[:2]
            g3, x3 = grad_y.to(dtype).reshape(b, c, -1), x.reshape(b, c, -1)
            grad_x = torch.bmm(matrix.to(dtype).t().expand(b, -1, -1), g3).view_as(x) if need.x else None
            grads = (torch.bmm(g3, x3.transpose(1, 2)).sum(0), g3.sum((0, 2)), grad_ladj.sum() * x3.shape[2])
        self.grads = _Affine(*(g.to(matrix.dtype) for g in grads))
        return _Rebuilt(x, grad_x, [None] * len(need.params), None)


def _stack(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    return torch.stack([getattr(m, name) for m in modules])  # called under no_grad


@functools.lru_cache(maxsize=64)
def _triangle_indices(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row/column indices of the strict lower and upper triangles of ``n x n`` (nflows' order)."""
    lower, upper = torch.tril_indices(n, n, -1, device=device), torch.triu_indices(n, n, 1, device=device)
    return lower[0], lower[1], upper[0], upper[1]


class _ActNormMaps:
    """K nflows ``ActNorm`` layers: ``y = exp(log_scale) * x + shift`` per channel."""

    def __init__(self, modules: Sequence[ActNorm]):
        self.modules = modules

    def build(self) -> _Affine:
        log_scale = _stack(self.modules, "log_scale")
        self.scale = log_scale.exp()
        return _Affine(torch.diag_embed(self.scale), _stack(self.modules, "shift"), log_scale.sum(1))

    def grads(self, grad: _Affine) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        grad_log_scale = torch.diagonal(grad.matrix, dim1=1, dim2=2) * self.scale + grad.logdet[:, None]
        for i, m in enumerate(self.modules):
            yield m.log_scale, grad_log_scale[i]
            yield m.shift, grad.bias[i]


class _OneByOneMaps:
    """K nflows ``OneByOneConvolution`` layers: ``y = L U x[:, permutation] + bias`` per pixel,
    ``L`` unit lower triangular, ``U`` upper triangular with ``diag(U) = softplus(.) + eps``
    (nflows' ``LULinear`` parametrisation), ``log|det| = sum log diag(U)``."""

    def __init__(self, modules: Sequence[OneByOneConvolution]):
        self.modules = modules

    def build(self) -> _Affine:
        first = self.modules[0]
        k, n = len(self.modules), first.features
        lower_rows, lower_cols, upper_rows, upper_cols = _triangle_indices(n, first.bias.device)
        self.unconstrained = _stack(self.modules, "unconstrained_upper_diag")
        self.upper_diag = F.softplus(self.unconstrained) + first.eps
        self.lower = first.bias.new_zeros(k, n, n)
        self.lower[:, lower_rows, lower_cols] = _stack(self.modules, "lower_entries")
        self.lower.diagonal(dim1=1, dim2=2).fill_(1.0)
        self.upper = first.bias.new_zeros(k, n, n)
        self.upper[:, upper_rows, upper_cols] = _stack(self.modules, "upper_entries")
        self.upper.diagonal(dim1=1, dim2=2).copy_(self.upper_diag)
        self.permutation = torch.stack([m.permutation._permutation for m in self.modules])
        inverse_permutation = torch.argsort(self.permutation, dim=1)  # the layer's input is x[:, permutation]
        weight = torch.bmm(self.lower, self.upper).gather(2, inverse_permutation[:, None, :].expand(k, n, n))
        return _Affine(weight, _stack(self.modules, "bias"), self.upper_diag.log().sum(1))

    def grads(self, grad: _Affine) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.lower.shape[1]
        lower_rows, lower_cols, upper_rows, upper_cols = _triangle_indices(n, self.lower.device)
        grad_weight = grad.matrix.gather(2, self.permutation[:, None, :].expand_as(grad.matrix))
        grad_lower = torch.bmm(grad_weight, self.upper.transpose(1, 2))
        grad_upper = torch.bmm(self.lower.transpose(1, 2), grad_weight)
        grad_diag = torch.diagonal(grad_upper, dim1=1, dim2=2) + grad.logdet[:, None] / self.upper_diag
        grad_unconstrained = grad_diag * torch.sigmoid(self.unconstrained)
        grad_lower_entries = grad_lower[:, lower_rows, lower_cols]
        grad_upper_entries = grad_upper[:, upper_rows, upper_cols]
        for i, m in enumerate(self.modules):
            yield m.lower_entries, grad_lower_entries[i]
            yield m.upper_entries, grad_upper_entries[i]
            yield m.unconstrained_upper_diag, grad_unconstrained[i]
            yield m.bias, grad.bias[i]


class _ChannelGroup:
    """Channel-linear steps with equal signatures (same layer types and sizes in the same
    order), their maps built together: per layer position one stacked map, then composed.

    ``build()`` (no grad) returns the stacked maps applied by the steps (direction included);
    ``grads(grad_applied)`` carries the gradients of those maps to the layers' parameters by
    hand (reverse of the composition, then of each layer's parametrisation): a few dozen
    small ops per group, not per step, and no autograd graph.
    """

    def __init__(self, steps: list[_ChannelLinearStep]):
        self.steps = steps
        self.inverse = steps[0].inverse
        positions = range(len(steps[0].modules))
        self.layers = [
            (_ActNormMaps if isinstance(steps[0].modules[j], ActNorm) else _OneByOneMaps)(
                [step.modules[j] for step in steps]
            )
            for j in positions
        ]

    def build(self) -> tuple[_Affine, _Affine]:
        """``(applied, forward)``: the maps in the direction computed and in data -> latent."""
        self.layer_maps = [layer.build() for layer in self.layers]
        self.inputs: list[_Affine | None] = [None]  # the composed map before each layer
        total = self.layer_maps[0]
        for layer in self.layer_maps[1:]:
            self.inputs.append(total)
            total = _Affine(
                torch.bmm(layer.matrix, total.matrix),
                torch.bmm(layer.matrix, total.bias.unsqueeze(2)).squeeze(2) + layer.bias,
                total.logdet + layer.logdet,
            )
        self.forward = total
        if not self.inverse:
            return total, total
        inverse = torch.linalg.inv(total.matrix)
        self.applied = _Affine(inverse, -torch.bmm(inverse, total.bias.unsqueeze(2)).squeeze(2), -total.logdet)
        return self.applied, total

    def _forward_grad(self, grad: _Affine) -> _Affine:
        """Gradient w.r.t. the data -> latent map from that w.r.t. the applied one
        (``B = A^-1``, ``b = -B c``: ``dA = -B^T dB' B^T`` with ``dB' = dB - db c^T``)."""
        if not self.inverse:
            return grad
        inverse, bias = self.applied.matrix, self.forward.bias
        grad_inverse = grad.matrix - grad.bias.unsqueeze(2) * bias.unsqueeze(1)
        grad_matrix = -torch.bmm(inverse.transpose(1, 2), torch.bmm(grad_inverse, inverse.transpose(1, 2)))
        grad_bias = -torch.bmm(inverse.transpose(1, 2), grad.bias.unsqueeze(2)).squeeze(2)
        return _Affine(grad_matrix, grad_bias, -grad.logdet)

    def grads(self, grad_applied: _Affine) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        grad = self._forward_grad(grad_applied)
        for j in range(len(self.layers) - 1, -1, -1):
            before, layer = self.inputs[j], self.layer_maps[j]
            if before is None:  # the first layer: its input map is the identity
                grad_layer = grad
            else:
                grad_layer = _Affine(
                    torch.bmm(grad.matrix, before.matrix.transpose(1, 2))
                    + grad.bias.unsqueeze(2) * before.bias.unsqueeze(1),
                    grad.bias,
                    grad.logdet,
                )
                transposed = layer.matrix.transpose(1, 2)
                grad = _Affine(
                    torch.bmm(transposed, grad.matrix),
                    torch.bmm(transposed, grad.bias.unsqueeze(2)).squeeze(2),
                    grad.logdet,
                )
            yield from self.layers[j].grads(grad_layer)


class _ChannelMaps:
    """The maps of all ``_ChannelLinearStep``s of a plan, built in :class:`_ChannelGroup`s
    (one per signature: a few dozen small ops per composite, not per step).

    ``assign(backward=False)`` (forward pass) gives every step its ``(A, c, logdet)``;
    ``assign(backward=True)`` (start of the backward pass) builds them again and adds the
    maps that rebuild the inputs; ``backprop`` (end of the backward pass) carries every
    step's ``dL/dA, dL/dc, dL/dlogdet`` to the parameters; ``release`` drops it all (nothing
    but the plan is kept from the forward to the backward pass).
    """

    def __init__(self, steps: Sequence):
        groups: dict[tuple, list[_ChannelLinearStep]] = {}
        for step in steps:
            if isinstance(step, _ChannelLinearStep):
                groups.setdefault(step.signature(), []).append(step)
        self._step_groups = list(groups.values())
        self._built: list[_ChannelGroup] = []

    def assign(self, backward: bool) -> None:
        self._built = [_ChannelGroup(steps) for steps in self._step_groups]
        with torch.no_grad():
            for group in self._built:
                applied, forward = group.build()
                rebuild: tuple[torch.Tensor, ...] = ()
                if backward and group.inverse:  # the applied map is A^-1: rebuild with A itself
                    rebuild = (forward.matrix, forward.bias)
                elif backward:
                    inverse = torch.linalg.inv(forward.matrix)
                    rebuild = (inverse, -torch.bmm(inverse, forward.bias.unsqueeze(2)).squeeze(2))
                per_step = zip(*(t.unbind(0) for t in applied), strict=True)
                rebuilds: Iterable = zip(*(t.unbind(0) for t in rebuild), strict=True) if backward else repeat(None)
                for step, maps, rebuild_maps in zip(group.steps, per_step, rebuilds, strict=False):
                    step.applied, step.rebuild = _Affine(*maps), rebuild_maps

    def backprop(self, params: _ParamGrads) -> None:
        with torch.no_grad():
            for group in self._built:
                grads = [step.grads for step in group.steps]
                if all(g is not None for g in grads):
                    grad = _Affine(*(torch.stack(parts) for parts in zip(*grads, strict=True)))
                    params.add_pairs(group.grads(grad))

    def release(self) -> None:
        self._built = []
        for steps in self._step_groups:
            for step in steps:
                step.applied = step.rebuild = step.grads = None


# ----------------------------------------------------------------------------------------
# Which step handles which transform.
# ----------------------------------------------------------------------------------------


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _overrides(module: nn.Module, base: type, names: Iterable[str]) -> bool:
    return any(getattr(type(module), name) is not getattr(base, name) for name in names)


def _is_channel_linear(module: nn.Module) -> bool:
    """nflows' own ``ActNorm`` / ``OneByOneConvolution`` (not overridden, no hooks)."""
    if _has_hooks(module):
        return False
    if isinstance(module, ActNorm):
        return not _overrides(module, ActNorm, ("forward", "inverse"))
    return (
        isinstance(module, OneByOneConvolution)
        and not _overrides(module, OneByOneConvolution, ("forward", "inverse", "_lu_forward_inverse", "logabsdet"))
        and not _overrides(module, OneByOneConvolution, ("_create_lower_upper", "upper_diag", "weight"))
        and type(module.permutation).forward is Permutation.forward
        and not _has_hooks(module.permutation)
    )


_COUPLING_PARTS = ("transform_net", "_coupling_transform_forward", "_coupling_transform_inverse", "features")


def _is_fusable_coupling(module: nn.Module) -> bool:
    """A coupling with nflows' split semantics: the parts of ``CouplingTransform`` present,
    ``forward``/``inverse`` not overridden, no unconditional transform, no hooks."""
    return (
        isinstance(module, Transform)
        and all(hasattr(module, name) for name in (*_COUPLING_PARTS, "identity_features", "transform_features"))
        and getattr(module, "unconditional_transform", None) is None
        and type(module).forward is CouplingTransform.forward
        and type(module).inverse is CouplingTransform.inverse
        and not _has_hooks(module)
    )


def _leaves(transforms: Iterable[Transform]) -> Iterator[Transform]:
    """The transforms of nested (plain, hook-free) composites, in application order."""
    for t in transforms:
        flat = isinstance(t, MemorySavingComposite) or (
            isinstance(t, CompositeTransform) and not _overrides(t, CompositeTransform, ("forward", "inverse"))
        )
        if flat and not _has_hooks(t):
            yield from _leaves(t._transforms)
        else:
            yield t


def _plan(transforms: Iterable[Transform], inverse: bool) -> list:
    """The steps that compute the composite (in the direction computed)."""
    groups: list[tuple[type, list]] = []
    for t in _leaves(transforms):
        if _is_channel_linear(t):
            if groups and groups[-1][0] is _ChannelLinearStep:
                groups[-1][1].append(t)
            else:
                groups.append((_ChannelLinearStep, [t]))
        else:
            groups.append((_CouplingStep if _is_fusable_coupling(t) else _GenericStep, [t]))
    if inverse:
        groups.reverse()
    return [kind(modules if kind is _ChannelLinearStep else modules[0], inverse) for kind, modules in groups]


def _collect_parameters(steps: Sequence) -> tuple[torch.Tensor, ...]:
    """Set each step's ``params`` (its parameters that require grad, each once) and return
    all of them, each once, in order."""
    found: dict[int, torch.Tensor] = {}
    for step in steps:
        mine = {id(p): p for m in step.modules for p in m.parameters() if p.requires_grad}
        step.params = list(mine.values())
        found.update(mine)
    return tuple(found.values())


def _fused_actnorms_uninitialized(steps: Sequence) -> bool:
    """Whether an ``ActNorm`` whose forward the plan bypasses still waits for its data-dependent
    init (others, e.g. inside a coupling net or a generic step, initialise themselves when the
    forward pass calls them)."""
    flags = [
        m.initialized
        for step in steps
        if isinstance(step, _ChannelLinearStep)
        for m in step.modules
        if isinstance(m, ActNorm)
    ]
    return bool(flags) and not bool(torch.stack([f.to(torch.bool) for f in flags]).all())


class _ParamGrads:
    """Gradients of the composite's parameters, accumulated step by step (a parameter shared
    by several steps gets the sum)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self._index = {id(p): i for i, p in enumerate(params)}
        self.grads: list[torch.Tensor | None] = [None] * len(params)

    def add_pairs(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add ``(parameter, gradient)`` pairs; parameters not wanted are skipped."""
        for p, g in pairs:
            i = self._index.get(id(p))
            if i is not None:
                current = self.grads[i]
                self.grads[i] = g if current is None else current + g

    def add(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                i = self._index[id(p)]
                current = self.grads[i]
                self.grads[i] = g if current is None else current + g


def _recompute_mode(device_type: str, autocast) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context the forward ran in (for layers re-run in backward)."""
    if autocast is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, enabled=autocast[0], dtype=autocast[1])


class _InvertibleSequence(torch.autograd.Function):
    """``(outputs, logabsdet)`` of ``steps`` run in order; stores only ``outputs``.

    ``steps``: ``_GenericStep`` / ``_CouplingStep`` / ``_ChannelLinearStep`` (``run`` in the
    forward pass, ``backprop`` in the backward pass).  ``params`` are the composite's
    parameters that require grad.  ``monitor`` is ``None`` or the composite: then ``inputs``
    are stored too and the backward pass compares them with their reconstruction
    (``monitor.max_reconstruction_error``).
    """

    @staticmethod
    def forward(ctx, steps, monitor, inputs, context, *params):  # runs under no_grad
        outputs = inputs
        total = inputs.new_zeros(inputs.shape[0])
        maps = _ChannelMaps(steps)
        maps.assign(backward=False)
        for step in steps:
            outputs, ladj = step.run(outputs, context)
            total = total + ladj
        maps.release()
        ctx.maps = maps
        if _shares_storage(outputs, inputs):  # e.g. only reshapes: do not return a view of an input
            outputs = outputs.clone()
        ctx.steps = steps
        ctx.monitor = monitor
        ctx.params = params
        ctx.has_context = isinstance(context, torch.Tensor)
        ctx.autocast = (inputs.device.type, _autocast_state(inputs.device.type))
        if not ctx.has_context:
            ctx.context = context  # None (or a non-tensor context, passed through as is)
        ctx.save_for_backward(
            outputs, *([inputs] if monitor is not None else []), *([context] if ctx.has_context else [])
        )
        return outputs, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_outputs, grad_logabsdet):
        saved = list(ctx.saved_tensors)
        y = saved.pop(0).detach()
        true_inputs = saved.pop(0) if ctx.monitor is not None else None
        want_context = ctx.has_context and ctx.needs_input_grad[3]
        context = saved.pop(0).detach().requires_grad_(want_context) if ctx.has_context else ctx.context
        params = _ParamGrads(ctx.params)
        context_grad = None
        grad_y = grad_outputs
        recompute = _recompute_mode(*ctx.autocast)
        ctx.maps.assign(backward=True)
        for k in range(len(ctx.steps) - 1, -1, -1):
            step = ctx.steps[k]
            need = _Need(k > 0 or ctx.needs_input_grad[2], want_context, step.params, recompute)
            rebuilt = step.backprop(y, grad_y, grad_logabsdet, context, need)
            params.add(need.params, rebuilt.grad_params)
            if rebuilt.grad_context is not None:
                context_grad = rebuilt.grad_context if context_grad is None else context_grad + rebuilt.grad_context
            y, grad_y = rebuilt.x, rebuilt.grad_x
            del rebuilt
        ctx.maps.backprop(params)
        ctx.maps.release()
        if true_inputs is not None:
            _report_reconstruction(ctx.monitor, y, true_inputs)
        input_grad = grad_y if ctx.needs_input_grad[2] else None
        return (None, None, input_grad, context_grad, *params.grads)


def _report_reconstruction(monitor, rebuilt: torch.Tensor, true_inputs: torch.Tensor) -> None:
    scale = true_inputs.abs().max().clamp_min(torch.finfo(true_inputs.dtype).tiny)
    error = ((rebuilt - true_inputs).abs().max() / scale).item()
    monitor.last_reconstruction_error = error
    if not error <= monitor.max_reconstruction_error:  # also catches nan
        warnings.warn(
            f"MemorySavingComposite: the input rebuilt in the backward pass differs from the true "
            f"input by {error:.2e} (relative), above max_reconstruction_error="
            f"{monitor.max_reconstruction_error:g}; the stack is numerically ill-conditioned and its "
            "gradients are unreliable. Split it into shorter MemorySavingComposites or train without "
            "memory saving.",
            RuntimeWarning,
            stacklevel=2,
        )


def _rejection(module: nn.Module) -> str | None:
    """Why ``module`` cannot sit inside a memory-saving composite (None if it can)."""
    name = type(module).__name__
    if hasattr(module, "forward_with_noise") and hasattr(module, "sample_noise"):
        return (
            f"{name} is stochastic (its forward draws noise), so its input cannot be rebuilt "
            "from its output; keep it outside (ImageFlow applies dequantization before the flow)"
        )
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _NflowsBatchNorm)):
        return f"{name} uses batch statistics in training (no exact inverse, running stats updated twice); use ActNorm"
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"{name}(p={module.p}) is random in training, so the recomputed forward would differ; use p=0"
    if isinstance(module, Transform) and type(module).inverse is Transform.inverse:
        return f"{name} has no inverse, so its input cannot be rebuilt from its output"
    return None


class MemorySavingComposite(Transform):
    """A ``CompositeTransform`` that does not store intermediate activations in training.

    ``z = f_K(... f_1(x))``, ``logabsdet = sum_k log|det df_k/dx_{k-1}|``; gradients are
    computed by rebuilding ``x_{k-1} = f_k^{-1}(x_k)`` step by step in the backward pass,
    fused with the recomputation for couplings and ActNorm / 1x1-convolution runs (details,
    rules, measured cost and float32 drift in the module docstring).

    Args:
        transforms: deterministic invertible nflows transforms, applied in order (Glow
            steps: ``ActNorm``, ``OneByOneConvolution``, ``AffineCouplingTransform`` /
            ``AdditiveCouplingTransform`` / ``ClampedAffineCoupling``, fused; any other
            invertible ``Transform``, e.g. :class:`~flowkit.layers.MaskedAffineCoupling`
            or ``SqueezeTransform``, generically; ``CompositeTransform`` of those).
        max_reconstruction_error: if set, the input is stored as well (one more activation,
            still independent of depth) and every memory-saving backward compares it with
            its reconstruction ``f^-1(f(x))``; the relative error
            ``max|x_rebuilt - x| / max|x|`` is kept in ``last_reconstruction_error`` and a
            ``RuntimeWarning`` is issued when it exceeds this value (``1e-3`` is a sensible
            float32 choice).  Costs one device sync per backward.  ``None``: no check.

    Raises:
        TypeError: an element is not an nflows ``Transform``; ``max_reconstruction_error``
            is not a number.
        ValueError: ``transforms`` is empty, or an element (or a module inside it) is
            stochastic, uses batch statistics or dropout, or has no inverse;
            ``max_reconstruction_error`` is not positive and finite.

    Example:
        >>> import torch
        >>> from nflows.transforms import ActNorm, OneByOneConvolution
        >>> flow = MemorySavingComposite([ActNorm(4), OneByOneConvolution(4)])
        >>> z, ladj = flow(torch.randn(2, 4, 3, 3, requires_grad=True))
        >>> (z.square().sum() - ladj.sum()).backward()
    """

    def __init__(self, transforms: Iterable[Transform], max_reconstruction_error: float | None = None):
        super().__init__()
        if max_reconstruction_error is not None:
            max_reconstruction_error = check_float(
                "max_reconstruction_error", max_reconstruction_error, 0, low_open=True
            )
        self.max_reconstruction_error = max_reconstruction_error
        self.last_reconstruction_error: float | None = None
        if isinstance(transforms, (Transform, torch.Tensor)) or not isinstance(transforms, Iterable):
            raise TypeError(f"transforms: expected a list of nflows Transforms, got {type(transforms).__name__}")
        transforms = list(transforms)
        if not transforms:
            raise ValueError("transforms: expected at least one transform, got an empty list")
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"transforms[{i}]: expected an nflows Transform, got {type(t).__name__}")
            for sub in t.modules():
                reason = _rejection(sub)
                if reason is not None:
                    where = "" if sub is t else f" (inside {type(t).__name__})"
                    raise ValueError(f"transforms[{i}]: cannot be used in MemorySavingComposite{where}: {reason}")
        self._transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def _saving_plan(self, inputs: torch.Tensor, context, inverse: bool):
        """``(steps, parameters)`` of the memory-saving path, or ``None`` where the plain
        composite runs: not training, grad disabled, or nothing that requires grad."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        steps = _plan(self._transforms, inverse)
        params = _collect_parameters(steps)
        if params or inputs.requires_grad or (isinstance(context, torch.Tensor) and context.requires_grad):
            return steps, params
        return None

    def forward(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        plan = self._saving_plan(inputs, context, inverse=False)
        if plan is None:
            return CompositeTransform._cascade(inputs, self._transforms, context)
        steps, params = plan
        if _fused_actnorms_uninitialized(steps):
            with torch.no_grad():  # data-dependent init, in order, on this batch
                CompositeTransform._cascade(inputs, self._transforms, context)
        return _InvertibleSequence.apply(steps, self._monitor(), inputs, context, *params)

    def inverse(self, inputs: torch.Tensor, context: Context = None) -> TransformResult:
        plan = self._saving_plan(inputs, context, inverse=True)
        if plan is None or _fused_actnorms_uninitialized(plan[0]):
            funcs = (t.inverse for t in self._transforms[::-1])
            return CompositeTransform._cascade(inputs, funcs, context)
        return _InvertibleSequence.apply(plan[0], self._monitor(), inputs, context, *plan[1])

    def _monitor(self):
        return None if self.max_reconstruction_error is None else self
