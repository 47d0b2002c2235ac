"""The command layer: the argparse front ends of ``fdistill`` (``fdistill.cli`` dispatches to them).

Commands sit on top: they parse arguments, call the library, and turn a user's mistake into one line on stderr
and exit code 2 (``call``). Nothing below this layer prints errors or parses arguments. A command imports its
heavy implementation (diffusers, transformers) only after its arguments are parsed, so that ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ..checkpoint import CheckpointError
from ..config import ConfigError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError, ConfigError)
"""Errors that describe a wrong input (each message names the problem and the fix): printed, not raised."""


def call(prog: str, fn: Callable[..., Any], *args, errors: tuple = USER_ERRORS, code: int = 2,
         codes: dict | None = None, **kwargs):
    """``(fn(*args, **kwargs), 0)``; a user error instead prints ``PROG: error: MESSAGE`` to stderr and returns
    ``(None, code)`` (or the code ``codes`` gives its type). Anything else (a bug) propagates with its
    traceback."""
    try:
        return fn(*args, **kwargs), 0
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None, next((c for t, c in (codes or {}).items() if isinstance(e, t)), code)
