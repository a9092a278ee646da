"""Fixes for nflows 0.14 on current PyTorch, all devices and dtypes, in one place.

nflows' last release (0.14) predates fixes that never shipped. ``import flowkit`` installs the
fixes in :data:`PATCHES`, so flowkit's models *and* any model a user builds from nflows' own
classes work on CUDA and in float64. Each fix first checks that nflows is version 0.14 and that
the function it replaces is the one it was written for (the SHA-256 of its source); otherwise
it leaves nflows alone and warns once (see :mod:`flowkit._patching`). No fix overrides a torch
method (``_apply``, ``_load_from_state_dict``): only nflows' own functions are replaced.

======================================  ============================================================
fix                                     what changes
======================================  ============================================================
``LULinear.weight_inverse``             identity built on the weights' device/dtype, and
                                        ``torch.linalg.solve_triangular`` (the cached inverse of
                                        ``LULinear``/``OneByOneConvolution`` failed on CUDA and in
                                        float64)
``LULinear.inverse_no_cache``           ``torch.linalg.solve_triangular`` instead of the
                                        deprecated ``torch.triangular_solve``
``Linear._check_forward_cache``,        the eval-mode cache of ``LULinear``/``OneByOneConvolution``
``Linear._check_inverse_cache``         is refilled when a parameter changed device, dtype or
                                        values since it was filled (``.to()``, ``.double()``,
                                        ``load_state_dict``, an in-place edit) instead of using a
                                        stale weight
``Sigmoid.__init__``                    ``temperature`` (also of ``Logit``) is a non-persistent
                                        buffer, so it follows ``.to()``/``.double()``
``ActNorm._initialize``                 fills its ``initialized`` buffer in place (it stays on the
                                        module's device) and floors the std at 1e-6 (a constant
                                        channel gave an infinite log-scale)
``torchutils.searchsorted``             no longer adds eps to the caller's bin locations in place
                                        (the linear spline's inverse was wrong in its last bin)
``torchutils.random_orthogonal``,      ``torch.linalg`` instead of ``torch.qr``/``torch.solve``,
``NaiveLinear.inverse_no_cache``,       which PyTorch removed (``NaiveLinear`` could not be built
``NaiveLinear.weight_inverse_and_...``  or inverted)
``splines.linear.linear_spline``        inverse bin boundaries in the inputs' dtype and device
                                        (they were float32 CPU: 1e-8 errors in float64, a device
                                        error on CUDA)
``ActNorm.forward``                     reads its ``initialized`` buffer only when the buffer is
                                        new or was written since (its version counter changed),
                                        not on every training call: no host read per layer per
                                        step, and one graph under ``torch.compile``
======================================  ============================================================

Example:
    >>> from flowkit import nflows_compat
    >>> [p.name for p in nflows_compat.PATCHES if not p.active]   # all active on nflows 0.14
    []
    >>> "torchutils.searchsorted" in nflows_compat.active_patches()
    True

Each fix has a test in ``tests/test_nflows_compat.py`` that fails without it
(:func:`unpatched` restores nflows' originals for that purpose); the ``ActNorm.forward`` fix is
tested with the other hot-path tests in ``tests/test_compile.py``.
"""

from __future__ import annotations

import nflows.transforms.autoregressive as _autoregressive
import nflows.transforms.splines as _splines
import nflows.utils as _nflows_utils
import numpy as np
import torch
from nflows import version as _nflows_version
from nflows.transforms import InputOutsideDomain
from nflows.transforms import linear as _linear
from nflows.transforms import lu as _lu
from nflows.transforms import nonlinearities as _nl
from nflows.transforms import normalization as _norm
from nflows.transforms.splines import linear as _linear_splines
from nflows.utils import torchutils as _torchutils
from torch.nn import functional as F

from flowkit._patching import Patch, PatchSet, fingerprint

