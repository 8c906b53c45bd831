"""Checkpoint files: written atomically (temporary file in the same folder, fsync, ``os.replace``)
and read without running code (:func:`dmlfast.safe_load.load_torch_file`, ``torch.load(weights_only=True)``).

A checkpoint is a dict saved with ``torch.save``: ``format``, ``config`` (the run's final
configuration), ``epoch`` (completed epochs), ``model``, ``loss``, ``optimizer``, ``scheduler``,
``scaler`` (``None`` without fp16), ``rng`` (``rng_state()``), ``history`` and ``best``. Format 2
holds only tensors, plain containers and primitives (the RNG states as tensors); format 1 files
(numpy's RNG state as an array) are still read.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import torch

from dmlfast.safe_load import UnreadableFileError, load_torch_file

FORMAT = 2
#: Formats :func:`load_checkpoint` reads: 1 stored numpy's RNG state as a numpy array.
READABLE_FORMATS = (1, 2)
#: Suffix of the temporary file a checkpoint is written to before it replaces the old one.
TEMPORARY_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a dmlfast training checkpoint."""


def rng_state() -> Dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and every CUDA device's) generators, as
    tensors and primitives (so that a checkpoint holding them loads with ``weights_only=True``)."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)), "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a ``rng_state()`` result (the CUDA part only when CUDA is available); also takes the
    format-1 form (``random.getstate()`` and ``numpy.random.get_state()`` tuples as they are)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise CheckpointError("set_rng_state: state must be a dict from rng_state()")
    python, numpy_state = state["python"], state["numpy"]
    try:
        if isinstance(python, dict):
            python = (python["version"], tuple(python["state"].tolist()), python["gauss_next"])
        if isinstance(numpy_state, dict):
            numpy_state = {"bit_generator": numpy_state["bit_generator"], "has_gauss": numpy_state["has_gauss"],
                           "gauss": numpy_state["gauss"],
                           "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]}}
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"set_rng_state: state is not one rng_state() returns ({type(error).__name__}: {error})") from error


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous file at its path is intact."""


#: The types a checkpoint may hold (inside dicts, lists and tuples): what ``weights_only=True`` reads back.
PLAIN_TYPES = (torch.Tensor, str, int, float, bool, type(None), torch.Size, torch.dtype)


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(key).__name__}; keys must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"save_checkpoint: {where} is a {type(value).__name__}; a checkpoint holds only tensors, "
                        "dicts, lists, tuples, str, int, float, bool and None (so that it loads without running code)")


def save_checkpoint(state: Dict[str, Any], path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never a partial one.

    ``state`` may hold only tensors, plain containers and primitives (``TypeError`` naming the entry
    otherwise). A failed write (``CheckpointWriteError``: a full disk, a read-only folder) removes
    its temporary file and leaves the previous file at ``path`` as it was."""
    if not isinstance(state, dict):
        raise ValueError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            before = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {error.strerror or error} ({before})") from error
        raise
    return path


def remove_stale_temporaries(folder) -> list:
    """Delete the temporary files that interrupted :func:`save_checkpoint` calls left in ``folder``
    (``.<name>.<random>.tmp``); returns their paths. Call it only while no other process writes
    checkpoints there (under the run's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.glob(f".*.pt.*{TEMPORARY_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path, entries: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (on the CPU) without running code from it;
    ``CheckpointError`` (one line) if it is missing, unreadable, holds other Python objects, is not
    a dmlfast training checkpoint, or lacks one of ``entries`` (e.g. ``("model",)``)."""
    if isinstance(entries, str) or not all(isinstance(e, str) for e in entries):
        raise ValueError(f"load_checkpoint: entries must be a sequence of key names, got {entries!r}")
    path = Path(path)
    try:
        state = load_torch_file(path, "checkpoint")
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS or "config" not in state:
        raise CheckpointError(f"{path} is not a dmlfast training checkpoint (format {', '.join(map(str, READABLE_FORMATS))})")
    missing = [e for e in entries if state.get(e) is None]
    if missing:
        held = ", ".join(k for k, v in state.items() if v is not None and k != "format")
        raise CheckpointError(f"{path} has no {', '.join(repr(e) for e in missing)} entry (it holds {held}); a training "
                              "run's last.pt and best.pt have it (a proxy shard, *.shard-R-of-N.pt, holds only proxies)")
    return state
