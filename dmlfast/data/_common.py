"""Shared types of ``dmlfast.data``: image lists, split containers, layout errors, per-dataset defaults."""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """A dataset root does not have the expected files or folders (or a listed image is missing)."""


class CorruptImageError(ValueError):
    """An image file is truncated or not an image (raised with ``strict=True``)."""


@dataclass(frozen=True)
class DataDefaults:
    """Transform defaults of one dataset; ``make_loader`` uses them for arguments left as ``None``.

    ``image_size``: square output side. ``resize_size``: shorter side before the evaluation
    centre crop. ``crop_scale``/``crop_ratio``: RandomResizedCrop area and aspect ranges.
    ``hflip``: random horizontal flip in training. ``own_size``: the images' own small size, which a
    training run keeps whatever the backbone (otherwise a run takes its backbone's input size).
    """

    image_size: int
    resize_size: int
    crop_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = True
    own_size: bool = False


_REAL = DataDefaults(image_size=224, resize_size=256, crop_scale=(0.08, 1.0))

#: Per-dataset transform defaults, the single place where they are set.
DATASET_DEFAULTS: Dict[str, DataDefaults] = {
    "CUB": _REAL,
    "Cars196": _REAL,
    "SOP": _REAL,
    "In-shop": _REAL,
    "folder": _REAL,  # the user's own photos: the real datasets' 224 px crops
    "csv": _REAL,
    # Characters: no flips (mirrored characters are other characters), mild crops, no border crop.
    "Omniglot": DataDefaults(image_size=64, resize_size=64, crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), hflip=False,
                             own_size=True),
    "glyphs": DataDefaults(image_size=32, resize_size=32, crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), hflip=False,
                           own_size=True),
}

#: Used by ``make_loader`` for an ``ImageList`` without a known ``dataset`` name.
GENERIC_DEFAULTS = _REAL


def dataset_defaults(name: Optional[str]) -> DataDefaults:
    """Transform defaults for dataset ``name`` (``GENERIC_DEFAULTS`` for ``None``)."""
    if name is None:
        return GENERIC_DEFAULTS
    if name not in DATASET_DEFAULTS:
        raise KeyError(f"dataset_defaults: unknown dataset {name!r}; known: {sorted(DATASET_DEFAULTS)}")
    return DATASET_DEFAULTS[name]


