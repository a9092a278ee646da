"""Fixes for nflows 0.14 on current PyTorch, all devices and dtypes, in one place.

nflows' last release (0.14) predates fixes that never shipped.  flowkit applies these
patches when it is imported (``import flowkit``), so flowkit's models *and* any model a
user builds from nflows' own classes work on CUDA and in float64:

``LULinear.weight_inverse``
    builds ``torch.eye`` with no device/dtype, so the cached inverse of
    ``LULinear``/``OneByOneConvolution`` (used in ``eval()`` with ``using_cache=True``)
    fails on CUDA and in float64.  Patched to build the identity like the weights.
``LULinear.inverse_no_cache`` / ``weight_inverse``
    use ``torch.triangular_solve``, deprecated in PyTorch.  Patched to
    ``torch.linalg.solve_triangular``.
``Linear`` cache (``LULinear``, ``OneByOneConvolution`` with ``using_cache=True``)
    is a plain attribute: ``.to(device)``, ``.double()`` and ``load_state_dict`` leave a
    stale weight/inverse of the old device, dtype or values behind, used in ``eval()``.
    Patched to drop the cache whenever parameters are moved, cast or loaded.
``Sigmoid`` (and ``Logit``, which wraps it)
    keeps ``temperature`` as a plain tensor attribute, so ``.to(device)``/``.double()``
    do not move it and the layer fails on CUDA / in float64.  Patched to register it as a
    (non-persistent, so state_dicts are unchanged) buffer.
``ActNorm._initialize``
    replaces the ``initialized`` buffer with a new CPU tensor, so after the data-dependent
    init on CUDA one buffer lives on the CPU (DistributedDataParallel's buffer broadcast
    then fails).  It also divides by the per-channel standard deviation unguarded, so a
    constant channel in the first batch (an all-black border) gives an infinite log-scale.
    Patched to fill the buffer in place and floor the standard deviation at 1e-6.
``ActNorm.forward``
    reads the ``initialized`` buffer (``if self.training and not self.initialized``) on every
    training call: a host-device synchronisation per layer per step, and a graph break under
    ``torch.compile``.  Patched to read it only when the buffer is new or was written since
    (its version counter changed), so an initialised Glow traces into one graph (its test,
    with the other hot-path tests, is in ``tests/test_compile.py``).

Each patch has a test in ``tests/test_nflows_compat.py`` that fails without it
(:func:`unpatched` restores the originals for that purpose).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from nflows.transforms import linear as _linear
from nflows.transforms import lu as _lu
from nflows.transforms import nonlinearities as _nl
from nflows.transforms import normalization as _norm

__all__ = ["apply_patches", "unpatched", "PATCHES"]


def _weight_inverse(self) -> torch.Tensor:
    lower, upper = self._create_lower_upper()
    identity = torch.eye(self.features, dtype=lower.dtype, device=lower.device)
    lower_inverse = torch.linalg.solve_triangular(lower, identity, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper, lower_inverse, upper=True)


def _inverse_no_cache(self, inputs: torch.Tensor):
    lower, upper = self._create_lower_upper()
    outputs = (inputs - self.bias).t()
    outputs = torch.linalg.solve_triangular(lower, outputs, upper=False, unitriangular=True)
    outputs = torch.linalg.solve_triangular(upper, outputs, upper=True).t()
    logabsdet = -self.logabsdet() * inputs.new_ones(outputs.shape[0])
    return outputs, logabsdet


_original_sigmoid_init = _nl.Sigmoid.__init__


def _sigmoid_init(self, temperature=1, eps=1e-6, learn_temperature=False):
    _original_sigmoid_init(self, temperature=temperature, eps=eps, learn_temperature=learn_temperature)
    if not isinstance(self.temperature, torch.nn.Parameter):
        value = self.temperature
        del self.temperature
        self.register_buffer("temperature", value, persistent=False)


def _actnorm_initialize(self, inputs: torch.Tensor) -> None:
    if inputs.dim() == 4:
        inputs = inputs.permute(0, 2, 3, 1).reshape(-1, inputs.shape[1])
    with torch.no_grad():
        std = inputs.std(dim=0).clamp_min(1e-6)
        mu = (inputs / std).mean(dim=0)
        self.log_scale.copy_(-torch.log(std))
        self.shift.copy_(-mu)
        self.initialized.fill_(True)


def _actnorm_forward(self, inputs: torch.Tensor, context=None):
    """nflows' ``ActNorm.forward`` without reading the ``initialized`` buffer on every call.

    nflows tests ``self.training and not self.initialized`` (a tensor) in every training
    forward: one device read per ActNorm per step, and a graph break under ``torch.compile``.
    This reads the buffer only when it is new or has been written since the last read (its
    version counter, a host-side number, changed: ``.to()``, ``load_state_dict``, the data-
    dependent init) and remembers the answer on the layer, so an initialised ActNorm costs no
    read and traces into one graph.  The math is nflows' own.
    """
    if inputs.dim() not in (2, 4):
        raise ValueError("Expecting inputs to be a 2D or a 4D tensor.")
    if self.training:
        flag = self.initialized
        seen = self.__dict__.get("_flowkit_initialized_seen")
        compiling = torch.compiler.is_compiling()
        key = None if compiling or flag.is_inference() else (id(flag), flag._version)
        if seen is None or (not compiling and seen != key):
            if not bool(flag):
                self._initialize(inputs)
            if not compiling and not flag.is_inference():
                self.__dict__["_flowkit_initialized_seen"] = (id(flag), flag._version)
    scale, shift = self._broadcastable_scale_shift(inputs)
    outputs = scale * inputs + shift
    per_sample = torch.sum(self.log_scale) * (inputs.shape[2] * inputs.shape[3] if inputs.dim() == 4 else 1)
    return outputs, per_sample * outputs.new_ones(inputs.shape[0])


def _linear_apply(self, fn, *args, **kwargs):
    self.cache.invalidate()
    return torch.nn.Module._apply(self, fn, *args, **kwargs)


def _linear_load_from_state_dict(self, *args, **kwargs):
    self.cache.invalidate()
    return torch.nn.Module._load_from_state_dict(self, *args, **kwargs)


# (owner class, attribute, replacement)
PATCHES: list[tuple[type, str, Callable]] = [
    (_lu.LULinear, "weight_inverse", _weight_inverse),
    (_lu.LULinear, "inverse_no_cache", _inverse_no_cache),
    (_linear.Linear, "_apply", _linear_apply),
    (_linear.Linear, "_load_from_state_dict", _linear_load_from_state_dict),
    (_nl.Sigmoid, "__init__", _sigmoid_init),
    (_norm.ActNorm, "_initialize", _actnorm_initialize),
    (_norm.ActNorm, "forward", _actnorm_forward),
]
_MISSING = object()
_ORIGINALS = {(owner, name): owner.__dict__.get(name, _MISSING) for owner, name, _ in PATCHES}


def apply_patches() -> None:
    """Install every fix (idempotent). Called by ``import flowkit``."""
    for owner, name, fn in PATCHES:
        setattr(owner, name, fn)


@contextlib.contextmanager
def unpatched() -> Iterator[None]:
    """Temporarily restore nflows' original code (for tests that show a patch is needed)."""
    for (owner, name), original in _ORIGINALS.items():
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    try:
        yield
    finally:
        apply_patches()
