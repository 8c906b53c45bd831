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
from typing import Any, Dict

import numpy as np
import torch

from dmlfast.safe_load import UnreadableFileError, load_torch_file

FORMAT = 2
#: Formats :func:`load_checkpoint` reads: 1 stored numpy's RNG state as a numpy array.
READABLE_FORMATS = (1, 2)


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
    otherwise)."""
    if not isinstance(state, dict):
        raise ValueError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (on the CPU) without running code from it;
    ``CheckpointError`` (one line) if it is missing, unreadable, holds other Python objects, or is
    not a dmlfast training checkpoint."""
    path = Path(path)
    try:
        state = load_torch_file(path, "checkpoint")
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS or "config" not in state:
        raise CheckpointError(f"{path} is not a dmlfast training checkpoint (format {', '.join(map(str, READABLE_FORMATS))})")
    return state
