"""The gallery of ``python -m dmlfast.retrieve``: the images below a folder (or a dataset split),
embedded once by a checkpoint's model and cached next to the checkpoint, and the search of a query
against it with the k-NN backends of :mod:`dmlfast.evaluation`.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from dmlfast.checks import InputError
from dmlfast.data import IMAGE_EXTENSIONS, ImageList, check_images, image_folders
from dmlfast.safe_load import UnreadableFileError, load_torch_file
from dmlfast.training.embedding import embed_list


def gallery_from_folder(folder: Path):
    """``(ImageList, labels)``: the readable images below ``folder`` in sorted order; the label of an
    image is its top-level sub-folder's name (``None`` directly in ``folder``). Links are followed,
    but no real folder is read twice (:func:`dmlfast.data.image_folders`)."""
    if not isinstance(folder, (str, Path)):
        raise ValueError(f"gallery_from_folder: folder must be a path, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--gallery: no such folder: {folder}")
    (found,) = image_folders(folder)  # links followed, no folder read twice
    paths = sorted([*found.loose, *(p for files in found.classes.values() for p in files)])
    if not paths:
        raise InputError(f"--gallery: no images ({', '.join(IMAGE_EXTENSIONS)}) below {folder}")
    checked = check_images(ImageList(paths, np.zeros(len(paths), dtype=np.int64), ["-"], str(folder), "gallery"), strict=False, remap=False)
    if len(checked) == 0:
        raise InputError(f"--gallery: none of the {len(paths)} images below {folder} is readable")
    labels = []
    for p in checked.paths:
        parts = Path(os.path.relpath(p, folder)).parts
        labels.append(parts[0] if len(parts) > 1 else None)
    return checked, labels


def cache_key(checkpoint: Path, paths: Sequence[str], config, dtype) -> str:
    """SHA-256 of the checkpoint's bytes, the ordered gallery files (path, size, mtime), the transform and dtype."""
    if not Path(checkpoint).is_file():
        raise ValueError(f"cache_key: checkpoint must be an existing file, got {checkpoint!r}")
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise ValueError("cache_key: paths must be a sequence of path strings")
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    digest.update(repr((config["model"], config["image_size"], config.get("resize_size"), config["dataset"], str(dtype))).encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"\n{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def gallery_embeddings(model, image_list, config, device, dtype, *, checkpoint: Path, use_cache: bool, batch_size: int,
                       workers: int, progress: bool) -> Tuple[torch.Tensor, Optional[Path], bool]:
    """``(embeddings, cache file or None, loaded from the cache?)`` of ``image_list``: read from the
    cache next to ``checkpoint`` when it matches (:func:`cache_key`), else embedded (and cached when ``use_cache``)."""
    cache = None
    if use_cache:
        key = cache_key(checkpoint, image_list.paths, config, dtype)
        cache = checkpoint.parent / f"{checkpoint.stem}.gallery-{key[:16]}.pt"
        if cache.is_file():
            try:
                saved = load_torch_file(cache, "gallery cache")
            except UnreadableFileError as error:  # an unreadable (or unsafe) cache is rebuilt, not fatal
                warnings.warn(f"ignoring it: {error}", stacklevel=2)
            else:
                if isinstance(saved, dict) and saved.get("key") == key and saved.get("paths") == list(image_list.paths) \
                        and isinstance(saved.get("embeddings"), torch.Tensor):
                    return saved["embeddings"], cache, True
    embeddings = embed_list(model, image_list, config, device, dtype, batch_size=batch_size, workers=workers,
                            progress=progress, desc="embed gallery")
    if cache is not None and not _write_cache(cache, {"key": key, "paths": list(image_list.paths), "embeddings": embeddings}):
        cache = None
    return embeddings, cache, False


def _write_cache(cache: Path, content) -> bool:
    """Save ``content`` to ``cache`` atomically; a warning (and ``False``) when it cannot be written."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(content, f)
        os.replace(tmp, cache)
    except OSError as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not write the gallery cache next to the checkpoint ({error}); the gallery will be embedded again next time", stacklevel=3)
        return False
    return True


def nearest(query: torch.Tensor, reference: torch.Tensor, k: int, backend: str):
    """``(concrete backend, similarities, indices)`` of the ``k`` references most similar to the one
    ``query`` row, best first; ``InputError`` naming ``--backend`` when it cannot serve the search."""
    from dmlfast.evaluation.knn import default_chunk_size, resolve_backend, search

    try:
        backend = resolve_backend(backend, query.device, k)
    except ValueError as error:
        raise InputError(f"--backend: {error}") from error
    ((_, similarities, indices),) = list(search(query, reference.to(query.dtype), k, backend, default_chunk_size(len(reference)), progress=False))
    return backend, similarities[0].tolist(), indices[0].tolist()
