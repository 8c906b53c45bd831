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
the others red; unlabelled results grey; the query blue. A query that is itself a gallery image is
left out of its results. Works on the CPU. Input errors print one
``python -m dmlfast.retrieve: error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from dmlfast._cli import (InputError, Parser, add_custom_data_arguments, add_overwrite_argument, check_embedding_flags,
                          require_new_files, run_command, share_cores_with_loader)
from dmlfast.checks import require_at_least
from dmlfast.figures import CAPTION, CELL_HEIGHT, CELL_WIDTH, COLOURS, FRAME, GRID_COLUMNS, TILE, draw_grid, grid_size
from dmlfast.training.embedding import embed_list
from dmlfast.training.gallery import cache_key, gallery_embeddings, gallery_from_folder, nearest
from dmlfast.training.setup import dataset_split, load_model

PROG = "python -m dmlfast.retrieve"

# The command, and the library names (dmlfast.figures, dmlfast.training) that stay importable from this module.
__all__ = ["PROG", "build_parser", "main", "retrieve",
           "CAPTION", "CELL_HEIGHT", "CELL_WIDTH", "COLOURS", "FRAME", "GRID_COLUMNS", "TILE", "cache_key", "dataset_split",
           "draw_grid", "embed_list", "gallery_embeddings", "gallery_from_folder", "grid_size", "load_model"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Show the images a trained model retrieves for a query image (PNG grid + ranked list).")
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
    add_overwrite_argument(p, "--out")
    p.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto", help="k-NN backend (default: auto)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2; 0 = main process)")
    p.add_argument("--no-cache", action="store_true", help="embed the gallery again and do not write the cache")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def _check_arguments(args: argparse.Namespace) -> None:
    """``InputError`` for a flag out of range, a gallery given twice, or an unreadable query image."""
    from dmlfast.data import image_problem

    require_at_least("--top", args.top, 1)
    require_new_files("--out", args.out, overwrite=args.overwrite)
    check_embedding_flags(args)
    if args.gallery is not None and any(v is not None for v in (args.dataset, args.data_root, args.list, args.test_classes, args.split)):
        raise InputError("--gallery DIR cannot be combined with --dataset/--data-root/--list/--test-classes/--split")
    if not args.query.is_file():
        raise InputError(f"--query: no such file: {args.query}")
    problem = image_problem(str(args.query))
    if problem is not None:
        raise InputError(f"--query: {args.query}: {problem}")


def _gallery(args: argparse.Namespace, config):
    """``(ImageList, labels)`` of the gallery the arguments name: ``--gallery DIR`` or a dataset split."""
    from dmlfast.data import ImageList

    if args.gallery is not None:
        gallery, labels = gallery_from_folder(args.gallery)
        return ImageList(gallery.paths, gallery.labels, gallery.class_ids, config["dataset"], "gallery"), labels
    gallery, _ = dataset_split(config, args, args.split)
    return ImageList(gallery.paths, gallery.labels, gallery.class_ids, config["dataset"], gallery.split), gallery.label_names()


def retrieve(args: argparse.Namespace) -> List[Tuple[str, Optional[str], float]]:
    """Embed, search, print the ranked list and write the grid; returns ``[(path, label, similarity)]`` best first."""
    import numpy as np

    from dmlfast.data import ImageList

    _check_arguments(args)
    share_cores_with_loader(args.workers)
    model, config, device, dtype = load_model(args.checkpoint, args.device)
    gallery, labels = _gallery(args, config)
    own = {os.path.realpath(p): i for i, p in enumerate(gallery.paths)}.get(os.path.realpath(args.query))
    k = args.top
    if k > len(gallery) - (own is not None):
        itself = " besides the query itself" if own is not None else ""
        raise InputError(f"--top {k} is more than the gallery's {len(gallery) - (own is not None)} images{itself}")
    reference, cache, cached = gallery_embeddings(model, gallery, config, device, dtype, checkpoint=args.checkpoint,
                                                  use_cache=not args.no_cache, batch_size=args.batch_size,
                                                  workers=args.workers, progress=args.progress)
    query_list = ImageList([str(args.query)], np.zeros(1, dtype=np.int64), ["-"], config["dataset"], "query")
    query = embed_list(model, query_list, config, device, dtype, batch_size=1, workers=0, progress=False, desc="embed query")
    backend, similarities, indices = nearest(query, reference, k, args.backend, exclude=own)

    query_label = args.query_label
    if query_label is None:
        query_label = None if own is None else labels[own]
    results = [(gallery.paths[i], labels[i], float(s)) for i, s in zip(indices, similarities)]
    try:
        width, height = draw_grid(str(args.query), query_label, results, args.out)
    except OSError as error:
        raise InputError(f"--out: cannot write {args.out} ({error.strerror or error})") from error
    _print_results(args, gallery, cache, cached, backend, device, query_label, results)
    print(f"wrote {args.out} ({width} x {height} px)")
    return results


def _print_results(args, gallery, cache, cached, backend, device, query_label, results) -> None:
    """The gallery's source, the query and the ranked list (``+``/``-``: the query's label or not)."""
    source = f"{len(gallery)} images " + ("cached in" if cached else "embedded" + (", cached in" if cache else "")) + (f" {cache}" if cache else "")
    print(f"gallery: {source}; k-NN backend {backend}, device {device}")
    print(f"query: {args.query}" + ("" if query_label is None else f" (label {query_label})"))
    print(f"{'rank':>4}  {'similarity':>10}  {'':1}  {'label':<20}  path")
    for rank, (path, label, similarity) in enumerate(results, 1):
        mark = " " if query_label is None or label is None else ("+" if label == query_label else "-")
        print(f"{rank:>4}  {similarity:>10.4f}  {mark}  {'' if label is None else label:<20}  {path}")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, retrieve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