@dataclass
class ImageList:
    """One split: image paths and int64 labels in ``0..num_classes-1`` (remapped by the readers).

    ``class_ids`` holds the original class identifier of each label (``class_ids[label]``);
    ``dataset`` and ``split`` name the source, for messages and per-dataset defaults.
    """

    paths: List[str]
    labels: np.ndarray
    class_ids: List[str] = field(default_factory=list)
    dataset: Optional[str] = None
    split: Optional[str] = None

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.paths):
            raise ValueError(
                f"ImageList: labels must be 1-D with one entry per path; got shape {labels.shape} for {len(self.paths)} paths"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ImageList: labels must be integers, got dtype {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        self.class_ids = list(self.class_ids)
        if self.labels.size:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            limit = len(self.class_ids) if self.class_ids else hi + 1
            if lo < 0 or hi >= limit:
                raise ValueError(f"ImageList: labels must lie in 0..{limit - 1} (one per class id); got {lo}..{hi}")

    @property
    def num_classes(self) -> int:
        """Size of the label mapping: ``len(class_ids)`` when given, else ``max(label) + 1``.

        Splits that share a mapping (In-shop query and gallery) may each use only part of it."""
        if self.class_ids:
            return len(self.class_ids)
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def label_names(self) -> List[str]:
        """Each image's class as text: its ``class_ids`` entry, or the label number without them."""
        return [str(self.class_ids[c]) if self.class_ids else str(c) for c in self.labels.tolist()]

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageList(dataset={self.dataset!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"


@dataclass
class DatasetSplits:
    """The splits of one dataset. In-shop has ``query`` and ``gallery`` (sharing one label mapping)
    and ``test=None``; the other datasets have ``train`` and ``test``."""

    name: str
    root: str
    train: ImageList
    test: Optional[ImageList] = None
    query: Optional[ImageList] = None
    gallery: Optional[ImageList] = None

    def splits(self) -> Dict[str, ImageList]:
        """The non-empty splits by name."""
        return {k: v for k, v in (("train", self.train), ("test", self.test), ("query", self.query), ("gallery", self.gallery)) if v is not None}


def remap_labels(class_ids: Sequence) -> Tuple[np.ndarray, list]:
    """Map arbitrary class identifiers to ``0..K-1`` in sorted order; returns (labels, sorted unique ids)."""
    uniq = sorted(set(class_ids))
    index = {c: i for i, c in enumerate(uniq)}
    return np.fromiter((index[c] for c in class_ids), dtype=np.int64, count=len(class_ids)), uniq


def layout_error(dataset: str, missing: Path, layout: str, source: str) -> DatasetLayoutError:
    """The error for a missing dataset file or folder: names it, the expected layout and the source."""
    return DatasetLayoutError(
        f"{dataset}: missing {'folder' if not missing.suffix else 'file'} {missing}\n"
        f"expected layout:\n{layout}\n"
        f"the dataset is published at {source}"
    )


def require(dataset: str, paths: Iterable[Path], layout: str, source: str) -> None:
    """Raise ``DatasetLayoutError`` for the first of ``paths`` that does not exist."""
    for p in paths:
        if not p.exists():
            raise layout_error(dataset, p, layout, source)


def require_listed_images(dataset: str, paths: Sequence[str], layout: str, source: str) -> None:
    """All images named by an index file must exist; the error counts the missing ones and names the first."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        err = layout_error(dataset, Path(missing[0]), layout, source)
        err.args = (f"{err.args[0]}\n({len(missing)} of {len(paths)} listed images are missing)",)
        raise err


@dataclass
class FolderImages:
    """The images below one folder, grouped by its top-level sub-folders (:func:`image_folders`)."""

    classes: Dict[str, List[str]]  #: sub-folder name -> image paths below it (sorted by folder, then name); none empty
    loose: List[str]  #: images directly in the folder, sorted


def _is_image_name(name: str) -> bool:
    return not name.startswith("._") and name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_key(path) -> Optional[Tuple[int, int]]:
    """``(device, inode)`` of the real directory ``path`` leads to; ``None`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def image_folders(*tops, reserved: Sequence = (), skip_hidden: bool = True) -> List[FolderImages]:
    """The images below each of ``tops``, grouped by top-level sub-folder (one :class:`FolderImages` per top).

    Symbolic links are followed, but no real directory is entered twice: each top, its sub-folders
    and the folders in ``reserved`` (e.g. the dataset root above the tops) count as visited before the
    walk starts, so a link back into them (``ln -s .. loop``, a link to another class) or a second
    link to a folder already read is skipped, with one warning naming the skipped links. Files whose
    names start with ``._`` or lack an image extension are ignored; with ``skip_hidden`` so are
    folders whose names start with ``.``."""
    if not isinstance(skip_hidden, bool):
        raise ValueError(f"image_folders: skip_hidden must be a bool, got {skip_hidden!r}")
    visited = {key for key in map(_folder_key, reserved) if key is not None}
    listings = []
    for top in tops:
        top = Path(top)
        if not top.is_dir():
            raise ValueError(f"image_folders: no such folder {top}")
        visited.add(_folder_key(top))
        entries = sorted(os.scandir(top), key=lambda e: e.name)
        folders = [e for e in entries if e.is_dir() and not (skip_hidden and e.name.startswith("."))]
        loose = [e.path for e in entries if not e.is_dir() and e.is_file() and _is_image_name(e.name)]
        listings.append((top, folders, loose))
    skipped: List[str] = []
    kept = []
    for top, folders, loose in listings:  # the sub-folders of every top are claimed before any walk
        mine = []
        for entry in folders:
            key = _folder_key(entry.path)
            if key is None or key in visited:
                skipped.append(entry.path)
            else:
                visited.add(key)
                mine.append(entry)
        kept.append((top, mine, loose))
    result = []
    for top, folders, loose in kept:
        classes = {}
        for entry in folders:
            files = _walk_images(entry.path, visited, skipped, skip_hidden)
            if files:
                classes[entry.name] = files
        result.append(FolderImages(classes, loose))
    if skipped:
        links = [f"{p} -> {os.readlink(p)}" if os.path.islink(p) else p for p in skipped]
        warnings.warn(f"skipped {len(skipped)} folder link(s) leading to a folder read already (a loop, or a second "
                      f"link to one folder), so that no image is read twice: {', '.join(links[:5])}"
                      + (f" and {len(links) - 5} more" if len(links) > 5 else ""), stacklevel=2)
    return result


def _walk_images(folder: str, visited: set, skipped: List[str], skip_hidden: bool) -> List[str]:
    """Image paths below ``folder`` (already claimed in ``visited``), sorted by folder then name;
    sub-folders whose real directory is in ``visited`` go to ``skipped``."""
    by_folder = {}
    pending = [folder]
    while pending:
        where = pending.pop()
        try:
            entries = sorted(os.scandir(where), key=lambda e: e.name)
        except OSError:
            continue
        by_folder[where] = [e.path for e in entries if not e.is_dir() and e.is_file() and _is_image_name(e.name)]
        children = []
        for entry in entries:
            if not entry.is_dir() or (skip_hidden and entry.name.startswith(".")):
                continue
            key = _folder_key(entry.path)
            if key is None or key in visited:
                skipped.append(entry.path)
                continue
            visited.add(key)
            children.append(entry.path)
        pending.extend(reversed(children))  # depth-first in name order, as os.walk
    return [p for where in sorted(by_folder) for p in by_folder[where]]


def image_problem(path: str) -> Optional[str]:
    """Why the image at ``path`` cannot be used, or ``None``: every image is decoded once.

    Checks, cheapest first: an empty or unreadable file; a JPEG without its end-of-image marker or a
    PNG without its IEND chunk (truncated); a header PIL cannot identify; a decompression bomb (more
    than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels claimed, about 89 million); then a full decode (JPEGs
    at 1/8 scale, which still reads every entropy-coded byte), so that an image with a corrupt middle
    is found here and not in a loader worker hours later. Costs about 1 ms of CPU per SOP-sized JPEG
    (``benchmarks/RESULTS.md``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 16))
            tail = f.read(16)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size == 0:
        return "empty file"
    if head[:3] == b"\xff\xd8\xff" and b"\xff\xd9" not in tail:  # trailing padding after EOI is legal
        return "truncated JPEG (no end-of-image marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    return (f"decompression bomb: its header claims {width} x {height} = {width * height:,} pixels "
                            f"(limit {Image.MAX_IMAGE_PIXELS:,})")
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        return f"decompression bomb: its header claims {pixels} (limit {Image.MAX_IMAGE_PIXELS:,})"
    except Exception as exc:  # PIL raises many types for broken files
        return f"not a decodable image ({type(exc).__name__}: {exc})"
    return None


def check_images(image_list: ImageList, strict: bool, remap: bool = True, num_threads: int = 8) -> ImageList:
    """Check every image of ``image_list``; corrupt ones are dropped with one warning naming them
    (their count and the first paths), or raise ``CorruptImageError`` when ``strict``.

    With ``remap`` the labels are remapped again if a class loses all its images; without it the
    label mapping is kept (for splits that share one mapping)."""
    from dmlfast.progress import progress_bar

    paths = image_list.paths
    desc = f"checking {image_list.dataset or ''} {image_list.split or ''} images".replace("  ", " ")
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        problems = list(progress_bar(pool.map(image_problem, paths, chunksize=256), enabled=len(paths) >= 5000, total=len(paths),
                                     desc=desc, leave=False))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if not bad:
        return image_list
    listing = "\n".join(f"  {p}: {why}" for p, why in bad[:10]) + ("\n  ..." if len(bad) > 10 else "")
    where = f"{image_list.dataset} {image_list.split}"
    if strict:
        raise CorruptImageError(f"{where}: {len(bad)} corrupt or truncated image(s) (strict=True):\n{listing}")
    warnings.warn(f"{where}: skipping {len(bad)} corrupt or truncated image(s):\n{listing}", stacklevel=3)
    keep = np.array([why is None for why in problems])
    kept_paths = [p for p, k in zip(paths, keep) if k]
    labels, class_ids = image_list.labels[keep], image_list.class_ids
    if remap:
        labels, used = remap_labels(labels.tolist())
        class_ids = [class_ids[i] for i in used] if class_ids else []
    return ImageList(kept_paths, labels, class_ids, image_list.dataset, image_list.split)


def warn_counts(dataset: str, found: Dict[str, ImageList], expected: Dict[str, Tuple[int, int]]) -> None:
    """Compare (images, classes) per split with the published numbers; one warning naming each difference."""
    diffs = []
    for split, (n_img, n_cls) in expected.items():
        lst = found.get(split)
        if lst is None:
            continue
        if len(lst) != n_img:
            diffs.append(f"{split}: {len(lst):,} images, published {n_img:,} ({len(lst) - n_img:+,})")
        if n_cls is not None and lst.num_classes != n_cls:
            diffs.append(f"{split}: {lst.num_classes:,} classes, published {n_cls:,} ({lst.num_classes - n_cls:+,})")
    if diffs:
        warnings.warn(f"{dataset}: counts differ from the published dataset: " + "; ".join(diffs), stacklevel=3)
