"""flowkit's own exception types (everything else is a ``TypeError`` or ``ValueError``; see
:mod:`flowkit.validation`)."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "UserError"]


class NonFiniteLossError(FloatingPointError):
    """A loss, gradient or state became NaN/inf and could not be recovered from.

    The one non-finite error of flowkit: training (:func:`flowkit.training.train`) raises it
    after too many non-finite steps in a row, the 2D fitter (:func:`flowkit.toy2d.fit`) when its
    loss diverges.  A subclass of ``FloatingPointError``, so ``except FloatingPointError`` works.
    """


class UserError(Exception):
    """What the user asked for cannot be done as asked: a bad option, path, checkpoint or data set.

    The base of flowkit's user-error family (:class:`flowkit.training.CheckpointError`,
    :class:`flowkit.training.RunFolderError`, :class:`flowkit.data.DatasetNotFoundError`,
    ...).  The command line prints one of these as a single ``error:`` line and exits with
    status 2, without a traceback; from Python it is an ordinary exception (each subclass is
    also the ``ValueError``/``FileNotFoundError`` a caller would expect).
    """
