"""The gallery of ``python -m dmlfast.retrieve`` (and of ``embed`` and ``index``): the images below a
folder, listed in a CSV file or of a dataset split, embedded once by a checkpoint's model and cached
next to the checkpoint, and the search of a query against it with the k-NN backends of
:mod:`dmlfast.evaluation`.
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


def gallery_from_folder(folder: Path, flag: str = "--gallery"):
    """``(ImageList, labels)``: the readable images below ``folder`` in sorted order; the label of an
    image is its top-level sub-folder's name (``None`` directly in ``folder``). Links are followed,
    but no real folder is read twice (:func:`dmlfast.data.image_folders`). Errors name ``flag``."""
    if not isinstance(folder, (str, Path)):
        raise ValueError(f"gallery_from_folder: folder must be a path, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{flag}: no such folder: {folder}")
    (found,) = image_folders(folder)  # links followed, no folder read twice
    paths = sorted([*found.loose, *(p for files in found.classes.values() for p in files)])
    if not paths:
        raise InputError(f"{flag}: no images ({', '.join(IMAGE_EXTENSIONS)}) below {folder}")
    checked = check_images(ImageList(paths, np.zeros(len(paths), dtype=np.int64), ["-"], str(folder), "gallery"), strict=False, remap=False)
    if len(checked) == 0:
        raise InputError(f"{flag}: none of the {len(paths)} images below {folder} is readable")
    labels = []
    for p in checked.paths:
        parts = Path(os.path.relpath(p, folder)).parts
        labels.append(parts[0] if len(parts) > 1 else None)
    return checked, labels


def gallery_from_list(list_file: Path, data_root: Optional[Path] = None, split: Optional[str] = None):
    """``(ImageList, labels)``: the readable images ``list_file`` lists (rows ``path,label[,split]``,
    paths relative to ``data_root``, default the list's folder), in its order, or only its ``split``
    rows; each image's label is its row's label (:func:`dmlfast.data.custom.read_csv_images`)."""
    from dmlfast.data import DatasetLayoutError
    from dmlfast.data.custom import read_csv_images

    root = Path(list_file).parent if data_root is None else Path(data_root)
    try:
        listed = read_csv_images(root, list_file, split)
    except DatasetLayoutError as error:
        raise InputError(f"--list: {' '.join(str(error).split())}") from error
    if len(listed) == 0:
        raise InputError(f"--list: none of the images {list_file} lists is readable")
    return listed, listed.label_names()


def file_digest(path: Path, digest=None):
    """``digest`` (default a new SHA-256) updated with the bytes of the file at ``path``, read in 4 MiB blocks."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest


def cache_key(checkpoint: Path, paths: Sequence[str], config, dtype) -> str:
    """SHA-256 of the checkpoint's bytes, the ordered gallery files (path, size, mtime), the transform and dtype."""
    if not Path(checkpoint).is_file():
        raise ValueError(f"cache_key: checkpoint must be an existing file, got {checkpoint!r}")
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise ValueError("cache_key: paths must be a sequence of path strings")
    digest = file_digest(checkpoint)
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


def nearest(query: torch.Tensor, reference: torch.Tensor, k: int, backend: str, exclude: Optional[int] = None):
    """``(concrete backend, similarities, indices)`` of the ``k`` references most similar to the one
    ``query`` row, best first, reference ``exclude`` left out (the query itself, when it is a gallery
    image); ``InputError`` naming ``--backend`` when it cannot serve the search."""
    from dmlfast.evaluation.knn import default_chunk_size, resolve_backend, search

    depth = k + (exclude is not None)
    try:
        backend = resolve_backend(backend, query.device, depth)
    except ValueError as error:
        raise InputError(f"--backend: {error}") from error
    ((_, similarities, indices),) = list(search(query, reference.to(query.dtype), depth, backend,
                                                default_chunk_size(len(reference)), progress=False))
    kept = [(s, i) for s, i in zip(similarities[0].tolist(), indices[0].tolist()) if i != exclude][:k]
    return backend, [s for s, _ in kept], [i for _, i in kept]
