"""The package's known failures: errors whose message names the input at fault and the fix.

The command line prints one of these as one line (``fdistill CMD: error: ...``) and a traceback only with
``--debug`` or ``FDISTILL_DEBUG=1``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FdistillError(Exception):
    """A known failure: the message names the input and the fix."""


class TrainingDiverged(FdistillError, RuntimeError):
    """Updates kept producing non-finite losses or gradients, or a checkpoint would hold non-finite tensors."""


class RunLocked(FdistillError, RuntimeError):
    """Another live process holds the run directory."""


class RunInterrupted(FdistillError):
    """Ctrl-C during training; the message says at which step and how to resume."""


class RunDirectoryError(FdistillError, OSError):
    """The run directory cannot be created or written."""
