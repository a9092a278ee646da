"""Model builders: each returns an :class:`ImageFlow`.

A builder is any function ``builder(image_shape, num_levels, **kwargs) -> ImageFlow``.
:func:`build_model` finds one by registry name (:data:`MODEL_NAMES`) or by import path
``"package.module:function"`` (as Hydra's ``_target_`` and Lightning's CLI name objects), so a
user's own flow trains, checkpoints and reloads like a built-in one.  The module is imported
the way Python imports it: it must be on ``sys.path`` (an installed package, ``PYTHONPATH``,
or the current folder, which the ``flowkit`` command puts on the path as ``python -m`` does).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from flowkit.errors import UserError
from flowkit.models.glow import glow
from flowkit.models.image_flow import ImageFlow, standard_normal_log_prob
from flowkit.models.tutorial import TUTORIAL_KINDS, tutorial_flow

__all__ = [
    "ImageFlow",
    "MODEL_NAMES",
    "ModelBuildError",
    "TUTORIAL_KINDS",
    "build_model",
    "check_model_name",
    "glow",
    "is_import_path",
    "resolve_builder",
    "standard_normal_log_prob",
    "tutorial_flow",
]

MODEL_NAMES = ("glow",) + TUTORIAL_KINDS

# "package.module:function" (the part after ':' may be dotted: "pkg.mod:Factory.build")
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ModelBuildError(UserError, ValueError):
    """A model name or import path that does not lead to a builder, or a builder that failed."""


def _glow_builder(image_shape: Sequence[int], num_levels: int, **kwargs) -> ImageFlow:
    return glow(image_shape, num_levels=num_levels, **kwargs)


_TUTORIAL_OPTIONS = ("num_classes", "label_channels", "hidden_channels", "num_layers", "dequantization")


def _tutorial_builder(kind: str) -> Callable[..., ImageFlow]:
    def build(image_shape: Sequence[int], num_levels: int, **kwargs) -> ImageFlow:
        unknown = sorted(set(kwargs) - set(_TUTORIAL_OPTIONS))
        if unknown:
            raise ValueError(
                f"kwargs: the tutorial model {kind!r} takes only {', '.join(_TUTORIAL_OPTIONS)}, got {unknown}; "
                "only 'glow' accepts num_scales, steps_per_scale, coupling, ..."
            )
        return tutorial_flow(kind, image_shape, num_levels, **kwargs)

    return build


_REGISTRY: dict[str, Callable[..., ImageFlow]] = {"glow": _glow_builder}
_REGISTRY.update({kind: _tutorial_builder(kind) for kind in TUTORIAL_KINDS})


def is_import_path(name: str) -> bool:
    """``name`` has the form ``"package.module:function"``."""
    return isinstance(name, str) and bool(_IMPORT_PATH.match(name))


def check_model_name(name: object, argument: str = "name") -> str:
    """``name`` if it is a registry name or an import path, else ``TypeError``/``ValueError``
    (the message calls it ``argument``)."""
    if not isinstance(name, str):
        raise TypeError(f"{argument}: expected a model name or 'package.module:function', got {type(name).__name__}")
    if name not in _REGISTRY and not is_import_path(name):
        raise ValueError(
            f"{argument}: expected one of {', '.join(MODEL_NAMES)} or an import path "
            f"'package.module:function', got {name!r}"
        )
    return name


def resolve_builder(name: str) -> Callable[..., ImageFlow]:
    """The builder a registry name or an import path ``"package.module:function"`` names.

    Raises:
        ModelBuildError: the module cannot be imported, or has no such callable.
    """
    check_model_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    module_name, _, attribute = name.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelBuildError(
            f"model: cannot import {module_name!r} for {name!r} ({err}); the module must be importable "
            "from the current folder, PYTHONPATH or an installed package"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelBuildError(f"model: {module_name!r} has no {attribute!r} (from {name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelBuildError(
            f"model: {name!r} is a {type(target).__name__}, expected a function returning an ImageFlow"
        )
    return target


def build_model(name: str, image_shape: Sequence[int], num_levels: int, **kwargs) -> ImageFlow:
    """Build a model by registry name or import path: ``builder(image_shape, num_levels, **kwargs)``.

    Registry names: ``"glow"`` (:func:`glow`, which takes ``num_scales``, ``steps_per_scale``,
    ``hidden_channels``, ...) and the tutorial's ``"simple"``, ``"vardeq"``, ``"multiscale"``
    (:func:`tutorial_flow`, no options).  Any other builder is named by import path
    ``"package.module:function"`` and called as ``function(image_shape, num_levels, **kwargs)``.

    Raises:
        ModelBuildError: the builder cannot be found, fails with a ``ValueError``/``TypeError``
            (a wrong option), or returns something other than an :class:`ImageFlow`.

    Example:
        >>> build_model("glow", (1, 8, 8), 17, num_scales=1, steps_per_scale=1, hidden_channels=4).image_shape
        (1, 8, 8)
    """
    builder = resolve_builder(name)
    shape = tuple(image_shape)
    try:
        model = builder(shape, num_levels, **kwargs)
    except (ValueError, TypeError) as err:
        raise ModelBuildError(
            f"model: {name}(image_shape={shape}, num_levels={num_levels}, **{kwargs}) failed: {err}"
        ) from err
    if not isinstance(model, ImageFlow):
        raise ModelBuildError(f"model: {name!r} returned a {type(model).__name__}, expected a flowkit ImageFlow")
    return model
