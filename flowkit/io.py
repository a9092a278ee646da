"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A reader (or a crash) never sees a half-written checkpoint, metrics file, picture or table.
This is flowkit's one writer: every file flowkit writes goes through :func:`atomic_open`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "check_writable_folder", "write_json"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, atomically (parent folders created).

    The data goes to a temp file in the same folder, is flushed and fsync'd, and replaces
    ``path`` with ``os.replace`` only when the block ends without an exception; otherwise the
    temp file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
        >>> with atomic_open(target) as f:
        ...     _ = f.write(b"abc")
        >>> target.read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2))


def check_writable_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder that exists (created if missing) and takes a file, before any work.

    Probes by writing and removing an empty file through :func:`atomic_open`.

    Raises:
        NotADirectoryError: ``path`` is a file.
        OSError: the folder cannot be created or written to.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "runs" / "a"
        >>> check_writable_folder(folder) == folder, list(folder.iterdir())
        (True, [])
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a folder")
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-probe-{os.getpid()}"
    with atomic_open(probe):
        pass
    probe.unlink()
    return path
