"""Files written so that a reader sees the old one or the new one, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path, write: Callable[[str], None]) -> Path:
    """``write(temporary path)`` in ``path``'s folder, then rename it over ``path``; the temporary file
    is removed when ``write`` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_array(path: str, array) -> None:
    """``numpy.save`` to exactly ``path`` (``numpy.save`` given a name would append ``.npy``)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array)
