"""Checkpoint files: written atomically (temporary file in the same folder, fsync, ``os.replace``).

A checkpoint is a dict saved with ``torch.save``: ``format``, ``config`` (the run's final
configuration), ``epoch`` (completed epochs), ``model``, ``loss``, ``optimizer``, ``scheduler``,
``scaler`` (``None`` without fp16), ``rng`` (``rng_state()``), ``history`` and ``best``.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a dmlfast training checkpoint."""


def rng_state() -> Dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and every CUDA device's) generators."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a ``rng_state()`` result (the CUDA part only when CUDA is available)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise CheckpointError("set_rng_state: state must be a dict from rng_state()")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: Dict[str, Any], path) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new one, never a partial one."""
    if not isinstance(state, dict):
        raise ValueError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
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
    """Read a checkpoint written by ``save_checkpoint`` (on the CPU); ``CheckpointError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle/zip errors vary; all mean "not a readable checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path} ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is not a dmlfast training checkpoint (format {FORMAT})")
    return state
