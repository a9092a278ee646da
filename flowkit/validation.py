"""Argument checks shared by every public function: one rule each, one message style.

Every check raises ``TypeError`` when the argument has the wrong *type* and ``ValueError``
when it has the right type but a wrong *value*; the message names the argument, says what it
got and what was expected.  ``bool`` is never accepted where an int is expected (``True``
is an ``int`` in Python, but ``levels=True`` is a mistake, not a 1).

Example:
    >>> check_int("levels", 3, low=1)
    3
    >>> check_int("levels", True, low=1)
    Traceback (most recent call last):
    ...
    TypeError: levels: expected an int, got bool
    >>> check_int("levels", 0, low=1)
    Traceback (most recent call last):
    ...
    ValueError: levels: expected an int >= 1, got 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_float_tensor",
    "check_image_batch",
    "check_image_shape",
    "check_int",
    "check_labels",
    "check_optional_int",
]

T = TypeVar("T")


def _range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional); ``bool`` is refused.

    Raises:
        TypeError: ``value`` is not an int (or is a bool).
        ValueError: ``value`` is outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int{_range_text(low, high)}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int | None:
    """``None``, or :func:`check_int`."""
    return None if value is None else check_int(name, value, low, high)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` (an int or float, not bool) as a finite float within the bounds.

    ``low_open``/``high_open`` exclude the bound itself (``low=0, low_open=True``: positive).

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite, or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        raise ValueError(
            f"{name}: expected a finite number{_range_text(low, high, low_open, high_open)}, got {value!r}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (``0``/``1`` are refused: say ``True``/``False``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__}")
    return value


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_image_shape(name: str, shape: Any) -> tuple[int, int, int]:
    """``shape`` as ``(channels, height, width)``, three positive ints."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"{name}: expected (channels, height, width), got {type(shape).__name__}")
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: expected (channels, height, width) as three positive ints, got {tuple(shape)!r}")
    c, h, w = (int(s) for s in shape)
    return c, h, w


def check_float_tensor(x: Any, name: str, dim: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``x`` is a floating tensor of rank ``dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(
            f"{name}: expected a {dim}-D tensor, got shape {tuple(x.shape)}"
            + (" ([batch, channels, height, width] expected)" if dim == 4 else "")
        )


def check_image_batch(x: Any, name: str, num_levels: int, *, check_values: bool = True) -> None:
    """Validate integer images ``[B, C, H, W]`` with values in ``[0, num_levels)``.

    The type and shape checks read only metadata; the value check (``check_values``) reads the
    tensor's min and max, one device synchronisation, so hot paths validate a batch once at the
    model's boundary and pass ``check_values=False`` (or skip) further in.  While
    ``torch.compile`` traces (``torch.compiler.is_compiling()``) the value check steps aside, so
    a compiled model stays one graph; validate the data before it enters compiled code.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer images, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected integer images (uint8/int32/int64 with values in "
            f"[0, {num_levels})), got dtype {x.dtype}; convert with (x * {num_levels - 1}).round().long() "
            "if your images are floats in [0, 1]"
        )
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected integer images of shape [batch, channels, height, width], got shape {tuple(x.shape)}"
        )
    if check_values and x.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(x.reshape(-1))).tolist()  # one read of the device
        if lo < 0 or hi >= num_levels:
            raise ValueError(
                f"{name}: values must lie in [0, {num_levels}) for num_levels={num_levels}, got min {lo} and max {hi}"
            )


def check_labels(y: Any, name: str, num_classes: int, batch: int, *, check_values: bool = True) -> None:
    """Validate class labels: an integer tensor of shape ``[batch]`` with values in ``[0, num_classes)``.

    As in :func:`check_image_batch`, the type and shape checks read only metadata and the
    value check (``check_values``: the min and max, one device synchronisation) steps aside
    while ``torch.compile`` traces.

    Example:
        >>> check_labels(torch.tensor([0, 9]), "y", 10, batch=2)
        >>> check_labels(torch.tensor([3, 10]), "y", 10, batch=2)
        Traceback (most recent call last):
        ...
        ValueError: y: class labels must lie in [0, 10), got min 3 and max 10
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of integer class labels [batch], got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer class labels (int64/int32/uint8), got dtype {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name}: expected class labels of shape [{batch}] (one per image), got {tuple(y.shape)}")
    if check_values and y.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one read of the device
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name}: class labels must lie in [0, {num_classes}), got min {lo} and max {hi}")
