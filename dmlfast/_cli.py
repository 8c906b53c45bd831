"""What the command-line tools (train, evaluate, retrieve, plot) share: the options that name a
dataset split, the checks of the embedding flags, and how a command ends: one
``PROG: error: ...`` line and exit status 2 for an :class:`~dmlfast.checks.InputError`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from dmlfast.checks import InputError, require_at_least

USAGE_ERROR = 2

__all__ = ["InputError", "USAGE_ERROR", "add_custom_data_arguments", "check_embedding_flags", "parse_test_classes_flag",
           "run_command"]


def parse_test_classes_flag(text: str):
    """``--test-classes``: an int N or a fraction in (0, 1) (an argparse ``type``)."""
    from dmlfast.data import parse_test_classes

    try:
        return parse_test_classes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_custom_data_arguments(group) -> None:
    """``--list`` and ``--test-classes`` of ``--dataset csv|folder`` (default: the checkpoint's)."""
    group.add_argument("--list", type=Path, metavar="FILE.csv", help="--dataset csv: its list file (default: the checkpoint's)")
    group.add_argument("--test-classes", type=parse_test_classes_flag, metavar="N|FRACTION",
                       help="--dataset folder/csv: held-out classes, drawn from the checkpoint's seed (default: the checkpoint's)")


def check_embedding_flags(args) -> None:
    """``--batch-size`` at least 1 and ``--workers`` >= 0 (``InputError`` otherwise)."""
    require_at_least("--batch-size", args.batch_size, 1)
    require_at_least("--workers", args.workers, 0)


def run_command(prog: str, command: Callable[[Any], Any], args: Any) -> int:
    """``command(args)``; returns 0, or ``USAGE_ERROR`` after printing an ``InputError`` as one line."""
    try:
        command(args)
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0
