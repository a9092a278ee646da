"""Renamed arguments that keep working for one release, with a ``DeprecationWarning``.

Example:
    >>> import warnings
    >>> @renamed_arguments(levels="num_scales")
    ... def build(num_scales: int = 3) -> int:
    ...     return num_scales
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     build(levels=2)
    2
    >>> str(caught[0].message)
    'build: levels= is deprecated; use num_scales='
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_arguments"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**old_to_new: str) -> Callable[[F], F]:
    """Accept each old keyword argument under its new name, warning once per call.

    Giving both the old and the new name is a ``TypeError`` naming both.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{function.__name__}: give {new}= only ({old}= is its deprecated name)")
                warnings.warn(
                    f"{function.__name__}: {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=2
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
