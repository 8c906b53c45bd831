"""What the command-line tools (train, evaluate, retrieve, plot) share: one error type for the
user's mistakes, and how it ends a run: one ``PROG: error: ...`` line and exit status 2."""
from __future__ import annotations

import sys
from typing import Any, Callable

USAGE_ERROR = 2


class InputError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint): printed as one line, exit status 2."""


def run_command(prog: str, command: Callable[[Any], Any], args: Any) -> int:
    """``command(args)``; returns 0, or ``USAGE_ERROR`` after printing an ``InputError`` as one line."""
    try:
        command(args)
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0
