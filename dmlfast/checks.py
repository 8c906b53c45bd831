"""Argument checks in one place.

- :class:`InputError`, the one error type of a user's mistake: the commands (``python -m
  dmlfast.train`` and the others) print it as one ``PROG: error: ...`` line and exit with status 2
  (:func:`dmlfast._cli.run_command`); the library raises it wherever the user's input is wrong (a
  flag, a file, a checkpoint, a missing package). :func:`require_at_least` checks a flag's value.
- The checks of a library call's arguments (``require_tensors``, ``require_number``,
  ``require_int`` and the loss families' hyperparameters), which raise ``ValueError``/``TypeError``
  naming the function, the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers

import torch


class InputError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint): printed as one line, exit status 2."""


def one_of(names) -> str:
    """``"a, b or c"``: the choices of a message."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def require_at_least(flag: str, value, minimum: int):
    """``value``, or ``InputError`` ``"{flag} must be at least {minimum}, got {value}"`` (``">= 0"`` for 0)."""
    if value < minimum:
        bound = ">= 0" if minimum == 0 else f"at least {minimum}"
        raise InputError(f"{flag} must be {bound}, got {value}")
    return value


# --------------------------------------------------------------------------------- library arguments
# Programming errors of a library call: ValueError/TypeError naming the function and the argument.

def require_tensors(op: str, **tensors) -> None:
    """``TypeError`` unless every value is a ``torch.Tensor``; ``ValueError`` unless they share one device."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    devices = {name: value.device for name, value in tensors.items()}
    if len(set(devices.values())) > 1:
        *others, last = devices
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: {', '.join(others)} and {last} must be on one device, got {listed}")


def require_number(op: str, name: str, value, *, low=-math.inf, low_inclusive=True, high=math.inf, high_inclusive=False):
    """``value`` as a float after checking it is a real number in range.

    While torch.compile traces, hyperparameters may be symbolic floats; they are passed through
    unchecked there, since the compiled op checks the same ranges again when it runs.
    """
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and above_low and below_high):
        if high < math.inf:
            bound = f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        elif low > -math.inf:
            bound = f"{'>=' if low_inclusive else '>'} {low}"
        else:
            bound = "finite"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def require_int(op: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as an int after checking it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{op}: {name} must be {kind}, got {value!r}")
    return int(value)


def anchor_hyperparameters(op: str, margin, alpha):
    """``(margin, alpha)`` checked for the anchor family: margin finite, alpha > 0."""
    return require_number(op, "margin", margin), require_number(op, "alpha", alpha, low=0.0, low_inclusive=False)


def softmax_hyperparameters(op: str, scale, smoothing, exclude_positive):
    """``(scale, smoothing, exclude_positive)`` checked for the softmax family: scale > 0,
    smoothing in [0, 1), exclude_positive a bool."""
    scale = require_number(op, "scale", scale, low=0.0, low_inclusive=False)
    smoothing = require_number(op, "smoothing", smoothing, low=0.0, high=1.0)
    if not isinstance(exclude_positive, bool):
        raise TypeError(f"{op}: exclude_positive must be a bool, got {type(exclude_positive).__name__}")
    return scale, smoothing, exclude_positive
