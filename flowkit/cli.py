"""``flowkit`` command line. Each command lives in its own module and registers itself here.

A command module defines ``register(subparsers)`` adding a sub-parser whose ``func``
default takes the parsed ``args`` and returns an exit code.

Errors and signals, the same for every command (handled in :func:`main`):

* a user error (:class:`flowkit.errors.UserError` and its family: a bad option, path,
  checkpoint, run folder or data set) prints one ``error:`` line on stderr and exits 2, with
  no traceback; a command turns the ``ValueError``/``TypeError`` of checking its own arguments
  into one with :func:`user_input`;
* a non-finite loss that stops a run (:class:`~flowkit.errors.NonFiniteLossError`) prints
  one ``error:`` line and exits 1;
* Ctrl-C exits 130 with one line (``flowkit train`` says how to resume), at once: run as the
  ``flowkit`` command (``argv=None``), the process skips the interpreter's teardown, which
  takes seconds with torch loaded (files are already written atomically);
* a closed pipe (``flowkit ... | head``) exits quietly (status 141, as a shell reports SIGPIPE).

The current folder is on ``sys.path`` (as with ``python -m``), so ``--model my_flows:build``
finds ``my_flows.py`` next to where the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from flowkit.errors import NonFiniteLossError, UserError

__all__ = ["main", "build_parser", "COMMAND_MODULES", "check_output", "user_input"]

# one line per command module; a module missing here is simply not offered
COMMAND_MODULES = (
    "flowkit.commands.check",
    "flowkit.commands.demo",
    "flowkit.commands.fit2d",
    "flowkit.commands.train",
    "flowkit.commands.evaluate",
    "flowkit.commands.sample",
    "flowkit.commands.analyze",
)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Inside, a ``ValueError``/``TypeError`` comes from the user's arguments: re-raise it as a
    :class:`UserError` (one ``error:`` line, exit 2).  Wrap the checks of a command's arguments,
    not the work itself, so a bug still shows its traceback."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err


def check_output(path: str | os.PathLike, flag: str = "--out", folder: bool = False) -> None:
    """Raise :class:`UserError` naming ``flag`` unless a file (or with ``folder``, a folder)
    can be written at ``path``; writes nothing (see :func:`flowkit.training.folder.output_problem`)."""
    from flowkit.training.folder import output_problem

    problem = output_problem(path, folder)
    if problem:
        raise UserError(f"{flag}: {problem}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowkit", description="Compose, verify and train normalizing flows.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _say(text: str) -> None:
    """One line on stderr (under torchrun, rank 0 speaks for all)."""
    from flowkit.training.distributed import env_rank

    if env_rank() == 0:
        print(" ".join(text.split()), file=sys.stderr, flush=True)


def _quiet_broken_pipe() -> int:
    # stdout is gone: point it at /dev/null so the interpreter's final flush stays quiet
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Run the ``flowkit`` command line; returns the exit status."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as err:
        _say(f"error: {err}")
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        _say(f"error: {err}")
        return 1
    except KeyboardInterrupt as err:
        _say(str(err) or "interrupted")
        if argv is None:  # this process is the command: leave now, not after torch's slow teardown (seconds)
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()


if __name__ == "__main__":
    sys.exit(main())
