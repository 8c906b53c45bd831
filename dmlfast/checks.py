"""Argument checks in one place, and :class:`InputError`, the one error type of a user's mistake.

The commands (``python -m dmlfast.train`` and the others) print an ``InputError`` as one
``PROG: error: ...`` line and exit with status 2 (:func:`dmlfast._cli.run_command`); the library
raises it wherever the user's input is wrong (a flag, a file, a checkpoint, a missing package).
"""
from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint): printed as one line, exit status 2."""


def require_at_least(flag: str, value, minimum: int):
    """``value``, or ``InputError`` ``"{flag} must be at least {minimum}, got {value}"`` (``">= 0"`` for 0)."""
    if value < minimum:
        bound = ">= 0" if minimum == 0 else f"at least {minimum}"
        raise InputError(f"{flag} must be {bound}, got {value}")
    return value
