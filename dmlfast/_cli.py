"""What the command-line tools (train, evaluate, retrieve, plot, embed, export, index) share: the
argument parser whose errors are one line, case-insensitive names with a suggestion, the options
that name a dataset split, the checks of the embedding flags, the CPU threads beside the loader's
workers, and how a command ends: one ``PROG: error: ...`` line and exit status 2 for an
:class:`~dmlfast.checks.InputError`, every progress bar silenced with ``--no-progress``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dmlfast.checks import InputError, canonical_name, require_at_least

USAGE_ERROR = 2

__all__ = ["InputError", "Parser", "USAGE_ERROR", "add_custom_data_arguments", "check_embedding_flags", "name_choice",
           "parse_test_classes_flag", "run_command", "share_cores_with_loader"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``PROG: error: ...; see PROG --help``)
    instead of the whole usage block, with exit status 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def name_choice(what: str, choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type`` that takes one of ``choices`` in any case and returns its spelling there;
    otherwise the error suggests the closest name (:func:`dmlfast.checks.canonical_name`)."""

    def convert(text: str) -> str:
        try:
            return canonical_name(what, text, choices)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = what  # argparse names the type in some messages
    return convert


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


def share_cores_with_loader(workers: int) -> Optional[int]:
    """Give torch's CPU threads the cores the loader's ``workers`` processes leave: usable cores minus
    ``workers``, at least 1 (on 2 cores with 2 workers, 1 thread). Two threads that spin-wait for each
    other on a machine whose cores are also busy decoding (or running other jobs) are several times
    slower than one (README, "Threads"). An ``OMP_NUM_THREADS`` in the environment is the user's
    choice and is left alone. Returns the number of threads set, or ``None``."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - max(0, int(workers)))
    torch.set_num_threads(threads)
    return threads


def run_command(prog: str, command: Callable[[Any], Any], args: Any) -> int:
    """``command(args)`` with every progress bar silenced when ``args.progress`` is false
    (``--no-progress``); returns 0, or ``USAGE_ERROR`` after printing an ``InputError`` as one line."""
    from dmlfast.progress import progress_bars

    try:
        with progress_bars(bool(getattr(args, "progress", True))):
            command(args)
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0
