"""flowkit: compose normalizing flows in PyTorch on nflows' contract.

Every layer is an ``nflows.transforms.Transform`` mapping data -> latent in ``forward`` and
returning ``(outputs, logabsdet[batch])``; see :mod:`flowkit.layers.base`.

Importing flowkit applies the documented, verified fixes to nflows 0.14 in
:mod:`flowkit.nflows_compat` and to normflows 1.7.3 in :mod:`flowkit.normflows_compat` (each
checks the library version and the function it replaces; see the README's section on them).
"""

from flowkit import nflows_compat as _nflows_compat
from flowkit import normflows_compat as _normflows_compat

_nflows_compat.apply_patches()
_normflows_compat.apply_patches()

from flowkit import layers, models  # noqa: E402
from flowkit.check import CheckReport, check_transform  # noqa: E402
from flowkit.models import ImageFlow, build_model, glow, tutorial_flow  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "ImageFlow",
    "build_model",
    "check_transform",
    "glow",
    "layers",
    "models",
    "tutorial_flow",
    "__version__",
]
