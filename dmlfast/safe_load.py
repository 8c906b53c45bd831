"""Reading ``torch.save`` files without running code from them.

Every file dmlfast reads with ``torch.load`` (training checkpoints and their proxy shards, ``--weights``
state dicts, gallery caches) goes through :func:`load_torch_file`: ``torch.load(weights_only=True)``,
whose unpickler builds only tensors, plain containers (dict, list, tuple, OrderedDict) and primitives,
and refuses any other Python object before creating it. A pickle can name any callable (``os.system``,
``exec``) to be called while it is read, so a file from someone else must never be unpickled freely.

The one addition to torch's list is what numpy's legacy RNG state needs (``numpy.ndarray``,
``numpy.dtype``, the uint32 dtype and numpy's array reconstructor), so that checkpoints written before the format held
its RNG states as tensors still load. Those build uint32 arrays and nothing else.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnreadableFileError(ValueError):
    """A file cannot be read by ``torch.load`` (missing, truncated, not a torch file); the message is one line."""


class UnsafeFileError(UnreadableFileError):
    """A torch file holds Python objects other than tensors and plain data: it is refused unread."""


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 names it numpy._core
    return core.multiarray._reconstruct


#: numpy's legacy RNG state, a uint32 array (and only uint32), under both of numpy's module names.
LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType,
                        (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
                        (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct")]


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def load_torch_file(path, what: str = "file") -> Any:
    """The object saved in ``path`` (tensors on the CPU), read without running code from it.

    ``what`` names the file in messages (e.g. ``"checkpoint"``). Raises ``UnsafeFileError`` when the
    file holds any other Python object (naming the first one), ``UnreadableFileError`` when it
    cannot be read at all; both messages are one line."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"no such {what}: {path}")
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(error))
        if found:
            raise UnsafeFileError(f"refusing to load {what} {path}: it holds a Python object ({found.group(1) or found.group(2)}) "
                                  f"where a {what} holds only tensors and plain data, and unpickling it could run code") from None
        detail = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise UnreadableFileError(f"cannot read {what} {path}: not a torch file, or a damaged one ({_one_line(detail)})") from None
    except Exception as error:  # zip, EOF and OS errors vary; all mean "not a readable torch file"
        raise UnreadableFileError(f"cannot read {what} {path}: not a torch file, or a truncated or damaged one "
                                  f"({type(error).__name__}: {_one_line(error)})") from error
