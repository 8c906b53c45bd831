"""A training run's output folder (``--output``): one run at a time, and no earlier result replaced
unless the user asked for it.

- :func:`locked` holds an exclusive lock on ``<folder>/.dmlfast.lock`` (``flock``) for the whole run.
  The kernel releases it when the process ends, however it ends, so a run killed with ``kill -9``
  never blocks a later ``--resume``. The file names its holder (pid, host, start time, command) for
  the error a second run prints. The file itself is never deleted: a waiting process could
  otherwise lock an unlinked copy.
- :func:`claim` decides what the new run may do with what is there: continue it (``--resume`` and a
  ``last.pt``), replace it (``--overwrite``: the earlier run's files are removed first) or start in
  an empty folder; anything else is an ``InputError`` naming the earlier results. It also removes the
  temporary files of a checkpoint write that a kill interrupted.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from dmlfast.checks import InputError
from dmlfast.training.checkpoint import remove_stale_temporaries

LOCK_NAME = ".dmlfast.lock"
#: What a finished or interrupted run leaves that a new run must not silently replace.
RESULTS = ("last.pt", "best.pt", "log.jsonl", "summary.json")
#: Everything a run writes, removed by ``--overwrite`` (with the proxy shards ``*.shard-R-of-N.pt``).
RUN_FILES = (*RESULTS, "config.json", "curves.png", "tensorboard", "wandb")


def check_output_folder(folder) -> Path:
    """``folder`` as a ``Path``; ``InputError`` when it exists and is not a folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file, not a folder; give a folder for the run's checkpoints and logs")
    return folder


@contextmanager
def locked(folder) -> Iterator[Path]:
    """Create ``folder`` if needed and hold its run lock while the ``with`` block runs; ``InputError``
    naming the live run when another process holds it."""
    import fcntl

    folder = check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise InputError(f"--output: cannot create {folder} or its lock file ({error.strerror or error})") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise InputError(f"--output {folder} is in use by another run ({holder}); wait for it to end, or choose another "
                         "--output") from None
    try:
        command = " ".join(sys.argv)
        command = command if len(command) <= 200 else command[:199] + "…"
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                       f"{command}\n").encode(), 0)
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _earlier_results(folder: Path) -> List[str]:
    shards = sorted(p.name for p in folder.glob("*.shard-*-of-*.pt"))
    return [name for name in RESULTS if (folder / name).exists()] + shards


def claim(folder, resume: bool, overwrite: bool) -> bool:
    """Make ``folder`` (locked by this run) ready for the run; returns whether there is a ``last.pt``
    to resume. ``InputError`` when it holds an earlier run's results and neither ``resume`` (with a
    ``last.pt``) nor ``overwrite`` says what to do with them."""
    folder = Path(folder)
    if resume and overwrite:
        raise InputError("--overwrite and --resume exclude each other: --resume continues the run in --output, "
                         "--overwrite replaces it")
    remove_stale_temporaries(folder)
    earlier = _earlier_results(folder)
    if resume and "last.pt" in earlier:
        return True
    if earlier and not overwrite:
        listed = ", ".join(earlier)
        if resume:
            raise InputError(f"--resume: {folder} has no last.pt to continue but holds an earlier run's results ({listed}); "
                             "pass --overwrite instead to replace them, or choose another --output")
        raise InputError(f"--output {folder} holds an earlier run ({listed}); pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --output")
    if overwrite:
        for name in [*RUN_FILES, *(p.name for p in folder.glob("*.shard-*-of-*.pt"))]:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return False
