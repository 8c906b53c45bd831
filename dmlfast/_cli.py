"""What the command-line tools (train, evaluate, retrieve, plot, embed, export, index) share: the
argument parser whose errors are one line, case-insensitive names with a suggestion, the options
that name a dataset split or the images to embed, the checks of the embedding flags, the CPU threads beside the loader's
workers, and how a command ends: one ``PROG: error: ...`` line and exit status 2 for an
:class:`~dmlfast.checks.InputError`, every progress bar silenced with ``--no-progress``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dmlfast.checks import InputError, canonical_name, require_at_least, require_new_files

USAGE_ERROR = 2

__all__ = ["InputError", "Parser", "USAGE_ERROR", "add_custom_data_arguments", "add_image_source_arguments", "add_model_arguments",
           "add_overwrite_argument", "check_embedding_flags", "name_choice", "parse_test_classes_flag", "read_image_source",
           "require_new_files", "run_command", "share_cores_with_loader"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``PROG: error: ...; see PROG --help``)
    instead of the whole usage block, with exit status 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_overwrite_argument(parser, what: str) -> None:
    """``--overwrite``: the permission to replace ``what`` when it exists (see :func:`require_new_files`)."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} when it exists (otherwise that is an error)")


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


def add_model_arguments(parser, embedding: bool = True) -> None:
    """``--checkpoint`` and ``--device``; with ``embedding`` also ``--batch-size``, ``--workers`` and ``--no-progress``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="a best.pt/last.pt of python -m dmlfast.train")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    if embedding:
        parser.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default: 64)")
        parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2; 0 = main process)")
        parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_image_source_arguments(parser, folder_flag: str) -> None:
    """``folder_flag DIR`` or ``--list FILE.csv`` (with ``--data-root`` and ``--split``): the images a
    command embeds (:func:`read_image_source`)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(folder_flag, type=Path, metavar="DIR", help="every image below DIR (label: the top-level sub-folder's name)")
    source.add_argument("--list", type=Path, metavar="FILE.csv", help="the images of a CSV list, rows path,label[,split]")
    parser.add_argument("--data-root", type=Path, metavar="DIR", help="--list: the folder its paths are relative to (default: the list's folder)")
    parser.add_argument("--split", choices=("train", "test", "query", "gallery"), help="--list: only the rows of this split")


def read_image_source(args, folder_flag: str):
    """``(ImageList, labels)`` of the images the arguments of :func:`add_image_source_arguments` name."""
    from dmlfast.training.gallery import gallery_from_folder, gallery_from_list

    folder = getattr(args, folder_flag.lstrip("-").replace("-", "_"))
    if folder is not None:
        if args.data_root is not None or args.split is not None:
            raise InputError(f"--data-root and --split apply to --list, not {folder_flag}")
        return gallery_from_folder(folder, flag=folder_flag)
    return gallery_from_list(args.list, args.data_root, args.split)


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
