"""``python -m dmlfast.retrieve``: what a trained model retrieves for one query image, as a PNG grid.

::

    python -m dmlfast.retrieve --checkpoint runs/train/best.pt --query photo.jpg --gallery ~/catalogue --top 8 --out grid.png
    python -m dmlfast.retrieve --checkpoint runs/train/best.pt --query photo.jpg --dataset CUB --data-root ~/data/CUB

The gallery is ``--gallery DIR`` (every image below DIR; an image inside a sub-folder is labelled
with the name of its top-level sub-folder, one directly in DIR has no label) or a split of a dataset
(``--dataset``/``--data-root``/``--list``/``--test-classes`` as in ``python -m dmlfast.evaluate``;
default: the checkpoint's dataset; ``--split``: its held-out split, ``test`` or In-shop's
``gallery``). The gallery is embedded once with the checkpoint's evaluation transform and cached
next to the checkpoint (``<checkpoint stem>.gallery-<key>.pt``, the key a SHA-256 of the checkpoint's
bytes, the gallery's ordered file list with sizes and modification times, the transform and the
autocast dtype); the top ``--top`` images by cosine similarity come from the k-NN backends of
``dmlfast.evaluation``. The ranked list is printed and the grid written: the query, then the results
in up to ``GRID_COLUMNS`` columns, each cell ``CELL_WIDTH`` x ``CELL_HEIGHT`` px (a ``TILE`` px image in
a ``FRAME`` px frame, two caption lines: rank and similarity, label). When the query's label is known
(``--query-label``, or the query is a gallery image) results of that label are framed green and
the others red; unlabelled results grey; the query blue. Works on the CPU. Input errors print one
``python -m dmlfast.retrieve: error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from dmlfast._cli import InputError, run_command

PROG = "python -m dmlfast.retrieve"
TILE = 160
FRAME = 6
CAPTION = 40
GRID_COLUMNS = 8
CELL_WIDTH = TILE + 2 * FRAME
CELL_HEIGHT = TILE + 2 * FRAME + CAPTION
COLOURS = {"query": (40, 90, 220), "correct": (20, 170, 60), "wrong": (210, 40, 40), "unknown": (170, 170, 170)}


def grid_size(k: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the grid for ``k`` results."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"grid_size: k must be an int >= 1, got {k!r}")
    return CELL_WIDTH * (1 + min(k, GRID_COLUMNS)), CELL_HEIGHT * math.ceil(k / GRID_COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    from dmlfast.evaluate import add_custom_data_arguments

    p = argparse.ArgumentParser(prog=PROG, description="Show the images a trained model retrieves for a query image (PNG grid + ranked list).")
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt/last.pt of python -m dmlfast.train")
    p.add_argument("--query", type=Path, required=True, help="the query image")
    p.add_argument("--query-label", help="the query's label, to frame correct results green (default: its gallery label, if it is a gallery image)")
    g = p.add_argument_group("gallery (--gallery DIR, or a dataset split; default: the checkpoint's dataset)")
    g.add_argument("--gallery", type=Path, metavar="DIR", help="every image below DIR (labels: top-level sub-folder names)")
    g.add_argument("--dataset", help="dataset whose --split is the gallery (default: the checkpoint's)")
    g.add_argument("--data-root", type=Path, help="the dataset's folder (default: the checkpoint's)")
    add_custom_data_arguments(g)
    g.add_argument("--split", choices=("train", "test", "query", "gallery"), help="the dataset's split to search (default: test, In-shop gallery)")
    p.add_argument("--top", type=int, default=8, metavar="K", help="results to show (default: 8)")
    p.add_argument("--out", type=Path, default=Path("retrieval.png"), help="PNG to write (default: retrieval.png)")
    p.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto", help="k-NN backend (default: auto)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2; 0 = main process)")
    p.add_argument("--no-cache", action="store_true", help="embed the gallery again and do not write the cache")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


# ------------------------------------------------------------------------------ shared with dmlfast.plot

def load_model(checkpoint: Path, device_name: Optional[str]):
    """``(model in eval mode on the device, its training config, device, autocast dtype or None)`` of a checkpoint.

    Raises ``InputError`` for a missing or foreign checkpoint or an unusable device."""
    from dmlfast import train
    from dmlfast.training import CheckpointError, load_checkpoint

    if not isinstance(checkpoint, (str, Path)):
        raise ValueError(f"load_model: checkpoint must be a path, got {type(checkpoint).__name__}")
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise InputError(f"--checkpoint: {error}") from error
    config = dict(state["config"], weights="none")
    device = train.resolve_device(device_name)
    model = train.restore_model(config, state["model"], device).eval()
    return model, config, device, train.amp_dtype(config["amp"], device)


def embed_list(model, image_list, config, device, dtype, *, batch_size: int, workers: int, progress: bool, desc: str):
    """float32 L2-normalised CPU embeddings of every image of ``image_list``, in order, with the
    checkpoint's evaluation transform (torchvision loader)."""
    import torch

    from dmlfast import train
    from dmlfast.data import make_loader
    from dmlfast.models import NORMALIZATION

    if len(image_list) == 0:
        raise ValueError(f"embed_list: image_list is empty ({image_list!r})")
    kw = dict(train=False, batch_size=batch_size, device=device, loader="torch", image_size=config["image_size"],
              normalization=NORMALIZATION[config["model"]], num_workers=workers)
    if config["image_size"] is not None and config.get("resize_size") is not None:
        kw["resize_size"] = config["resize_size"]
    embeddings, _ = train.embed(model, make_loader(image_list, **kw), device, dtype, progress, desc)
    return torch.nn.functional.normalize(embeddings.float(), dim=1).cpu()


