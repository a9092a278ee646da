"""Invertible backprop: run a stack of bijections without storing their activations.

:class:`MemorySavingComposite` computes exactly what ``nflows.transforms.CompositeTransform``
computes, ``z = f_K(... f_1(x))`` and ``logabsdet = sum_k log|det J_{f_k}|``, but in training
it keeps only the final output.  In the backward pass it walks the steps in reverse, rebuilds
each step's input from its output, ``x_{k-1} = f_k^{-1}(x_k)``, re-runs ``f_k`` on it with
grad enabled and backpropagates the incoming gradients of ``z`` and ``logabsdet`` through that
one step (Gomez et al., 2017, "The Reversible Residual Network"; the memory argument of
Kingma & Dhariwal, 2018, Glow).  Memory for activations is then one step's worth instead of
``K`` steps' worth; the price is one extra inverse and one extra forward per step.

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
* ActNorm's data-dependent init: if an ``ActNorm`` inside is uninitialised when a training
  forward arrives, the composite first runs one plain forward under ``torch.no_grad()``
  (which initialises every ActNorm on this batch, in order, exactly as the plain composite
  would) and then the memory-saving pass.  In the ``inverse`` direction an uninitialised
  ActNorm makes the call fall back to the plain composite (nflows initialises ActNorm
  only in ``forward``).
* ``context`` is passed to every step; its gradient is returned when it requires grad.
* Parameters get their gradients through the autograd graph (they are inputs of the
  custom ``autograd.Function``), so optimisers, ``clip_grad_norm_`` and
  DistributedDataParallel's gradient hooks see them as usual.  Double backward
  (``create_graph=True``) is not supported.  Module forward hooks of the steps run twice
  per training step (forward and recompute).  Autocast state is recorded in the forward
  and restored for the recompute.
* ``state_dict`` keys are those of ``CompositeTransform`` (``_transforms.<i>....``), so a
  checkpoint moves between the plain and the memory-saving model.

Numerical drift.  The rebuilt inputs ``f^-1(f(x))`` differ from the true ones by round-off,
and the reverse walk compounds it by the condition numbers of the steps.  Measured with
``python benchmarks/bench_memory.py --drift`` on a 2-core CPU: K Glow steps (nflows
``ActNorm -> OneByOneConvolution -> AffineCouplingTransform`` with ``gated_conv_net(16, 1)``)
on ``[4, 8, 8, 8]`` inputs, parameters perturbed with ``perturb_parameters(scale=p)``
(larger ``p``: couplings further from the identity, worse conditioned), ActNorm initialised
on the batch, loss = mean NLL under N(0, I).  "grad" = max over the input and every
parameter of ``max|g_saving - g_plain| / max|g_plain|``; "roundtrip" =
``max|f^-1(f(x)) - x| / max|x|`` of the whole stack; "f32 itself" = plain float32 vs plain
float64 gradients (float32's own error, for scale):

===  ===  ==========  ==========  ============  ============  ==========
p    K    grad f32    grad f64    roundtrip32   roundtrip64   f32 itself
===  ===  ==========  ==========  ============  ============  ==========
.01  8    1.2e-06     3.3e-16     4.0e-07       1.1e-15       3.5e-06
.01  32   1.6e-06     1.1e-15     9.2e-07       2.0e-15       5.7e-06
.01  64   2.5e-06     1.7e-15     1.5e-06       3.6e-15       8.0e-06
.03  8    8.4e-07     7.2e-16     7.6e-07       1.2e-15       1.6e-06
.03  32   8.8e-06     8.1e-15     7.5e-06       1.2e-14       2.5e-06
.03  64   2.8e-04     1.8e-13     2.1e-04       3.6e-13       4.9e-06
.1   8    6.4e-05     1.2e-13     1.1e-04       2.6e-13       2.3e-06
.1   32   9.4e+02     8.7e-05     8.6e+03       1.4e-04       4.8e-05
.1   64   9.8e+06     2.9e+04     4.1e+10       1.6e+05       3.4e-04
===  ===  ==========  ==========  ============  ============  ==========

So: with well-conditioned steps the float32 drift stays at the level of float32's own
error even at 64 steps (float64 agrees to ~1e-15); but the drift tracks the stack's
round-trip error, and a stack whose steps contract strongly (nflows' affine scale
``sigmoid(h + 2) + 1e-3`` can reach 1e-3) becomes numerically non-invertible: at p=0.1
and 32 steps float32 gradients are garbage, and at 64 steps even float64 fails.  Guard
against it with ``max_reconstruction_error`` (checks the rebuilt input in every backward
and warns), by splitting a deep stack into several shorter composites (each stores its
output; memory then grows with the number of composites, not of steps), or by monitoring
``flowkit.check_transform(flow, batch).roundtrip_error`` during training.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch
from nflows.transforms import ActNorm, CompositeTransform, Transform
from nflows.transforms.normalization import BatchNorm as _NflowsBatchNorm
from torch import nn

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


class _InvertibleSequence(torch.autograd.Function):
    """``(outputs, logabsdet)`` of ``steps`` applied in order; stores only ``outputs``.

    ``steps`` is a list of ``(module, apply, rebuild)``: ``apply(x, context) -> (y, ladj)``
    is the step in the direction being computed, ``rebuild(y, context) -> (x, _)`` its
    inverse.  ``params`` are the composite's parameters that require grad.  ``monitor`` is
    ``None`` or the composite: then ``inputs`` are stored too and the backward pass compares
    them with their reconstruction (``monitor.max_reconstruction_error``).
    """

    @staticmethod
    def forward(ctx, steps, monitor, inputs, context, *params):  # runs under no_grad
        outputs = inputs
        total = inputs.new_zeros(inputs.shape[0])
        for _, apply, _ in steps:
            outputs, ladj = apply(outputs, context)
            total = total + ladj
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
        if ctx.has_context:
            context = saved.pop(0).detach().requires_grad_(want_context)
        else:
            context = ctx.context
        index = {id(p): i for i, p in enumerate(ctx.params)}
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        context_grad = None
        grad_y = grad_outputs
        device_type, autocast = ctx.autocast
        recompute_mode = (
            torch.autocast(device_type, enabled=autocast[0], dtype=autocast[1])
            if autocast is not None
            else contextlib.nullcontext()
        )
        steps = ctx.steps
        for k in range(len(steps) - 1, -1, -1):
            module, apply, rebuild = steps[k]
            with torch.no_grad():
                x, _ = rebuild(y, context)
            need_x = k > 0 or ctx.needs_input_grad[2]
            x = x.detach().requires_grad_(need_x)
            step_params = [p for p in module.parameters() if id(p) in index]
            wrt = ([x] if need_x else []) + step_params + ([context] if want_context else [])
            with torch.enable_grad(), recompute_mode:
                y_again, ladj = apply(x, context)
            pairs = [(o, g) for o, g in ((y_again, grad_y), (ladj, grad_logabsdet)) if o.requires_grad]
            if pairs and wrt:
                grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            else:
                grads = (None,) * len(wrt)
            grads = list(grads)
            if need_x:
                g = grads.pop(0)
                grad_y = g if g is not None else torch.zeros_like(x)
            if want_context:
                g = grads.pop()
                if g is not None:
                    context_grad = g if context_grad is None else context_grad + g
            for p, g in zip(step_params, grads, strict=False):
                if g is not None:
                    i = index[id(p)]
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            y = x.detach()
            del y_again, ladj, pairs, grads
        if true_inputs is not None:
            _report_reconstruction(ctx.monitor, y, true_inputs)
        input_grad = grad_y if ctx.needs_input_grad[2] else None
        return (None, None, input_grad, context_grad, *param_grads)


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
    computed by rebuilding ``x_{k-1} = f_k^{-1}(x_k)`` step by step in the backward pass
    (details, rules and measured float32 drift in the module docstring).

    Args:
        transforms: deterministic invertible nflows transforms (Glow steps: ``ActNorm``,
            ``OneByOneConvolution``, ``AffineCouplingTransform`` /
            ``AdditiveCouplingTransform``; :class:`~flowkit.layers.MaskedAffineCoupling`;
            ``SqueezeTransform``; ``CompositeTransform`` of those), applied in order.
        max_reconstruction_error: if set, the input is stored as well (one more activation,
            still independent of depth) and every memory-saving backward compares it with
            its reconstruction ``f^-1(f(x))``; the relative error
            ``max|x_rebuilt - x| / max|x|`` is kept in ``last_reconstruction_error`` and a
            ``RuntimeWarning`` is issued when it exceeds this value (``1e-3`` is a sensible
            float32 choice).  Costs one device sync per backward.  ``None``: no check.

    Raises:
        TypeError: an element is not an nflows ``Transform``.
        ValueError: ``transforms`` is empty, or an element (or a module inside it) is
            stochastic, uses batch statistics or dropout, or has no inverse.

    Example:
        >>> import torch
        >>> from nflows.transforms import ActNorm, OneByOneConvolution
        >>> flow = MemorySavingComposite([ActNorm(4), OneByOneConvolution(4)])
        >>> z, ladj = flow(torch.randn(2, 4, 3, 3, requires_grad=True))
        >>> (z.square().sum() - ladj.sum()).backward()
    """

    def __init__(self, transforms: Iterable[Transform], max_reconstruction_error: float | None = None):
        super().__init__()
        if max_reconstruction_error is not None and (
            isinstance(max_reconstruction_error, bool)
            or not isinstance(max_reconstruction_error, (int, float))
            or not max_reconstruction_error > 0
        ):
            raise ValueError(
                f"max_reconstruction_error: expected a positive float or None, got {max_reconstruction_error!r}"
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

    def _wants_saving(self, inputs: torch.Tensor, context) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        if inputs.requires_grad or (isinstance(context, torch.Tensor) and context.requires_grad):
            return True
        return any(p.requires_grad for p in self.parameters())

    def _actnorms_uninitialized(self) -> bool:
        flags = [m.initialized for m in self.modules() if isinstance(m, ActNorm)]
        return bool(flags) and not bool(torch.stack([f.to(torch.bool) for f in flags]).all())

    def _params(self) -> tuple[torch.Tensor, ...]:
        return tuple(p for p in self.parameters() if p.requires_grad)

    def forward(self, inputs: torch.Tensor, context=None):
        if not self._wants_saving(inputs, context):
            return CompositeTransform._cascade(inputs, self._transforms, context)
        if self._actnorms_uninitialized():
            with torch.no_grad():  # data-dependent init, in order, on this batch
                CompositeTransform._cascade(inputs, self._transforms, context)
        steps = [(t, t, t.inverse) for t in self._transforms]
        return _InvertibleSequence.apply(steps, self._monitor(), inputs, context, *self._params())

    def inverse(self, inputs: torch.Tensor, context=None):
        if not self._wants_saving(inputs, context) or self._actnorms_uninitialized():
            funcs = (t.inverse for t in self._transforms[::-1])
            return CompositeTransform._cascade(inputs, funcs, context)
        steps = [(t, t.inverse, t) for t in reversed(self._transforms)]
        return _InvertibleSequence.apply(steps, self._monitor(), inputs, context, *self._params())

    def _monitor(self):
        return None if self.max_reconstruction_error is None else self
