"""flowkit's own exception types (everything else is a ``TypeError`` or ``ValueError``; see
:mod:`flowkit.validation`)."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss, gradient or state became NaN/inf and could not be recovered from.

    The one non-finite error of flowkit: training (:func:`flowkit.training.train`) raises it
    after too many non-finite steps in a row, the 2D fitter (:func:`flowkit.toy2d.fit`) when its
    loss diverges.  A subclass of ``FloatingPointError``, so ``except FloatingPointError`` works.
    """
