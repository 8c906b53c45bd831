"""Readers of the user's own data: an image folder per class (``folder``) or a CSV list (``csv``).

``folder`` (``read_folder``)
    ``<root>/<class>/<image>`` (images may sit in sub-folders of a class folder; links are followed,
    but no folder is read twice, see :func:`dmlfast.data.image_folders`): the classes are
    split into disjoint train and test classes, ``test_classes`` of them (an int N, or a fraction in
    (0, 1) of the classes, rounded, at least 1 and at most K - 1) held out, chosen by a permutation of
    the sorted class names seeded with ``seed``. Or, when the user has split already,
    ``<root>/train/<class>/...`` and ``<root>/test/<class>/...`` (``test_classes`` must then be
    ``None``; a class name in both splits is a warning, the evaluation then measures seen classes).

``csv`` (``read_csv_list``)
    ``list_file``: rows ``path,label[,split]`` (an optional header row ``path,label[,split]``); paths
    relative to ``root``; ``split`` one of ``train``, ``test``, ``query``, ``gallery`` (train + test, or
    train + query + gallery, the latter two sharing one label mapping as In-shop's). Without a split
    column the classes are split as for ``folder`` (``test_classes``, ``seed``). ``list_file`` is read
    as given, or relative to ``root`` when it is not a file as given.

Checks, as the standard readers: malformed rows are an error naming the file, the line numbers and
what is wrong (the first few, and how many), a path leading outside ``root`` (``../``) and one file
listed twice (``a.png`` and ``./a.png``, or through a link) included; listed images that do not exist are an error naming the
first few and the count; unreadable images are skipped with a warning naming each path
(``CorruptImageError`` when ``strict``); classes of an evaluation split with a single image are a
warning naming them (such an image has nothing to retrieve). Each split's labels are remapped to
``0..K-1``; ``class_ids`` holds the folder names / CSV labels.
"""
from __future__ import annotations

import csv
import os
import warnings
from numbers import Integral, Real
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._common import DatasetLayoutError, DatasetSplits, ImageList, check_images, image_folders, remap_labels

CUSTOM_DATASETS = ("folder", "csv")
CSV_SPLITS = ("train", "test", "query", "gallery")
#: How many offending rows / missing files an error lists before "... and N more".
SHOWN = 5

FOLDER_LAYOUT = "<root>/<class>/<image> (with --test-classes N|FRACTION), or <root>/train/<class>/... and <root>/test/<class>/..."
CSV_LAYOUT = "rows path,label[,split] (optional header row), paths relative to --data-root, split train|test|query|gallery"

TestClasses = Optional[Union[int, float]]


def parse_test_classes(text: str) -> Union[int, float]:
    """``"50"`` -> 50 classes; ``"0.5"`` -> half the classes (command-line form of ``test_classes``)."""
    if not isinstance(text, str):
        raise ValueError(f"parse_test_classes: text must be a str, got {type(text).__name__}")
    try:
        value: Union[int, float] = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number of classes N >= 1 or a fraction in (0, 1), got {text!r}") from None
    _check_test_classes(value, "test_classes")
    return value


