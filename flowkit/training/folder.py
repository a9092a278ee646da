"""The run folder: what a run writes, and the checks that keep a run from being lost.

* A folder that already holds a run (``last.pt``, ``best.pt`` or ``metrics.json``) is
  refused unless the run is resumed (``resume``) or replaced (``overwrite``); a refusal
  touches nothing.
* ``out`` must be a folder (or not exist yet) under a writable parent; it is created only
  when the first file is written, so a run that fails before its first checkpoint leaves no
  empty folder behind.
* ``overwrite`` removes the old run's files (and only those) just before the new run writes its
  first checkpoint, so a replacement that fails early leaves the old run as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from flowkit.errors import UserError

__all__ = [
    "RUN_MARKERS",
    "RunFiles",
    "RunFolderError",
    "check_run_folder",
    "last_checkpoint",
    "output_problem",
    "remove_run",
]

#: files whose presence means a folder holds a run
RUN_MARKERS = ("last.pt", "best.pt", "metrics.json")


class RunFolderError(UserError, ValueError):
    """The run folder cannot be used as asked: it holds another run, is a file, is not
    writable, has nothing to resume, or the resumed run's options differ."""


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The paths of a run folder's files."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    @property
    def metrics_csv(self) -> Path:
        return self.out / "metrics.csv"

    @property
    def metrics_json(self) -> Path:
        return self.out / "metrics.json"

    @property
    def samples(self) -> Path:
        return self.out / "samples.png"

    @property
    def curves(self) -> Path:
        return self.out / "curves.png"

    @property
    def tensorboard(self) -> Path:
        return self.out / "tensorboard"

    def to_dict(self) -> dict[str, str]:
        """``{name: path}`` of every file or folder a run writes."""
        names = ("last", "best", "metrics_csv", "metrics_json", "samples", "curves", "tensorboard")
        return {name: str(getattr(self, name)) for name in names}

    def run_files(self) -> list[Path]:
        """Every file or folder a run writes."""
        return [Path(p) for p in self.to_dict().values()]

    def holds_run(self) -> bool:
        return any((self.out / name).exists() for name in RUN_MARKERS)


def output_problem(path: str | os.PathLike, folder: bool) -> str | None:
    """Why ``path`` cannot be written as a folder (``folder=True``) or a file, or None if it can.

    Checks without writing anything: ``path`` is not of the other kind, and its nearest
    existing ancestor is a writable folder (``path`` and the folders above it are created on
    the first write).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file; expected a folder (or a path that does not exist yet)"
    if not folder and path.is_dir():
        return f"{path} is a folder; expected a file name"
    base = path.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"cannot create {path}: {base} is a file, not a folder"
    if not os.access(path if folder and path.is_dir() else base, os.W_OK | os.X_OK):
        return f"cannot write in {path if folder and path.is_dir() else base} (permission denied)"
    return None


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> RunFiles:
    """The run's :class:`RunFiles` after checking ``out`` (see the module docstring); touches nothing.

    Raises:
        RunFolderError: ``out`` is a file or not writable; holds a run and neither
            ``resume`` nor ``overwrite`` is set; or ``resume`` finds no ``last.pt``.
    """
    files = RunFiles(Path(out))
    problem = output_problem(files.out, folder=True)
    if problem:
        raise RunFolderError(f"out: {problem}")
    if resume:
        last_checkpoint(files.out)
    elif files.holds_run() and not overwrite:
        found = ", ".join(name for name in RUN_MARKERS if (files.out / name).exists())
        raise RunFolderError(
            f"out: {files.out} already holds a run ({found}); continue it with --resume (resume=True), "
            "replace it with --overwrite (overwrite=True), or choose another out folder"
        )
    return files


def last_checkpoint(out: Path) -> Path:
    """``out/last.pt``, or :class:`RunFolderError` saying there is nothing to resume."""
    path = Path(out) / "last.pt"
    if not path.is_file():
        raise RunFolderError(f"resume: no checkpoint at {path}; run without --resume to start a new run")
    return path


def remove_run(files: RunFiles) -> None:
    """Delete the files a previous run wrote in ``files.out`` (``overwrite``); other files stay."""
    for path in files.run_files():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
