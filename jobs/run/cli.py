"""One-line errors at the command line: what every entry point (``python -m jobs.<name>``) wraps its work in.

A user error (bad config, bad data, a missing or unreadable path, an unreachable hub) is the user's
to fix, so it prints as ONE line on stderr and the process exits 2; a traceback would bury that line
under 30 lines of our internals. Bugs (anything else) keep their traceback. ``--debug`` or
``RAYALIGN_DEBUG=1`` re-raises user errors too. A job run through ``ray job submit`` is the same
process, so its logs end with the same line and its failure is the exit status 2.

This module imports nothing from the project: :class:`UserError` is the base the project's error
classes (ConfigError, DataError) share, so the wrapper recognises them without an import circle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "RAYALIGN_DEBUG"
EXIT_USER_ERROR = 2  # argparse's status for a bad command line; a bad config or file is the same kind of mistake


class UserError(Exception):
    """An error in what the user gave (config, data, paths): printed as one line, not a traceback."""

    label = "error"


# Path problems the OS reports: the path is the user's, so they are user errors as well.
_OS_USER_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The error as one line: its label, its message (lines joined) and how to see the traceback."""
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the actor's exception as .cause
    if isinstance(cause, BaseException):
        exc = cause
    label = getattr(exc, "label", "error")
    message = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return f"{label}: {message} [traceback: {DEBUG_FLAG} or {DEBUG_ENV}=1]"


def guarded(work: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """``work()``, with a user error turned into one stderr line and ``SystemExit(2)``."""
    try:
        result = work()
    except (UserError, *_OS_USER_ERRORS) as exc:
        if debug_requested(argv):
            raise
        print(one_line(exc), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    return 0 if result is None else result
