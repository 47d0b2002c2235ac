"""The command layer: the argparse front ends of ``fdistill`` (``fdistill.cli`` dispatches to them).

Commands sit on top: they parse arguments, call the library, and turn a user's mistake into one line on stderr
and exit code 2 (``call``). Nothing below this layer prints errors or parses arguments. A command imports its
heavy implementation (diffusers, transformers) only after its arguments are parsed, so that ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..errors import FdistillError, RunInterrupted

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, CheckpointError, ConfigError, FdistillError)
"""Errors that describe a wrong input (each message names the problem and the fix): printed, not raised."""

DEBUG_ENV = "FDISTILL_DEBUG"
"""Set (``FDISTILL_DEBUG=1``, or ``fdistill --debug ...``) to see the traceback of a known failure as well."""

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def call(prog: str, fn: Callable[..., Any], *args, errors: tuple = USER_ERRORS, code: int = 2,
         codes: dict | None = None, **kwargs):
    """``(fn(*args, **kwargs), 0)``; a user error instead prints ``PROG: error: MESSAGE`` to stderr and returns
    ``(None, code)`` (or the code ``codes`` gives its type; Ctrl-C during training: 130). Anything else (a bug)
    propagates with its traceback, and so does everything under ``FDISTILL_DEBUG=1``."""
    try:
        return fn(*args, **kwargs), 0
    except (*errors, RunInterrupted) as e:
        if debugging():
            raise
        if isinstance(e, RunInterrupted):
            print(f"{prog}: {e}", file=sys.stderr)
            return None, EXIT_INTERRUPTED
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return None, next((c for t, c in (codes or {}).items() if isinstance(e, t)), code)


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an OSError from the system (no message of ours) names its file."""
    if isinstance(e, OSError) and not isinstance(e, FdistillError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split())
