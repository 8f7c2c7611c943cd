"""The command line's error contract (``python -m brcd ...``, the demo included).

A user error — a ``ValueError``, ``TypeError`` or ``OSError`` raised for a bad option, config,
path or file — is ONE line on stderr, ``error: <message>``, and exit status 2; ``--debug``
re-raises it instead, to show the traceback. Any other exception is a bug and propagates.
Argument-parsing errors follow the same form (:class:`Parser`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["USER_ERRORS", "Parser", "one_line", "guarded"]

USER_ERRORS = (ValueError, TypeError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its lines joined with ``"; "``)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return "; ".join(lines) or type(exc).__name__


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error: ...`` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def guarded(run: Callable[[], object], debug: bool = False, prefix: str = "") -> int:
    """Call ``run()``; return 0, or 2 after printing a user error as one line (``debug``:
    re-raise it); ``prefix`` starts the message (a torchrun rank's ``"[rank 1] "``)."""
    try:
        run()
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {prefix}{one_line(exc)}", file=sys.stderr)
        return 2
    return 0
