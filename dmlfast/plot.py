"""``python -m dmlfast.plot``: a 2-D map of a checkpoint's test embeddings, coloured by class.

::

    python -m dmlfast.plot --checkpoint runs/train/best.pt [--dataset NAME --data-root DIR] [--classes 20] [--out map.png]

Embeds the images of ``--classes`` classes (drawn with ``--seed`` from the held-out split: ``test``,
In-shop's ``gallery``, or ``--split``) with the checkpoint's evaluation transform and projects them
to 2-D with t-SNE (``scikit-learn``) or UMAP (``umap-learn``); ``--method auto`` takes UMAP when it
is installed, else t-SNE. Writes a PNG scatter plot (default ``<checkpoint folder>/embeddings.png``)
and, when ``plotly`` is installed, an interactive HTML next to it (same name, ``.html``; hovering
shows each image's label and path). A method whose package is missing is a one-line error naming
the pip package. Input errors print one ``python -m dmlfast.plot: error: ...`` line, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

from dmlfast._cli import (InputError, Parser, add_custom_data_arguments, add_overwrite_argument, check_embedding_flags,
                          require_new_files, run_command, share_cores_with_loader)
from dmlfast.checks import require_at_least
from dmlfast.figures import draw_map, pick_classes, project, write_html
from dmlfast.training.embedding import embed_list
from dmlfast.training.setup import dataset_split, load_model

PROG = "python -m dmlfast.plot"
draw = draw_map

# The command, and the library names (dmlfast.figures, dmlfast.training) that stay importable from this module.
__all__ = ["METHODS", "PACKAGES", "PROG", "build_parser", "main", "plot", "resolve_method",
           "dataset_split", "draw", "embed_list", "load_model", "pick_classes", "project", "write_html"]
METHODS = ("auto", "tsne", "umap")
PACKAGES = {"tsne": ("sklearn", "scikit-learn"), "umap": ("umap", "umap-learn")}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_method(method: str) -> str:
    """``"tsne"`` or ``"umap"`` for ``--method``; ``InputError`` naming the pip package when it is not installed."""
    if method not in METHODS:
        raise ValueError(f"resolve_method: method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        if _installed(PACKAGES["umap"][0]):
            return "umap"
        if _installed(PACKAGES["tsne"][0]):
            return "tsne"
        raise InputError("--method auto needs scikit-learn (t-SNE) or umap-learn (UMAP): pip install scikit-learn")
    module, package = PACKAGES[method]
    if not _installed(module):
        raise InputError(f"--method {method} needs the {package} package: pip install {package}")
    return method


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="2-D t-SNE/UMAP map of a checkpoint's test embeddings, coloured by class.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt/last.pt of python -m dmlfast.train")
    g = p.add_argument_group("data (default: the checkpoint's dataset)")
    g.add_argument("--dataset", help="dataset to embed (default: the checkpoint's)")
    g.add_argument("--data-root", type=Path, help="the dataset's folder (default: the checkpoint's)")
    add_custom_data_arguments(g)
    g.add_argument("--split", choices=("train", "test", "query", "gallery"), help="split to embed (default: test, In-shop gallery)")
    p.add_argument("--classes", type=int, default=20, metavar="N", help="classes to show, drawn with --seed (default: 20)")
    p.add_argument("--method", choices=METHODS, default="auto", help="tsne, umap, or auto: UMAP when installed, else t-SNE")
    p.add_argument("--out", type=Path, help="PNG to write (default: embeddings.png next to the checkpoint)")
    add_overwrite_argument(p, "--out (and the .html beside it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the class draw and the projection (default: 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2; 0 = main process)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def plot(args: argparse.Namespace) -> Path:
    """Embed, project and draw; returns the PNG's path."""
    import numpy as np

    from dmlfast.data import ImageList

    require_at_least("--classes", args.classes, 1)
    check_embedding_flags(args)
    method = resolve_method(args.method)
    out = args.out if args.out is not None else args.checkpoint.parent / "embeddings.png"
    if out.suffix.lower() != ".png":  # before any work: the map is a PNG, the interactive .html goes beside it
        raise InputError(f"--out must name a .png file, got {out} (with plotly installed, the interactive map is written "
                         f"beside it as {out.with_suffix('.html').name})")
    html = out.with_suffix(".html") if _installed("plotly") else None
    require_new_files("--out", out, html, overwrite=args.overwrite)
    share_cores_with_loader(args.workers)
    model, config, device, dtype = load_model(args.checkpoint, args.device)
    split, data_config = dataset_split(config, args, args.split)
    chosen = pick_classes(split.labels, args.classes, args.seed)
    keep = np.flatnonzero(np.isin(split.labels, chosen))
    if len(keep) < 4:
        raise InputError(f"--classes {args.classes}: the {len(chosen)} class(es) drawn have {len(keep)} image(s); a map needs at least 4")
    subset = ImageList([split.paths[i] for i in keep], split.labels[keep], split.class_ids, config["dataset"], split.split)
    embeddings = embed_list(model, subset, config, device, dtype, batch_size=args.batch_size, workers=args.workers,
                            progress=args.progress, desc="embed")
    print(f"{method}: {len(subset)} images of {len(chosen)} classes of {data_config['dataset']} {split.split}", flush=True)
    points = project(embeddings.numpy(), method, args.seed)
    names = subset.label_names()
    title = (f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {data_config['dataset']} {split.split} embeddings: "
             f"{len(chosen)} classes, {len(subset)} images\n{args.checkpoint}")
    try:
        draw_map(points, names, title, out)
        print(f"wrote {out}")
        if html is not None:
            write_html(points, names, subset.paths, title.replace("\n", " "), html)
            print(f"wrote {html}")
    except OSError as error:
        raise InputError(f"--out: cannot write {out} ({error.strerror or error})") from error
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, plot, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
