"""Fixes for normflows 1.7.3 that flowkit users meet when flowkit runs normflows flows.

``import flowkit`` installs the fixes in :data:`PATCHES`, with the same verified mechanism as
:mod:`flowkit.nflows_compat`: each checks that normflows is version 1.7.3 and that the function
it replaces is the one it was written for; otherwise it leaves normflows alone and warns once.

=============================  =====================================================================
fix                            what changes
=============================  =====================================================================
``Composite._cascade``         sums the log-dets in the inputs' dtype and device (it summed into a
                               float32 CPU ``torch.zeros(batch)``: a float64 model returned float32
                               log-dets, and CUDA inputs failed)
``Planar.forward``,            ``Planar(act="leaky_relu")`` computes its slope in the inputs' dtype
``Planar.inverse``             (it was float32: in float64 the log-det was float32 and the inverse
                               missed the forward by ~1e-8)
``Shift.forward``,             ``normflows.transforms.Shift`` returns a new tensor instead of
``Shift.inverse``              shifting the caller's tensor in place (``log_prob(x)`` changed ``x``)
=============================  =====================================================================

Float32 results are unchanged (each fix computes what the original computed, in the inputs' dtype).

Example:
    >>> from flowkit import normflows_compat
    >>> normflows_compat.active_patches()
    ['Composite._cascade', 'Planar.forward', 'Planar.inverse', 'Shift.forward', 'Shift.inverse']
"""

from __future__ import annotations

import normflows as _normflows
import torch
from normflows import transforms as _nf_transforms
from normflows.flows import base as _nf_base
from normflows.flows import planar as _nf_planar

from flowkit._patching import Patch, PatchSet

__all__ = [
    "FIXES",
    "PATCHES",
    "SUPPORTED_VERSIONS",
    "active_patches",
    "apply_patches",
    "installed_version",
    "unpatched",
]

#: normflows versions the recorded fingerprints belong to
SUPPORTED_VERSIONS = ("1.7.3",)


def _cascade(inputs, funcs):
    outputs = inputs
    total_logabsdet = inputs.new_zeros(inputs.shape[0])
    for func in funcs:
        outputs, logabsdet = func(outputs)
        total_logabsdet += logabsdet
    return outputs, total_logabsdet


def _leaky_slope(self, x: torch.Tensor) -> torch.Tensor:
    """``h'(x)`` of the leaky ReLU, in ``x``'s dtype (the original's ``bool * float`` is float32)."""
    return (x < 0).to(x.dtype) * (self.h.negative_slope - 1.0) + 1.0


def _planar_u(self) -> torch.Tensor:
    """``u`` constrained so that ``w.u > -1`` (invertibility), as in the original."""
    inner = torch.sum(self.w * self.u)
    return self.u + (torch.log(1 + torch.exp(inner)) - 1 - inner) * self.w / torch.sum(self.w**2)


def _planar_forward(self, z):
    lin = torch.sum(self.w * z, list(range(1, self.w.dim())), keepdim=True) + self.b
    u = _planar_u(self)
    if self.act == "tanh":
        slope = 1 / torch.cosh(lin.reshape(-1)) ** 2
    else:  # "leaky_relu" (the constructor refuses anything else)
        slope = _leaky_slope(self, lin.reshape(-1))
    z_ = z + u * self.h(lin)
    log_det = torch.log(torch.abs(1 + torch.sum(self.w * u) * slope))
    return z_, log_det


def _planar_inverse(self, z):
    if self.act != "leaky_relu":
        raise NotImplementedError("This flow has no algebraic inverse.")
    lin = torch.sum(self.w * z, list(range(1, self.w.dim()))) + self.b
    u = _planar_u(self)
    dims = [-1] + (u.dim() - 1) * [1]
    u = _leaky_slope(self, lin).reshape(*dims) * u  # absorb leakyReLU slope into u
    inner_ = torch.sum(self.w * u, list(range(1, self.w.dim())))
    z_ = z - u * (lin / (1 + inner_)).reshape(*dims)
    log_det = -torch.log(torch.abs(1 + inner_))
    return z_, log_det


def _shift_forward(self, z):
    return z - self.shift, z.new_zeros(z.shape[0])


def _shift_inverse(self, z):
    return z + self.shift, z.new_zeros(z.shape[0])


#: every fix, one entry each (name, target, reason, active)
PATCHES: tuple[Patch, ...] = (
    Patch(
        "Composite._cascade",
        _nf_base.Composite,
        "_cascade",
        staticmethod(_cascade),
        "77dfe50fcdf7d2f7d36e0007273c9e805c0c2107fd511ae850798b6fc1637f33",
        "log-dets are summed in the inputs' dtype and device, not in a float32 CPU torch.zeros(batch)",
    ),
    Patch(
        "Planar.forward",
        _nf_planar.Planar,
        "forward",
        _planar_forward,
        "e4e8388493f55d299bcf7411c3c31b75f8b91d10f2b32b90389046f69dd9478a",
        "the leaky_relu slope is computed in the inputs' dtype (it was float32, so float64 log-dets were float32)",
    ),
    Patch(
        "Planar.inverse",
        _nf_planar.Planar,
        "inverse",
        _planar_inverse,
        "bf290a58acb7245a80b50db7438c2c71e972d368fc5eb668727a5941f62f2c6b",
        "the leaky_relu slope is computed in the inputs' dtype (in float32 the float64 inverse missed by ~1e-8)",
    ),
    Patch(
        "Shift.forward",
        _nf_transforms.Shift,
        "forward",
        _shift_forward,
        "1cea98d117b88a6a9c892283f55c6d8968ade3d977e16b0896f769bc6bd79f48",
        "returns a new tensor instead of shifting the caller's tensor in place",
    ),
    Patch(
        "Shift.inverse",
        _nf_transforms.Shift,
        "inverse",
        _shift_inverse,
        "691f63ef80f75746eddd6e5183db4cfd4c91ee60f5f538996396da4fc7da62f9",
        "returns a new tensor instead of shifting the caller's tensor in place",
    ),
)


def installed_version() -> str:
    """The installed normflows version (``normflows.__version__``)."""
    return str(_normflows.__version__)


#: the fixes with their version check; ``import flowkit`` calls ``FIXES.apply()``
FIXES = PatchSet("normflows", installed_version, SUPPORTED_VERSIONS, PATCHES)

#: install every fix whose target is the expected normflows 1.7.3 function (idempotent); returns the active names
apply_patches = FIXES.apply
#: names of the fixes installed now
active_patches = FIXES.active
#: ``with unpatched(*names):`` restores normflows' originals (all, or the named fixes), e.g. to show a fix is needed
unpatched = FIXES.unpatched