def dataset_split(config, args, split: Optional[str]):
    """The ``ImageList`` of ``split`` (default: the held-out one) of the dataset the arguments name."""
    from dmlfast import train
    from dmlfast.evaluate import apply_dataset_arguments

    data_config = apply_dataset_arguments(config, args)
    splits = train.load_splits(data_config)
    available = splits.splits()
    name = split or ("test" if "test" in available else "gallery")
    if name not in available:
        raise InputError(f"--split: {data_config['dataset']} has no {name} split; it has {', '.join(available)}")
    return available[name], data_config


# ------------------------------------------------------------------------------------------ gallery

def gallery_from_folder(folder: Path):
    """``(ImageList, labels)``: the readable images below ``folder`` in sorted order; the label of an
    image is its top-level sub-folder's name (``None`` directly in ``folder``)."""
    import numpy as np

    from dmlfast.data import ImageList
    from dmlfast.data._common import IMAGE_EXTENSIONS, check_images

    if not isinstance(folder, (str, Path)):
        raise ValueError(f"gallery_from_folder: folder must be a path, got {type(folder).__name__}")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--gallery: no such folder: {folder}")
    paths = []
    for where, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths.extend(os.path.join(where, f) for f in sorted(files) if not f.startswith("._") and f.lower().endswith(IMAGE_EXTENSIONS))
    paths.sort()
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


def gallery_embeddings(model, image_list, config, device, dtype, args) -> Tuple["torch.Tensor", Optional[Path], bool]:
    """``(embeddings, cache file or None, loaded from the cache?)``."""
    import torch

    cache = None
    if not args.no_cache:
        key = cache_key(args.checkpoint, image_list.paths, config, dtype)
        cache = args.checkpoint.parent / f"{args.checkpoint.stem}.gallery-{key[:16]}.pt"
        if cache.is_file():
            try:
                saved = torch.load(cache, map_location="cpu", weights_only=True)
                if saved.get("key") == key and saved.get("paths") == list(image_list.paths):
                    return saved["embeddings"], cache, True
            except Exception as error:  # an unreadable cache is rebuilt, not fatal
                warnings.warn(f"ignoring unreadable gallery cache {cache} ({type(error).__name__}: {error})", stacklevel=2)
    embeddings = embed_list(model, image_list, config, device, dtype, batch_size=args.batch_size, workers=args.workers,
                            progress=args.progress, desc="embed gallery")
    if cache is not None:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "paths": list(image_list.paths), "embeddings": embeddings}, f)
            os.replace(tmp, cache)
        except OSError as error:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            warnings.warn(f"could not write the gallery cache next to the checkpoint ({error}); the gallery will be embedded again next time", stacklevel=2)
            cache = None
    return embeddings, cache, False


# --------------------------------------------------------------------------------------------- grid

def _fitted(path: str):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")
        im = ImageOps.contain(im, (TILE, TILE))
    tile = Image.new("RGB", (TILE, TILE), "white")
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    return tile


