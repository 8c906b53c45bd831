"""A gallery index for serving: a gallery's embeddings in a faiss index, with each image's path and
label, so that a query costs one embedding and one search.

Kinds (:data:`INDEX_KINDS`): ``"flat"``, exact (``IndexFlatIP``: cosine similarity of the unit
embeddings, every gallery row compared); ``"ivf"``, ``IndexIVFFlat`` with ``nlist`` spherical
k-means cells of which ``nprobe`` are searched; ``"hnsw"``, ``IndexHNSWFlat`` with ``hnsw_m``
links per node, searched with ``ef_search`` candidates. The approximate kinds trade recall for
speed on 10^6+ images (benchmarks/RESULTS.md, "Gallery index").

On disk an index is a folder: ``index.faiss`` (faiss's own binary format, written by
``faiss.write_index``) and ``gallery.json`` (paths, labels, search parameters, the checkpoint's
path and SHA-256, the evaluation transform). Neither is a pickle: reading them runs no code from
the files.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dmlfast.checks import InputError, one_of
from dmlfast.inference.files import write_atomically

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
META_FILE = "gallery.json"
FORMAT = 1
#: Search defaults of the approximate kinds (the benchmark's choice at 10^6 x 128, RESULTS.md).
DEFAULT_NPROBE = 128
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 80
#: Training points per IVF cell for the k-means (faiss warns below 39).
IVF_TRAINING_PER_CELL = 64


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the gallery index needs faiss, which is not installed: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def default_nlist(size: int) -> int:
    """IVF cells for ``size`` gallery rows: 4·√size (faiss's rule of thumb), at least 1, at most size / 39."""
    return max(1, min(int(round(4 * math.sqrt(size))), size // 39))


class GalleryIndex:
    """A faiss index over a gallery's unit embeddings, with ``paths``, ``labels`` (str or ``None`` per
    image) and ``info`` (kind, search parameters, checkpoint, transform; what ``gallery.json`` holds
    besides the paths and labels). Build with :meth:`build`, search with :meth:`search`, keep with
    :meth:`save` / :meth:`load`."""

    def __init__(self, index, paths: List[str], labels: List[Optional[str]], info: Dict[str, Any]):
        self.index, self.paths, self.labels, self.info = index, list(paths), list(labels), dict(info)
        self._where = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"GalleryIndex({self.info['kind']}, {len(self)} images, dimension {self.info['embedding_size']})"

    @classmethod
    def build(cls, embeddings, paths: Sequence[str], labels: Optional[Sequence[Optional[str]]] = None, *, kind: str = "flat",
              nlist: Optional[int] = None, hnsw_m: int = DEFAULT_HNSW_M, info: Optional[Dict[str, Any]] = None,
              seed: int = 0) -> "GalleryIndex":
        """An index of kind ``kind`` over ``embeddings`` ((N, D) float, L2-normalised here) of the images
        ``paths`` (N) with ``labels`` (N, or ``None``). ``nlist``: IVF cells (default
        :func:`default_nlist`), trained on up to ``IVF_TRAINING_PER_CELL`` · nlist rows drawn with
        ``seed``; ``hnsw_m``: HNSW links per node. ``info``: more to record (checkpoint, transform)."""
        faiss = _faiss()
        vectors = _unit_rows(embeddings, "embeddings")
        size, dim = vectors.shape
        paths = [os.fspath(p) for p in paths]
        labels = [None] * size if labels is None else [None if v is None else str(v) for v in labels]
        if len(paths) != size or len(labels) != size:
            raise ValueError(f"GalleryIndex.build: {size} embeddings, {len(paths)} paths and {len(labels)} labels; one each per image")
        if kind not in INDEX_KINDS:
            raise ValueError(f"GalleryIndex.build: kind must be {one_of(INDEX_KINDS)}, got {kind!r}")
        params: Dict[str, Any] = {"kind": kind}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = default_nlist(size) if nlist is None else nlist
            if isinstance(nlist, bool) or not isinstance(nlist, int) or not 1 <= nlist <= size:
                raise ValueError(f"GalleryIndex.build: nlist must be an int in [1, {size}] (the gallery's size), got {nlist!r}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = True  # unit vectors: cell centres on the sphere
            sample = np.random.default_rng(seed).permutation(size)[:IVF_TRAINING_PER_CELL * nlist]
            index.train(vectors[np.sort(sample)])
            params.update(nlist=nlist, nprobe=min(DEFAULT_NPROBE, nlist))
        else:
            if isinstance(hnsw_m, bool) or not isinstance(hnsw_m, int) or hnsw_m < 2:
                raise ValueError(f"GalleryIndex.build: hnsw_m must be an int >= 2, got {hnsw_m!r}")
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            params.update(hnsw_m=hnsw_m, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=DEFAULT_EF_SEARCH)
        index.add(vectors)
        from dmlfast import __version__

        built = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(index, paths, labels, {**(info or {}), **params, "size": size, "embedding_size": dim, "dmlfast": __version__,
                                          "built": built})

    @classmethod
    def from_gallery(cls, trained, gallery, labels: Sequence[Optional[str]], *, kind: str = "flat", nlist: Optional[int] = None,
                     hnsw_m: int = DEFAULT_HNSW_M, use_cache: bool = True, batch_size: int = 64, workers: int = 0,
                     progress: bool = True) -> Tuple["GalleryIndex", bool]:
        """``(index, embeddings read from the cache?)``: the images of ``gallery`` (an ``ImageList``, e.g.
        from :func:`dmlfast.training.gallery.gallery_from_folder`) embedded by ``trained`` (a
        :class:`~dmlfast.inference.TrainedModel`), once: through retrieve's gallery cache next to the
        checkpoint when ``use_cache`` (:func:`dmlfast.training.gallery.gallery_embeddings`), then
        indexed as :meth:`build` does. Records the checkpoint's path and SHA-256 and the transform."""
        from dmlfast.data import ImageList
        from dmlfast.training.gallery import gallery_embeddings

        images = ImageList(gallery.paths, gallery.labels, gallery.class_ids, trained.config["dataset"], "gallery")
        embeddings, _, cached = gallery_embeddings(trained.model, images, trained.config, trained.device, trained.dtype,
                                                   checkpoint=trained.checkpoint, use_cache=use_cache, batch_size=batch_size,
                                                   workers=workers, progress=progress)
        transform = trained.transform
        info = {"checkpoint": {"path": os.path.abspath(trained.checkpoint), "sha256": trained.checkpoint_sha256},
                "transform": {"resize": transform.resize_size, "crop": transform.image_size, "normalization": transform.normalization}}
        paths = [os.path.abspath(p) for p in images.paths]  # the index may be queried from another folder
        return cls.build(embeddings, paths, labels, kind=kind, nlist=nlist, hnsw_m=hnsw_m, info=info), cached

    def require_model(self, trained) -> None:
        """``InputError`` unless ``trained`` was loaded from the checkpoint this index was built with
        (same SHA-256): another model's query embeddings are not comparable with the gallery's."""
        recorded = self.info.get("checkpoint", {}).get("sha256")
        if recorded != trained.checkpoint_sha256:
            raise InputError(f"--checkpoint: {trained.checkpoint} is not the checkpoint this index was built with "
                             f"({self.info.get('checkpoint', {}).get('path')}, SHA-256 {str(recorded)[:12]}...); its embeddings "
                             "are not comparable with the gallery's: rebuild the index with it")

    def query(self, trained, images: Sequence, k: int, *, batch_size: int = 64, **search) -> List[Dict[str, Any]]:
        """For each image file of ``images``: ``{"query", "left_out" (its own gallery row or None),
        "results": [(path, label, similarity)] best first}``, the ``k`` nearest gallery images. The
        queries are embedded together by ``trained`` (one embedding pass) and searched together (one
        search); a query that is a gallery image is left out of its own results. ``search``:
        ``nprobe``, ``ef_search`` (:meth:`search`)."""
        self.require_model(trained)
        paths = [os.fspath(p) for p in images]
        vectors = trained.embed(paths, batch_size=batch_size)
        own = [self.position(p) for p in paths]
        similarities, rows = self.search(vectors, k, exclude=own, **search)
        return [{"query": p, "left_out": own[q],
                 "results": [(self.paths[r], self.labels[r], float(s)) for s, r in zip(similarities[q], rows[q]) if r >= 0]}
                for q, p in enumerate(paths)]

    def position(self, path) -> Optional[int]:
        """The gallery row of the image at ``path`` (compared as real paths, links resolved), or ``None``."""
        if self._where is None:
            self._where = {os.path.realpath(p): i for i, p in enumerate(self.paths)}
        return self._where.get(os.path.realpath(os.fspath(path)))

    def search(self, queries, k: int, *, exclude: Optional[Sequence[Optional[int]]] = None, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(similarities, rows)``, each (Q, k), best first: the ``k`` gallery rows most similar
        (cosine) to each of ``queries`` ((Q, D) float, L2-normalised here). ``exclude[q]``: a gallery
        row to leave out of query q's results (the query itself, :meth:`position`), or ``None``.
        ``nprobe`` (ivf) and ``ef_search`` (hnsw) override the saved search parameters. An
        approximate index may find fewer than ``k``: the rest are row -1, similarity -inf."""
        vectors = _unit_rows(queries, "queries")
        if vectors.shape[1] != self.info["embedding_size"]:
            raise ValueError(f"GalleryIndex.search: queries are {vectors.shape[1]}-d, the index holds {self.info['embedding_size']}-d embeddings")
        exclude = [None] * len(vectors) if exclude is None else list(exclude)
        if len(exclude) != len(vectors):
            raise ValueError(f"GalleryIndex.search: exclude must have one entry per query ({len(vectors)}), got {len(exclude)}")
        left_out = any(e is not None for e in exclude)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self) - left_out:
            raise ValueError(f"GalleryIndex.search: k must be an int in [1, {len(self) - left_out}] (the gallery's size"
                             f"{', less the query itself' if left_out else ''}), got {k!r}")
        depth = k + left_out
        self._set_search_parameters(depth, nprobe, ef_search)
        similarities, rows = self.index.search(vectors, depth)
        out_similarities = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        out_rows = np.full((len(vectors), k), -1, dtype=np.int64)
        for q, (sims, found) in enumerate(zip(similarities, rows)):
            kept = [(s, r) for s, r in zip(sims, found) if r >= 0 and r != exclude[q]][:k]
            if kept:
                out_similarities[q, :len(kept)], out_rows[q, :len(kept)] = zip(*kept)
        return out_similarities, out_rows

    def _set_search_parameters(self, depth: int, nprobe: Optional[int], ef_search: Optional[int]) -> None:
        faiss = _faiss()
        kind = self.info["kind"]
        if nprobe is not None and kind != "ivf":
            raise ValueError(f"GalleryIndex.search: nprobe applies to an ivf index, this one is {kind}")
        if ef_search is not None and kind != "hnsw":
            raise ValueError(f"GalleryIndex.search: ef_search applies to an hnsw index, this one is {kind}")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"GalleryIndex.search: {name} must be a positive int, got {value!r}")
        if kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = min(nprobe or self.info["nprobe"], self.info["nlist"])
        elif kind == "hnsw":
            self.index.hnsw.efSearch = max(ef_search or self.info["ef_search"], depth)

    def save(self, folder, overwrite: bool = False) -> Path:
        """Write ``folder/index.faiss`` and ``folder/gallery.json`` (each to a temporary file renamed into
        place); ``InputError`` when the folder holds either already and ``overwrite`` is false."""
        faiss = _faiss()
        folder = Path(folder)
        require_free(folder, overwrite)
        meta = {"format": FORMAT, **self.info, "paths": self.paths, "labels": self.labels}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(folder / INDEX_FILE, lambda tmp: faiss.write_index(self.index, tmp))
            write_atomically(folder / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta) + "\n"))
        except OSError as error:
            raise InputError(f"--out: cannot write the index to {folder} ({error.strerror or error})") from error
        return folder

    @classmethod
    def load(cls, folder) -> "GalleryIndex":
        """The index saved in ``folder`` (read with ``json`` and ``faiss.read_index``; nothing runs code);
        ``InputError`` naming the problem when the folder does not hold a consistent one."""
        faiss = _faiss()
        folder = Path(folder)
        for name in (INDEX_FILE, META_FILE):
            if not (folder / name).is_file():
                raise InputError(f"index: {folder} is not a gallery index (no {name}); build one with python -m dmlfast.index build")
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"index: cannot read {folder / META_FILE} ({error})") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in INDEX_KINDS \
                or not isinstance(meta.get("paths"), list) or not isinstance(meta.get("labels"), list) \
                or len(meta["paths"]) != len(meta["labels"]):
            raise InputError(f"index: {folder / META_FILE} is not a dmlfast gallery index description (format {FORMAT})")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as error:
            raise InputError(f"index: cannot read {folder / INDEX_FILE} as a faiss index ({' '.join(str(error).split())[:200]})") from error
        if index.ntotal != len(meta["paths"]) or index.d != meta.get("embedding_size"):
            raise InputError(f"index: {folder}: {INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, "
                             f"{META_FILE} describes {len(meta['paths'])} of dimension {meta.get('embedding_size')}")
        paths, labels = meta.pop("paths"), meta.pop("labels")
        meta.pop("format")
        return cls(index, paths, labels, meta)


def require_free(folder, overwrite: bool) -> None:
    """``InputError`` when ``folder`` holds an index (or a file of one) and ``overwrite`` is false."""
    folder = Path(folder)
    existing = [folder / name for name in (INDEX_FILE, META_FILE) if (folder / name).exists()]
    if existing and not overwrite:
        raise InputError(f"--out: {folder} holds an index already ({', '.join(p.name for p in existing)}); pass --overwrite to "
                         "replace it")


def _unit_rows(values, name: str) -> np.ndarray:
    """``values`` ((N, D), torch or numpy, finite) as a C-contiguous float32 array of unit rows."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"GalleryIndex: {name} must be a non-empty (N, D) float array, got {array.dtype} {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"GalleryIndex: {name} contain NaN or Inf")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12))


