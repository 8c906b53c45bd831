"""Readers of the real metric-learning datasets: each turns a root folder into ``DatasetSplits``.

Every reader first checks the layout (a missing file or folder raises ``DatasetLayoutError`` naming
it, the expected layout and where the dataset is published), then builds the split lists with labels
remapped to ``0..K-1`` per split, checks the images (``check_images``) and compares the counts with
the published numbers (a difference is a warning).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ._common import (
    DatasetLayoutError,
    DatasetSplits,
    ImageList,
    check_images,
    image_folders,
    remap_labels,
    require,
    require_listed_images,
    warn_counts,
)

# ---------------------------------------------------------------------------------------- CUB

CUB_LAYOUT = """  <root>/CUB_200_2011/images/001.Black_footed_Albatross/*.jpg ... 200.Common_Yellowthroat/*.jpg
  (or <root> = the CUB_200_2011 folder itself); 200 class folders, classes 1-100 train, 101-200 test"""
CUB_SOURCE = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)"
CUB_COUNTS = {"train": (5864, 100), "test": (5924, 100)}


def _image_folder(images: Path) -> Tuple[List[str], List[str], List[int]]:
    """torchvision ImageFolder semantics: sorted class folders, sorted image files, ``._*`` dropped
    (no folder read twice through a link: :func:`image_folders`)."""
    (found,) = image_folders(images, skip_hidden=False)
    classes = sorted(d.name for d in os.scandir(images) if d.is_dir())
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        for path in found.classes.get(cls, []):
            paths.append(path)
            labels.append(idx)
    return classes, paths, labels


def read_cub(root, strict: bool = False) -> DatasetSplits:
    """CUB-200-2011: ImageFolder over ``images/``; class indices 0-99 train, 100-199 test."""
    root = Path(root)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    images = base / "images"
    require("CUB", [images], CUB_LAYOUT, CUB_SOURCE)
    classes, paths, labels = _image_folder(images)
    if len(classes) != 200:
        raise DatasetLayoutError(
            f"CUB: expected 200 class folders in {images}, found {len(classes)}\nexpected layout:\n{CUB_LAYOUT}\n"
            f"the dataset is published at {CUB_SOURCE}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    out = {}
    for split, sel in (("train", labels < 100), ("test", labels >= 100)):
        idx = np.flatnonzero(sel)
        lab, used = remap_labels(labels[idx].tolist())
        lst = ImageList([paths[i] for i in idx], lab, [classes[c] for c in used], "CUB", split)
        out[split] = check_images(lst, strict)
    warn_counts("CUB", out, CUB_COUNTS)
    return DatasetSplits("CUB", str(base), out["train"], test=out["test"])


# ------------------------------------------------------------------------------------ Cars196

CARS_LAYOUT = """  <root>/cars_annos.mat   (annotations: relative_im_path, bbox_*, class 1..196, test)
  <root>/car_ims/000001.jpg ... 016185.jpg
  classes 1-98 train, 99-196 test"""
CARS_SOURCE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz and cars_annos.mat)"
CARS_COUNTS = {"train": (8054, 98), "test": (8131, 98)}


def read_cars196(root, strict: bool = False) -> DatasetSplits:
    """Cars196: ``cars_annos.mat``; label = class - 1; classes 0-97 train, 98-195 test."""
    from scipy.io import loadmat

    root = Path(root)
    mat = root / "cars_annos.mat"
    require("Cars196", [mat, root / "car_ims"], CARS_LAYOUT, CARS_SOURCE)
    try:
        annos = loadmat(str(mat), squeeze_me=True)["annotations"]
        rel = [str(p) for p in np.atleast_1d(annos["relative_im_path"])]
        cls = np.atleast_1d(annos["class"]).astype(np.int64) - 1
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetLayoutError(
            f"Cars196: {mat} has no 'annotations' struct with fields relative_im_path and class ({exc})\n"
            f"expected layout:\n{CARS_LAYOUT}\nthe dataset is published at {CARS_SOURCE}"
        ) from exc
    if cls.size and (cls.min() < 0 or cls.max() > 195):
        raise DatasetLayoutError(f"Cars196: {mat}: class values must be 1..196, found {cls.min() + 1}..{cls.max() + 1}")
    paths = [str(root / p) for p in rel]
    require_listed_images("Cars196", paths, CARS_LAYOUT, CARS_SOURCE)
    out = {}
    for split, sel in (("train", cls < 98), ("test", cls >= 98)):
        idx = np.flatnonzero(sel)
        lab, used = remap_labels(cls[idx].tolist())
        lst = ImageList([paths[i] for i in idx], lab, [str(c + 1) for c in used], "Cars196", split)
        out[split] = check_images(lst, strict)
    warn_counts("Cars196", out, CARS_COUNTS)
    return DatasetSplits("Cars196", str(root), out["train"], test=out["test"])


# ---------------------------------------------------------------------------------------- SOP

SOP_LAYOUT = """  <root>/Ebay_train.txt, <root>/Ebay_test.txt
      header line "image_id class_id super_class_id path", then e.g. "1 1 1 bicycle_final/111085122871_0.JPG"
  <root>/bicycle_final/*.JPG ... toaster_final/*.JPG"""
SOP_SOURCE = "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)"
SOP_COUNTS = {"train": (59551, 11318), "test": (60502, 11316)}


def _read_table(path: Path, columns: int, header_lines: int, dataset: str) -> List[List[str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= header_lines or not line.strip():
                continue
            parts = line.split()
            if len(parts) != columns:
                raise DatasetLayoutError(f"{dataset}: {path}:{lineno}: expected {columns} whitespace-separated columns, got {len(parts)}: {line.strip()!r}")
            rows.append(parts)
    return rows


def read_sop(root, strict: bool = False) -> DatasetSplits:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (header skipped), label = class_id - 1 remapped per split."""
    root = Path(root)
    files = {"train": root / "Ebay_train.txt", "test": root / "Ebay_test.txt"}
    require("SOP", files.values(), SOP_LAYOUT, SOP_SOURCE)
    out = {}
    for split, f in files.items():
        rows = _read_table(f, 4, 1, "SOP")
        paths = [str(root / r[3]) for r in rows]
        require_listed_images("SOP", paths, SOP_LAYOUT, SOP_SOURCE)
        lab, used = remap_labels([int(r[1]) - 1 for r in rows])
        out[split] = check_images(ImageList(paths, lab, [str(c + 1) for c in used], "SOP", split), strict)
    warn_counts("SOP", out, SOP_COUNTS)
    return DatasetSplits("SOP", str(root), out["train"], test=out["test"])


# ------------------------------------------------------------------------------------ In-shop

INSHOP_LAYOUT = """  <root>/Eval/list_eval_partition.txt
      line 1: image count; line 2: "image_name item_id evaluation_status";
      then e.g. "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train" (status train/query/gallery)
  <root>/img/WOMEN/..., <root>/img/MEN/..."""
INSHOP_SOURCE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (In-shop Clothes Retrieval Benchmark)"
INSHOP_COUNTS = {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)}


def read_inshop(root, strict: bool = False) -> DatasetSplits:
    """In-shop: train / query / gallery by status; train labels and query∪gallery labels remapped separately."""
    root = Path(root)
    part = root / "Eval" / "list_eval_partition.txt"
    require("In-shop", [part, root / "img"], INSHOP_LAYOUT, INSHOP_SOURCE)
    rows = _read_table(part, 3, 2, "In-shop")
    bad = sorted({r[2] for r in rows} - {"train", "query", "gallery"})
    if bad:
        raise DatasetLayoutError(f"In-shop: {part}: evaluation_status must be train, query or gallery; found {bad}")
    paths = [str(root / r[0]) for r in rows]
    require_listed_images("In-shop", paths, INSHOP_LAYOUT, INSHOP_SOURCE)
    train = [i for i, r in enumerate(rows) if r[2] == "train"]
    lab, used = remap_labels([rows[i][1] for i in train])
    out = {"train": ImageList([paths[i] for i in train], lab, used, "In-shop", "train")}
    evals = [i for i, r in enumerate(rows) if r[2] != "train"]
    lab, used = remap_labels([rows[i][1] for i in evals])  # one mapping shared by query and gallery
    status = np.array([rows[i][2] for i in evals])
    for split in ("query", "gallery"):
        sel = np.flatnonzero(status == split)
        out[split] = ImageList([paths[evals[i]] for i in sel], lab[sel], used, "In-shop", split)
    out = {k: check_images(v, strict, remap=k == "train") for k, v in out.items()}
    warn_counts("In-shop", out, INSHOP_COUNTS)
    return DatasetSplits("In-shop", str(root), out["train"], query=out["query"], gallery=out["gallery"])


# ----------------------------------------------------------------------------------- Omniglot

OMNIGLOT_LAYOUT = """  <root>/images_background/<alphabet>/<character>/*.png   (train characters)
  <root>/images_evaluation/<alphabet>/<character>/*.png   (test characters)
  or only partial background sets, e.g. <root>/images_background_small1/..., images_background_small2/...
  (their characters are pooled, duplicates merged, and split into disjoint halves)"""
OMNIGLOT_SOURCE = "https://github.com/brendenlake/omniglot (python/images_background.zip, images_evaluation.zip)"
OMNIGLOT_COUNTS = {"train": (19280, 964), "test": (13180, 659)}


def _characters(folder: Path) -> Dict[str, List[str]]:
    """``{"<alphabet>/<character>": sorted png paths}`` of one Omniglot set folder."""
    chars = {}
    for alphabet in sorted(d.name for d in os.scandir(folder) if d.is_dir()):
        for char in sorted(d.name for d in os.scandir(folder / alphabet) if d.is_dir()):
            files = sorted(f for f in os.listdir(folder / alphabet / char) if f.lower().endswith(".png") and not f.startswith("._"))
            if files:
                chars[f"{alphabet}/{char}"] = [str(folder / alphabet / char / f) for f in files]
    return chars


def _omniglot_list(chars: Dict[str, List[str]], keys: List[str], split: str) -> ImageList:
    keys = sorted(keys)
    paths = [p for k in keys for p in chars[k]]
    labels = np.repeat(np.arange(len(keys), dtype=np.int64), [len(chars[k]) for k in keys])
    return ImageList(paths, labels, keys, "Omniglot", split)


def read_omniglot(root, strict: bool = False) -> DatasetSplits:
    """Omniglot, characters as classes (``<alphabet>/<character>`` ids).

    The official layout (``images_background`` + ``images_evaluation``) gives train and test. When
    only other ``images_background*`` folders exist (e.g. the "small" sets), their characters are
    pooled (a character present in two sets with the same drawings counts once) and split into
    disjoint train/test halves by a fixed-seed permutation."""
    root = Path(root)
    background, evaluation = root / "images_background", root / "images_evaluation"
    if background.is_dir() or evaluation.is_dir():
        require("Omniglot", [background, evaluation], OMNIGLOT_LAYOUT, OMNIGLOT_SOURCE)
        train, test = _characters(background), _characters(evaluation)
        overlap = sorted(set(train) & set(test))
        if overlap:
            raise DatasetLayoutError(f"Omniglot: characters {overlap[:5]} are in both {background} and {evaluation}; train and test must be disjoint")
        out = {"train": _omniglot_list(train, list(train), "train"), "test": _omniglot_list(test, list(test), "test")}
        out = {k: check_images(v, strict) for k, v in out.items()}
        warn_counts("Omniglot", out, OMNIGLOT_COUNTS)
        return DatasetSplits("Omniglot", str(root), out["train"], test=out["test"])
    sets = sorted(d for d in root.glob("images_background*") if d.is_dir()) if root.is_dir() else []
    if not sets:
        require("Omniglot", [background], OMNIGLOT_LAYOUT, OMNIGLOT_SOURCE)
    chars: Dict[str, List[str]] = {}
    for folder in sets:
        for key, files in _characters(folder).items():
            if key in chars:
                if sorted(map(os.path.basename, chars[key])) != sorted(map(os.path.basename, files)):
                    raise DatasetLayoutError(f"Omniglot: character {key} differs between {chars[key][0]} and {files[0]}")
                continue
            chars[key] = files
    if len(chars) < 2:
        raise DatasetLayoutError(f"Omniglot: found {len(chars)} character folders under {', '.join(map(str, sets))}; need at least 2 to split")
    keys = sorted(chars)
    random.Random(0).shuffle(keys)
    half = len(keys) // 2
    out = {"train": _omniglot_list(chars, keys[:half], "train"), "test": _omniglot_list(chars, keys[half:], "test")}
    out = {k: check_images(v, strict) for k, v in out.items()}
    return DatasetSplits("Omniglot", str(root), out["train"], test=out["test"])