def _check_test_classes(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be an int N >= 1 or a float fraction in (0, 1), got {value!r}")
    if isinstance(value, Integral):
        if value < 1:
            raise ValueError(f"{name} must be a number of classes >= 1 or a fraction in (0, 1), got {value!r}")
    elif not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number of classes >= 1 or a fraction in (0, 1), got {value!r}")


def split_classes(class_names: Sequence[str], test_classes: Union[int, float], seed: int) -> Tuple[List[str], List[str]]:
    """Disjoint ``(train classes, test classes)``, both sorted: ``test_classes`` (N, or a fraction of
    the classes, rounded and kept in 1..K-1) drawn by a permutation seeded with ``seed``."""
    names = sorted(set(class_names))
    _check_test_classes(test_classes, "test_classes")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"split_classes: seed must be an int, got {seed!r}")
    if len(names) < 2:
        raise ValueError(f"split_classes: need at least 2 classes to hold some out, got {len(names)}")
    if isinstance(test_classes, Integral):
        n_test = int(test_classes)
        if n_test >= len(names):
            raise ValueError(f"test_classes={n_test} leaves no training class: there are {len(names)} classes")
    else:
        n_test = min(max(1, round(float(test_classes) * len(names))), len(names) - 1)
    order = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), 0xC1A55])).permutation(len(names))
    test = sorted(names[i] for i in order[:n_test])
    held = set(test)
    return [n for n in names if n not in held], test


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _require_files(dataset: str, paths: Sequence[str], where: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetLayoutError(f"{dataset}: {len(missing)} of {len(paths)} images listed in {where} are missing: {_listing(missing)}")


def _warn_single_image_classes(lst: ImageList, reference: Optional[ImageList] = None) -> None:
    """Warn about the classes of ``lst`` that have no other image to retrieve (in ``lst`` itself, or in ``reference``)."""
    if len(lst) == 0:
        return
    if reference is None:
        counts = np.bincount(lst.labels, minlength=lst.num_classes)
        lonely = [lst.class_ids[c] for c in np.flatnonzero(counts == 1)]
        why = "have a single image and cannot be queried (nothing of their class to retrieve)"
    else:
        present = set(reference.labels.tolist())
        lonely = [lst.class_ids[c] for c in sorted(set(lst.labels.tolist()) - present)]
        why = f"have no image in the {reference.split} split and cannot be queried"
    if lonely:
        warnings.warn(f"{lst.dataset} {lst.split}: {len(lonely)} class(es) {why}: {_listing([str(c) for c in lonely])}", stacklevel=3)


def _image_list(paths: List[str], names: List[str], dataset: str, split: str) -> ImageList:
    labels, ids = remap_labels(names)
    return ImageList(paths, labels, ids, dataset, split)


def _finish(dataset: str, root: Path, lists: Dict[str, ImageList], strict: bool, shared: bool) -> DatasetSplits:
    """Check images, warn about unqueryable classes, and wrap the splits."""
    out = {k: check_images(v, strict, remap=not (shared and k in ("query", "gallery"))) for k, v in lists.items()}
    for k, v in out.items():
        if len(v) == 0:
            raise DatasetLayoutError(f"{dataset}: the {k} split has no readable image")
    if "test" in out:
        _warn_single_image_classes(out["test"])
    else:
        _warn_single_image_classes(out["query"], out["gallery"])
    return DatasetSplits(dataset, str(root), out["train"], test=out.get("test"), query=out.get("query"), gallery=out.get("gallery"))


def _from_classes(classes: Dict[str, List[str]], keys: Sequence[str], dataset: str, split: str) -> ImageList:
    paths = [p for k in keys for p in classes[k]]
    names = [k for k in keys for _ in classes[k]]
    return _image_list(paths, names, dataset, split)


def read_folder(root, strict: bool = False, test_classes: TestClasses = None, seed: int = 0) -> DatasetSplits:
    """One sub-folder per class under ``root`` (see the module docstring for the split rules)."""
    if not isinstance(strict, bool):
        raise ValueError(f"read_folder: strict must be a bool, got {strict!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"folder: no such folder {root}; expected {FOLDER_LAYOUT}")
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    if presplit:
        if test_classes is not None:
            raise DatasetLayoutError(f"folder: {root} is split already (train/ and test/ folders); test_classes (--test-classes) does not apply")
        train, test = (f.classes for f in image_folders(root / "train", root / "test", reserved=[root]))
        for name, classes in (("train", train), ("test", test)):
            if not classes:
                raise DatasetLayoutError(f"folder: no class folder with images in {root / name}; expected {FOLDER_LAYOUT}")
        both = sorted(set(train) & set(test))
        if both:
            warnings.warn(f"folder: {len(both)} class(es) are in both {root / 'train'} and {root / 'test'} "
                          f"(the evaluation then measures classes seen in training): {_listing(both)}", stacklevel=2)
        lists = {"train": _from_classes(train, sorted(train), "folder", "train"),
                 "test": _from_classes(test, sorted(test), "folder", "test")}
        return _finish("folder", root, lists, strict, shared=False)
    if test_classes is None:
        raise DatasetLayoutError(f"folder: {root} has no train/ and test/ folders, so test_classes (--test-classes N|FRACTION) "
                                 "must say how many classes to hold out")
    _check_test_classes(test_classes, "test_classes")
    (found,) = image_folders(root)
    classes = found.classes
    if len(classes) < 2:
        raise DatasetLayoutError(f"folder: found {len(classes)} class folder(s) with images in {root}; need at least 2; expected {FOLDER_LAYOUT}")
    try:
        train_keys, test_keys = split_classes(list(classes), test_classes, seed)
    except ValueError as error:
        raise DatasetLayoutError(f"folder: {error}") from error
    lists = {"train": _from_classes(classes, train_keys, "folder", "train"),
             "test": _from_classes(classes, test_keys, "folder", "test")}
    return _finish("folder", root, lists, strict, shared=False)


def resolve_list_file(root, list_file) -> Path:
    """``list_file`` as given when it is a file, else relative to ``root``; ``DatasetLayoutError`` when neither exists."""
    given = Path(list_file)
    if given.is_file():
        return given
    if not given.is_absolute() and (Path(root) / given).is_file():
        return Path(root) / given
    raise DatasetLayoutError(f"csv: no such list file {list_file} (looked as given and under {root}); expected {CSV_LAYOUT}")


def _read_rows(path: Path) -> Tuple[List[Tuple[int, str, str, Optional[str]]], bool]:
    """``([(line, path, label, split or None)], has_split_column)``; malformed rows raise, listed with their line numbers."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            raw = [(i, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f), 1)]
    except UnicodeDecodeError as error:
        raise DatasetLayoutError(f"csv: {path} is not UTF-8 text ({error})") from error
    except csv.Error as error:
        raise DatasetLayoutError(f"csv: {path}: {error}") from error
    raw = [(i, r) for i, r in raw if any(r)]
    if raw and [c.lower() for c in raw[0][1][:2]] == ["path", "label"]:
        header = [c.lower() for c in raw[0][1]]
        if header not in (["path", "label"], ["path", "label", "split"]):
            raise DatasetLayoutError(f"csv: {path}:{raw[0][0]}: header must be path,label or path,label,split, got {','.join(raw[0][1])}")
        raw = raw[1:]
    if not raw:
        raise DatasetLayoutError(f"csv: {path} lists no images; expected {CSV_LAYOUT}")
    width = len(raw[0][1])
    bad, rows = [], []
    for line, r in raw:
        problem = None
        if len(r) not in (2, 3):
            problem = f"expected 2 or 3 columns (path,label[,split]), got {len(r)}"
        elif len(r) != width:
            problem = f"has {len(r)} columns where line {raw[0][0]} has {width}"
        elif not r[0]:
            problem = "empty path"
        elif os.path.isabs(r[0]):
            problem = f"path {r[0]!r} is absolute; paths are relative to the data root"
        elif _escapes(r[0]):
            problem = f"path {r[0]!r} leads outside the data root"
        elif not r[1]:
            problem = "empty label"
        elif len(r) == 3 and r[2] not in CSV_SPLITS:
            problem = f"split must be one of {'|'.join(CSV_SPLITS)}, got {r[2]!r}"
        if problem:
            bad.append(f"line {line}: {problem}")
        else:
            rows.append((line, r[0], r[1], r[2] if len(r) == 3 else None))
    if bad:
        raise DatasetLayoutError(f"csv: {path}: {len(bad)} bad row(s): {_listing(bad)}")
    seen: Dict[str, Tuple[int, str]] = {}
    dup = []
    for line, p, _, _ in rows:
        key = os.path.normpath(p)  # ./a.png, a.png and x/../a.png are one file
        if key in seen:
            first_line, first = seen[key]
            dup.append(f"line {line}: {p} (first on line {first_line})" if p == first else
                       f"line {line}: {p} ({first}, first on line {first_line})")
        seen.setdefault(key, (line, p))
    if dup:
        raise DatasetLayoutError(f"csv: {path}: {len(dup)} path(s) listed twice: {_listing(dup)}")
    return rows, width == 3


def _escapes(path: str) -> bool:
    """Whether the relative ``path`` climbs above the folder it is relative to (``../x``, ``a/../../x``)."""
    normal = os.path.normpath(path)
    return normal == os.pardir or normal.startswith(os.pardir + os.sep)


def _require_distinct_files(files: Sequence[str], rows, list_path: Path) -> None:
    """``DatasetLayoutError`` when two rows name one real file through a link (their paths differ)."""
    first: Dict[str, Tuple[int, str]] = {}
    aliases = []
    for file, (line, p, _, _) in zip(files, rows):
        real = os.path.realpath(file)
        if real in first:
            aliases.append(f"line {line}: {p} is {first[real][1]} (line {first[real][0]})")
        first.setdefault(real, (line, p))
    if aliases:
        raise DatasetLayoutError(f"csv: {list_path}: {len(aliases)} file(s) listed twice under other names: {_listing(aliases)}")


def read_csv_images(root, list_file, split: Optional[str] = None, strict: bool = False) -> ImageList:
    """Every image ``list_file`` lists under ``root``, in the file's order, or only the rows of ``split``
    (which needs the split column); labels remapped from the label column, kept as ``class_ids``.
    The rows and files are checked as :func:`read_csv_list` checks them; unreadable images are
    skipped with a warning."""
    if split is not None and split not in CSV_SPLITS:
        raise ValueError(f"read_csv_images: split must be one of {CSV_SPLITS} or None, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"csv: no such folder {root} (the root the listed paths are relative to)")
    path = resolve_list_file(root, list_file)
    rows, has_split = _read_rows(path)
    if split is not None:
        if not has_split:
            raise DatasetLayoutError(f"csv: {path} has no split column, so no {split} rows to choose")
        rows = [r for r in rows if r[3] == split]
        if not rows:
            raise DatasetLayoutError(f"csv: {path} has no {split} row")
    files = [str(root / p) for _, p, _, _ in rows]
    _require_files("csv", files, str(path))
    _require_distinct_files(files, rows, path)
    return check_images(_image_list(files, [r[2] for r in rows], "csv", split or "listed"), strict)


def read_csv_list(root, strict: bool = False, list_file=None, test_classes: TestClasses = None, seed: int = 0) -> DatasetSplits:
    """Images listed in ``list_file`` under ``root`` (see the module docstring for columns and splits)."""
    if not isinstance(strict, bool):
        raise ValueError(f"read_csv_list: strict must be a bool, got {strict!r}")
    if list_file is None:
        raise DatasetLayoutError("csv: needs list_file (--list FILE.csv), the CSV listing path,label[,split]")
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"csv: no such folder {root} (the root the listed paths are relative to)")
    path = resolve_list_file(root, list_file)
    rows, has_split = _read_rows(path)
    files = [str(root / p) for _, p, _, _ in rows]
    _require_files("csv", files, str(path))
    _require_distinct_files(files, rows, path)
    if has_split:
        if test_classes is not None:
            raise DatasetLayoutError(f"csv: {path} has a split column; test_classes (--test-classes) does not apply")
        used = {s for *_, s in rows}
        if used not in ({"train", "test"}, {"train", "query", "gallery"}):
            raise DatasetLayoutError(f"csv: {path}: the split column must hold train and test, or train, query and gallery; "
                                     f"found {', '.join(sorted(used))}")
        lists = {"train": _image_list([f for f, r in zip(files, rows) if r[3] == "train"],
                                      [r[2] for r in rows if r[3] == "train"], "csv", "train")}
        if "test" in used:
            lists["test"] = _image_list([f for f, r in zip(files, rows) if r[3] == "test"], [r[2] for r in rows if r[3] == "test"], "csv", "test")
        else:
            evals = [(f, r) for f, r in zip(files, rows) if r[3] != "train"]
            labels, ids = remap_labels([r[2] for _, r in evals])  # one mapping shared by query and gallery
            status = np.array([r[3] for _, r in evals])
            for split in ("query", "gallery"):
                sel = np.flatnonzero(status == split)
                lists[split] = ImageList([evals[i][0] for i in sel], labels[sel], ids, "csv", split)
        return _finish("csv", root, lists, strict, shared=True)
    if test_classes is None:
        raise DatasetLayoutError(f"csv: {path} has no split column, so test_classes (--test-classes N|FRACTION) must say how many classes to hold out")
    _check_test_classes(test_classes, "test_classes")
    try:
        train_keys, test_keys = split_classes([r[2] for r in rows], test_classes, seed)
    except ValueError as error:
        raise DatasetLayoutError(f"csv: {path}: {error}") from error
    held = set(test_keys)
    lists = {split: _image_list([f for f, r in zip(files, rows) if (r[2] in held) == (split == "test")],
                                [r[2] for r in rows if (r[2] in held) == (split == "test")], "csv", split)
             for split in ("train", "test")}
    return _finish("csv", root, lists, strict, shared=False)