__all__ = [
    "FIXES",
    "PATCHES",
    "SUPPORTED_VERSIONS",
    "Patch",
    "active_patches",
    "apply_patches",
    "fingerprint",
    "installed_version",
    "unpatched",
]

#: nflows versions the recorded fingerprints belong to
SUPPORTED_VERSIONS = ("0.14",)


def _weight_inverse(self) -> torch.Tensor:
    lower, upper = self._create_lower_upper()
    identity = torch.eye(self.features, dtype=lower.dtype, device=lower.device)
    lower_inverse = torch.linalg.solve_triangular(lower, identity, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper, lower_inverse, upper=True)


def _inverse_no_cache(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lower, upper = self._create_lower_upper()
    outputs = (inputs - self.bias).t()
    outputs = torch.linalg.solve_triangular(lower, outputs, upper=False, unitriangular=True)
    outputs = torch.linalg.solve_triangular(upper, outputs, upper=True).t()
    logabsdet = -self.logabsdet() * inputs.new_ones(outputs.shape[0])
    return outputs, logabsdet


def _parameter_stamp(module: torch.nn.Module) -> tuple | None:
    """What identifies the parameters' current values: device, dtype, storage and version counter
    (bumped by every in-place write: ``load_state_dict``, an optimizer step)."""
    try:
        return tuple((p.device, p.dtype, p.data_ptr(), p._version) for p in module.parameters())
    except RuntimeError:  # inference-mode tensors have no version counter: never trust the cache
        return None


def _drop_stale_cache(self) -> None:
    stamp = _parameter_stamp(self)
    if stamp is None or getattr(self.cache, "flowkit_stamp", None) != stamp:
        self.cache.invalidate()
        self.cache.flowkit_stamp = stamp


def _check_forward_cache(self) -> None:
    _drop_stale_cache(self)
    _FORWARD_CACHE.original_function()(self)


def _check_inverse_cache(self) -> None:
    _drop_stale_cache(self)
    _INVERSE_CACHE.original_function()(self)


def _sigmoid_init(self, temperature=1, eps=1e-6, learn_temperature=False) -> None:
    _SIGMOID_INIT.original_function()(self, temperature=temperature, eps=eps, learn_temperature=learn_temperature)
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


def _searchsorted(bin_locations: torch.Tensor, inputs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    last = bin_locations[..., -1:] + eps  # a new tensor: the caller's bin locations stay as they are
    bin_locations = torch.cat([bin_locations[..., :-1], last], dim=-1)
    return torch.sum(inputs[..., None] >= bin_locations, dim=-1) - 1


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


def _random_orthogonal(size: int) -> torch.Tensor:
    """A random orthogonal ``[size, size]`` matrix: Q of the QR decomposition of a Gaussian matrix."""
    q, _ = torch.linalg.qr(torch.randn(size, size))
    return q


def _naive_inverse_no_cache(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lu, pivots = torch.linalg.lu_factor(self._weight)
    outputs = torch.linalg.lu_solve(lu, pivots, (inputs - self.bias).t()).t()
    logabsdet = -torch.log(torch.abs(torch.diagonal(lu))).sum()  # log|det W| from the LU factors
    return outputs, logabsdet * outputs.new_ones(inputs.shape[0])


def _naive_weight_inverse_and_logabsdet(self) -> tuple[torch.Tensor, torch.Tensor]:
    lu, pivots = torch.linalg.lu_factor(self._weight)
    identity = torch.eye(self.features, dtype=lu.dtype, device=lu.device)
    return torch.linalg.lu_solve(lu, pivots, identity), torch.log(torch.abs(torch.diagonal(lu))).sum()


def _linear_spline(inputs, unnormalized_pdf, inverse=False, left=0.0, right=1.0, bottom=0.0, top=1.0):
    """nflows' ``linear_spline`` (Müller et al., 2018) with its bin boundaries in the inputs'
    dtype and device."""
    if torch.min(inputs) < left or torch.max(inputs) > right:
        raise InputOutsideDomain()
    inputs = (inputs - bottom) / (top - bottom) if inverse else (inputs - left) / (right - left)
    num_bins = unnormalized_pdf.size(-1)
    pdf = F.softmax(unnormalized_pdf, dim=-1)
    cdf = torch.cumsum(pdf, dim=-1)
    cdf[..., -1] = 1.0
    cdf = F.pad(cdf, pad=(1, 0), mode="constant", value=0.0)
    if inverse:
        inv_bin_idx = _torchutils.searchsorted(cdf, inputs).unsqueeze(-1)
        bin_boundaries = torch.linspace(0, 1, num_bins + 1, dtype=inputs.dtype, device=inputs.device)
        bin_boundaries = bin_boundaries.view([1] * inputs.dim() + [-1]).expand(*inputs.shape, -1)
        slopes = (cdf[..., 1:] - cdf[..., :-1]) / (bin_boundaries[..., 1:] - bin_boundaries[..., :-1])
        offsets = cdf[..., 1:] - slopes * bin_boundaries[..., 1:]
        input_slopes = slopes.gather(-1, inv_bin_idx)[..., 0]
        input_offsets = offsets.gather(-1, inv_bin_idx)[..., 0]
        outputs = torch.clamp((inputs - input_offsets) / input_slopes, 0, 1)
        logabsdet = -torch.log(input_slopes)
    else:
        bin_pos = inputs * num_bins
        bin_idx = torch.floor(bin_pos).long()
        bin_idx[bin_idx >= num_bins] = num_bins - 1
        alpha = bin_pos - bin_idx.to(bin_pos.dtype)
        input_pdfs = pdf.gather(-1, bin_idx[..., None])[..., 0]
        outputs = cdf.gather(-1, bin_idx[..., None])[..., 0]
        outputs = torch.clamp(outputs + alpha * input_pdfs, 0, 1)
        logabsdet = torch.log(input_pdfs) - np.log(1.0 / num_bins)
    if inverse:
        return outputs * (right - left) + left, logabsdet
    return outputs * (top - bottom) + bottom, logabsdet


_FORWARD_CACHE = Patch(
    "Linear._check_forward_cache",
    _linear.Linear,
    "_check_forward_cache",
    _check_forward_cache,
    "0f95721ef4ffd9c66b761ee2b42f5326ccb0e907385db4df7acb5038292c0db5",
    "the eval-mode weight cache is refilled when a parameter changed device, dtype or values since it was filled",
)
_INVERSE_CACHE = Patch(
    "Linear._check_inverse_cache",
    _linear.Linear,
    "_check_inverse_cache",
    _check_inverse_cache,
    "1af9735acb04a3c8f0da1d84bd6844dbf84d7b7bc367e76354cd390af360e308",
    "the eval-mode inverse-weight cache is refilled when a parameter changed device, dtype or values since it was filled",
)
_SIGMOID_INIT = Patch(
    "Sigmoid.__init__",
    _nl.Sigmoid,
    "__init__",
    _sigmoid_init,
    "992b7cc62f5fe24b98fc2ebb50da614b9cce472b41910d67a915f8eecbf524a0",
    "temperature becomes a non-persistent buffer, so .to(device)/.double() move it",
)

#: every fix, one entry each (name, target, reason, active)
PATCHES: tuple[Patch, ...] = (
    Patch(
        "LULinear.weight_inverse",
        _lu.LULinear,
        "weight_inverse",
        _weight_inverse,
        "13f38c737c710909b76ea5ae734a11a6bf27cbfebb0bd233520d66ff436960e8",
        "the identity is built on the weights' device and dtype (torch.eye on the CPU in float32 broke "
        "CUDA and float64), with torch.linalg.solve_triangular",
    ),
    Patch(
        "LULinear.inverse_no_cache",
        _lu.LULinear,
        "inverse_no_cache",
        _inverse_no_cache,
        "35c0afb4528cf36da82f9b50defaa378f5342333b7ec4bea582e1a86a4174b45",
        "torch.linalg.solve_triangular instead of the deprecated torch.triangular_solve",
    ),
    _FORWARD_CACHE,
    _INVERSE_CACHE,
    _SIGMOID_INIT,
    Patch(
        "ActNorm._initialize",
        _norm.ActNorm,
        "_initialize",
        _actnorm_initialize,
        "8f2d31bbaf9aebafa2b416a49481edc1b66a4c2faae0ea7e6def7c742c3d977a",
        "the initialized buffer is filled in place (it stays on the module's device) and the std is "
        "floored at 1e-6 (a constant channel gave an infinite log-scale)",
    ),
    Patch(
        "ActNorm.forward",
        _norm.ActNorm,
        "forward",
        _actnorm_forward,
        "5c690135018cf44beac022992753a1055f3fed41604e8fc38782dd26d2ef23f7",
        "reads the initialized buffer only when it is new or was written since (its version counter "
        "changed), not on every training call: no host read per layer per step, one graph under torch.compile",
    ),
    Patch(
        "torchutils.searchsorted",
        _torchutils,
        "searchsorted",
        _searchsorted,
        "12c45fc30b2e0c9c7366d58ea7de9d00c42bb6b2ebd738b44718cdaef4c553a7",
        "no longer adds eps to the caller's bin locations in place (the linear spline's inverse was "
        "wrong in its last bin)",
        also_in=((_nflows_utils, "searchsorted"),),
    ),
    Patch(
        "torchutils.random_orthogonal",
        _torchutils,
        "random_orthogonal",
        _random_orthogonal,
        "73a83f9a77b5ac88ba02a9fdede08945184b2b92de18c3308d8163f9ed4cc8a7",
        "torch.linalg.qr instead of torch.qr, which current PyTorch removed (NaiveLinear could not be built)",
        also_in=((_nflows_utils, "random_orthogonal"),),
    ),
    Patch(
        "NaiveLinear.inverse_no_cache",
        _linear.NaiveLinear,
        "inverse_no_cache",
        _naive_inverse_no_cache,
        "4c59960c5b15a0c756b19af2ab89bb17ca40fe73de012de160b2b7e61173852c",
        "torch.linalg.lu_factor/lu_solve instead of torch.solve, which current PyTorch removed",
    ),
    Patch(
        "NaiveLinear.weight_inverse_and_logabsdet",
        _linear.NaiveLinear,
        "weight_inverse_and_logabsdet",
        _naive_weight_inverse_and_logabsdet,
        "27748110469752d43d52a21dbe9475006a320e180ad3e43111dc556e5b77881c",
        "torch.linalg.lu_factor/lu_solve instead of torch.solve (removed), identity on the weight's device and dtype",
    ),
    Patch(
        "splines.linear.linear_spline",
        _linear_splines,
        "linear_spline",
        _linear_spline,
        "07ad2b0a4ce19f40179d844f622a126952c94d096961fe525f734372b2543c02",
        "the inverse's bin boundaries are built in the inputs' dtype and device (float32 on the CPU "
        "gave 1e-8 errors in float64 and a device error on CUDA)",
        also_in=((_splines, "linear_spline"), (_autoregressive, "linear_spline")),
    ),
)


def installed_version() -> str:
    """The installed nflows version (``nflows.version.__version__``)."""
    return str(_nflows_version.__version__)


#: the fixes with their version check; ``import flowkit`` calls ``FIXES.apply()``
FIXES = PatchSet("nflows", installed_version, SUPPORTED_VERSIONS, PATCHES)

#: install every fix whose target is the expected nflows 0.14 function (idempotent); returns the active names
apply_patches = FIXES.apply
#: names of the fixes installed now
active_patches = FIXES.active
#: ``with unpatched(*names):`` restores nflows' originals (all, or the named fixes), e.g. to show a fix is needed
unpatched = FIXES.unpatched
