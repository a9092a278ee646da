"""Fixes to a dependency that check what they replace before they replace it.

One :class:`Patch` replaces one function of a library (a method of a class, or a module-level
function wherever callers look it up). It is applied only when

* the installed library version is one the fix was written for, and
* every place it replaces still holds the function recorded for that version (the SHA-256 of
  its source, so the check does not depend on the Python version's bytecode).

Otherwise the library is left alone and one ``RuntimeWarning`` says which fix is off and why.
Applying is idempotent; :func:`revert` puts the original back. :mod:`flowkit.nflows_compat` and
:mod:`flowkit.normflows_compat` hold the tables of fixes.

To add a fix: write the replacement, record ``fingerprint(original)`` for the pinned version and
append one ``Patch`` to the table of the library's compat module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Patch", "PatchSet", "apply", "fingerprint", "revert"]

_MISSING = object()


def _function_of(obj: Any) -> Any:
    """The plain function behind a staticmethod/classmethod (or ``obj`` itself)."""
    return getattr(obj, "__func__", obj)


def fingerprint(obj: Any) -> str:
    """SHA-256 of the (dedented) source of a function, method or staticmethod.

    Raises:
        TypeError / OSError: when the source cannot be read (a C function, a pyc-only install).
    """
    source = textwrap.dedent(inspect.getsource(_function_of(obj)))
    return hashlib.sha256(source.encode()).hexdigest()


def _location_name(namespace: Any, attribute: str) -> str:
    prefix = getattr(namespace, "__qualname__", None)
    module = getattr(namespace, "__module__", None) if prefix else None
    dotted = f"{module}.{prefix}" if module else getattr(namespace, "__name__", repr(namespace))
    return f"{dotted}.{attribute}"


@dataclasses.dataclass(eq=False)
class Patch:
    """One verified fix: ``replacement`` goes where ``attribute`` of ``owner`` is looked up.

    Attributes:
        name: short label (``"LULinear.weight_inverse"``).
        owner: the class or module the library's callers look the attribute up in.
        attribute: the attribute replaced.
        replacement: the fixed function (wrap it in ``staticmethod`` for a static method).
        sha256: :func:`fingerprint` of the original, recorded for the supported version.
        reason: what is wrong in the original and what the fix changes (one or two sentences).
        also_in: other ``(namespace, attribute)`` places holding the same function (modules
            that imported it by name); they are replaced too.
        active: whether the fix is installed now.
    """

    name: str
    owner: Any
    attribute: str
    replacement: Callable[..., Any] | staticmethod
    sha256: str
    reason: str
    also_in: tuple[tuple[Any, str], ...] = ()
    active: bool = dataclasses.field(default=False, init=False)
    original: Any = dataclasses.field(default=_MISSING, init=False, repr=False)
    _warned: bool = dataclasses.field(default=False, init=False, repr=False)

    @property
    def target(self) -> str:
        """Dotted name of the replaced attribute, e.g. ``nflows.transforms.lu.LULinear.weight_inverse``."""
        return _location_name(self.owner, self.attribute)

    def locations(self) -> list[tuple[Any, str]]:
        """Every ``(namespace, attribute)`` the fix replaces, the owner first."""
        return [(self.owner, self.attribute), *self.also_in]

    def original_function(self) -> Callable[..., Any]:
        """The library's own function (callable even while the fix is active)."""
        current = self.original if self.active else _current(self.owner, self.attribute)
        return _function_of(current)


def _current(namespace: Any, attribute: str) -> Any:
    """The attribute as stored (``__dict__`` of a class, so a staticmethod stays one)."""
    if isinstance(namespace, type):
        return namespace.__dict__.get(attribute, _MISSING)
    return getattr(namespace, attribute, _MISSING)


def _mismatch(patch: Patch) -> str | None:
    """Why the places to patch do not hold the expected original (None when they do)."""
    for namespace, attribute in patch.locations():
        value = _current(namespace, attribute)
        where = _location_name(namespace, attribute)
        if value is _MISSING:
            return f"{where} does not exist"
        try:
            digest = fingerprint(value)
        except (OSError, TypeError) as err:
            return f"cannot read the source of {where} to verify it ({err})"
        if digest != patch.sha256:
            return f"{where} is not the function this fix was written for (its source differs)"
    return None


def _warn_once(patch: Patch, why: str) -> None:
    if patch._warned:
        return
    patch._warned = True
    warnings.warn(
        f"flowkit left {patch.target} unpatched: {why}; the fix '{patch.name}' is off ({patch.reason})",
        RuntimeWarning,
        stacklevel=3,
    )


def apply(patch: Patch, version: str, supported: Iterable[str]) -> bool:
    """Install ``patch`` if ``version`` is supported and its targets are the expected originals.

    Args:
        patch: the fix.
        version: the installed version of the patched library.
        supported: versions the recorded fingerprints belong to.

    Returns:
        Whether the fix is active afterwards. A refusal warns once per fix.
    """
    if patch.active:
        return True
    supported = tuple(supported)
    if version not in supported:
        _warn_once(patch, f"installed version {version}, the fix is for {', '.join(supported)}")
        return False
    why = _mismatch(patch)
    if why is not None:
        _warn_once(patch, why)
        return False
    patch.original = _current(patch.owner, patch.attribute)
    for namespace, attribute in patch.locations():
        setattr(namespace, attribute, patch.replacement)
    patch.active = True
    return True


def revert(patch: Patch) -> None:
    """Put the original back where the fix replaced it (no-op when inactive)."""
    if not patch.active:
        return
    for namespace, attribute in patch.locations():
        setattr(namespace, attribute, patch.original)
    patch.active = False
    patch.original = _MISSING


@dataclasses.dataclass
class PatchSet:
    """The fixes for one library, applied and reverted together.

    Attributes:
        library: the patched library's name (for messages).
        version: returns the installed version of the library.
        supported: versions the recorded fingerprints belong to.
        patches: one :class:`Patch` per fix.
    """

    library: str
    version: Callable[[], str]
    supported: tuple[str, ...]
    patches: tuple[Patch, ...]

    def apply(self) -> list[str]:
        """Install every fix whose target is the expected function (idempotent); returns the active names."""
        for patch in self.patches:
            apply(patch, self.version(), self.supported)
        return self.active()

    def active(self) -> list[str]:
        """Names of the fixes installed now."""
        return [p.name for p in self.patches if p.active]

    @contextlib.contextmanager
    def unpatched(self, *names: str) -> Iterator[None]:
        """Temporarily restore the library's originals (all, or the named fixes)."""
        known = [p.name for p in self.patches]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"names: unknown {self.library} fixes {unknown}; expected names from {known}")
        was_active = [p for p in self.patches if p.active and (not names or p.name in names)]
        for patch in was_active:
            revert(patch)
        try:
            yield
        finally:
            for patch in was_active:
                apply(patch, self.version(), self.supported)