def _shorten(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_grid(query_path: str, query_label: Optional[str], results: Sequence[Tuple[str, Optional[str], float]], out: Path) -> Tuple[int, int]:
    """Write the PNG: the query cell, then one cell per ``(path, label, similarity)``; returns its size."""
    from PIL import Image, ImageDraw, ImageFont

    if not results or any(len(r) != 3 for r in results):
        raise ValueError(f"draw_grid: results must be a non-empty list of (path, label, similarity), got {list(results)[:2]!r}")
    if not Path(query_path).is_file():
        raise ValueError(f"draw_grid: query_path must be an existing image file, got {query_path!r}")
    width, height = grid_size(len(results))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)

    def cell(x, y, path, colour, line1, line2):
        draw.rectangle([x, y, x + CELL_WIDTH - 1, y + TILE + 2 * FRAME - 1], fill=colour)
        canvas.paste(_fitted(path), (x + FRAME, y + FRAME))
        for i, text in enumerate((line1, line2)):
            draw.text((x + FRAME, y + TILE + 2 * FRAME + 2 + 18 * i), _shorten(draw, text, font, CELL_WIDTH - 2 * FRAME), fill="black", font=font)

    cell(0, 0, query_path, COLOURS["query"], "query", "" if query_label is None else str(query_label))
    for rank, (path, label, similarity) in enumerate(results):
        row, col = divmod(rank, GRID_COLUMNS)
        if query_label is None or label is None:
            colour = COLOURS["unknown"]
        else:
            colour = COLOURS["correct" if label == query_label else "wrong"]
        cell(CELL_WIDTH * (1 + col), CELL_HEIGHT * row, path, colour, f"#{rank + 1}  sim {similarity:.3f}", "" if label is None else str(label))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return width, height


# --------------------------------------------------------------------------------------------- main

def retrieve(args: argparse.Namespace) -> List[Tuple[str, Optional[str], float]]:
    """Embed, search, print the ranked list and write the grid; returns ``[(path, label, similarity)]`` best first."""
    import numpy as np
    import torch

    from dmlfast.data import ImageList
    from dmlfast.data._common import _image_problem
    from dmlfast.evaluation.knn import default_chunk_size, resolve_backend, search

    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    if args.gallery is not None and any(v is not None for v in (args.dataset, args.data_root, args.list, args.test_classes, args.split)):
        raise InputError("--gallery DIR cannot be combined with --dataset/--data-root/--list/--test-classes/--split")
    if not args.query.is_file():
        raise InputError(f"--query: no such file: {args.query}")
    problem = _image_problem(str(args.query))
    if problem is not None:
        raise InputError(f"--query: {args.query}: {problem}")
    model, config, device, dtype = load_model(args.checkpoint, args.device)

    if args.gallery is not None:
        gallery, labels = gallery_from_folder(args.gallery)
        gallery = ImageList(gallery.paths, gallery.labels, gallery.class_ids, config["dataset"], "gallery")
    else:
        gallery, data_config = dataset_split(config, args, args.split)
        labels = [str(gallery.class_ids[c]) if gallery.class_ids else str(c) for c in gallery.labels.tolist()]
        gallery = ImageList(gallery.paths, gallery.labels, gallery.class_ids, config["dataset"], gallery.split)
    k = args.top
    if k > len(gallery):
        raise InputError(f"--top {k} is more than the gallery's {len(gallery)} images")

    reference, cache, cached = gallery_embeddings(model, gallery, config, device, dtype, args)
    query_list = ImageList([str(args.query)], np.zeros(1, dtype=np.int64), ["-"], config["dataset"], "query")
    query = embed_list(model, query_list, config, device, dtype, batch_size=1, workers=0, progress=False, desc="embed query")
    try:
        backend = resolve_backend(args.backend, query.device, k)
    except ValueError as error:
        raise InputError(f"--backend: {error}") from error
    ((_, similarities, indices),) = list(search(query, reference.to(query.dtype), k, backend, default_chunk_size(len(reference)), progress=False))
    similarities, indices = similarities[0].tolist(), indices[0].tolist()

    query_label = args.query_label
    if query_label is None:
        where = {os.path.realpath(p): i for i, p in enumerate(gallery.paths)}
        own = where.get(os.path.realpath(args.query))
        query_label = None if own is None else labels[own]
    results = [(gallery.paths[i], labels[i], float(s)) for i, s in zip(indices, similarities)]
    try:
        width, height = draw_grid(str(args.query), query_label, results, args.out)
    except OSError as error:
        raise InputError(f"--out: cannot write {args.out} ({error.strerror or error})") from error

    source = f"{len(gallery)} images " + ("cached in" if cached else "embedded" + (", cached in" if cache else "")) + (f" {cache}" if cache else "")
    print(f"gallery: {source}; k-NN backend {backend}, device {device}")
    print(f"query: {args.query}" + ("" if query_label is None else f" (label {query_label})"))
    print(f"{'rank':>4}  {'similarity':>10}  {'':1}  {'label':<20}  path")
    for rank, (path, label, similarity) in enumerate(results, 1):
        mark = " " if query_label is None or label is None else ("+" if label == query_label else "-")
        print(f"{rank:>4}  {similarity:>10.4f}  {mark}  {'' if label is None else label:<20}  {path}")
    print(f"wrote {args.out} ({width} x {height} px)")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, retrieve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
