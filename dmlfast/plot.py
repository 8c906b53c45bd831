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
from typing import List, Optional, Sequence

from dmlfast._cli import InputError, run_command

PROG = "python -m dmlfast.plot"
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


def project(embeddings, method: str, seed: int = 0):
    """``[N, 2]`` float array: t-SNE (PCA init, perplexity min(30, (N - 1) / 3)) or UMAP (15 neighbours at most) of ``embeddings``."""
    import numpy as np

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"project: embeddings must be [N >= 4, D], got shape {x.shape}")
    if method not in ("tsne", "umap"):
        raise ValueError(f"project: method must be 'tsne' or 'umap', got {method!r}")
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = max(1.0, min(30.0, (x.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def pick_classes(labels: Sequence[int], count: int, seed: int) -> List[int]:
    """``count`` distinct labels of ``labels`` (all when fewer), drawn with ``seed``, sorted."""
    import numpy as np

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"pick_classes: count must be an int >= 1, got {count!r}")
    present = np.unique(np.asarray(labels))
    order = np.random.default_rng(seed).permutation(len(present))
    return sorted(present[order[:count]].tolist())


def draw(points, names: Sequence[str], title: str, out: Path) -> None:
    """Scatter plot PNG of ``points [N, 2]``, one colour per distinct name (legend up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(names):
        raise ValueError(f"draw: points must be [N, 2] with one name per point; got shape {points.shape} and {len(names)} names")
    classes = sorted(set(names))
    if len(classes) <= 20:  # the categorical palettes, colour by colour
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        colours = [cmap(i) for i in range(len(classes))]
    else:
        colours = [plt.get_cmap("hsv")(i / len(classes)) for i in range(len(classes))]
    out = Path(out)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    names = np.asarray(names)
    for i, c in enumerate(classes):
        sel = names == c
        ax.scatter(points[sel, 0], points[sel, 1], s=14, color=colours[i], label=str(c), linewidths=0)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=1.5, frameon=False)
    ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_html(points, names: Sequence[str], paths: Sequence[str], title: str, out: Path) -> None:
    """Interactive plotly scatter (hover: label and path) as a standalone HTML file."""
    import numpy as np
    import plotly.graph_objects as go

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or not len(points) == len(names) == len(paths):
        raise ValueError(f"write_html: points must be [N, 2] with one name and path per point; got shape {points.shape}, "
                         f"{len(names)} names, {len(paths)} paths")
    fig = go.Figure()
    for c in sorted(set(names)):
        idx = [i for i, n in enumerate(names) if n == c]
        fig.add_trace(go.Scatter(x=points[idx, 0], y=points[idx, 1], mode="markers", name=str(c),
                                 text=[f"{c}<br>{paths[i]}" for i in idx], hoverinfo="text"))
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    fig.write_html(str(out), include_plotlyjs=True)


def build_parser() -> argparse.ArgumentParser:
    from dmlfast.evaluate import add_custom_data_arguments

    p = argparse.ArgumentParser(prog=PROG, description="2-D t-SNE/UMAP map of a checkpoint's test embeddings, coloured by class.")
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt/last.pt of python -m dmlfast.train")
    g = p.add_argument_group("data (default: the checkpoint's dataset)")
    g.add_argument("--dataset", help="dataset to embed (default: the checkpoint's)")
    g.add_argument("--data-root", type=Path, help="the dataset's folder (default: the checkpoint's)")
    add_custom_data_arguments(g)
    g.add_argument("--split", choices=("train", "test", "query", "gallery"), help="split to embed (default: test, In-shop gallery)")
    p.add_argument("--classes", type=int, default=20, metavar="N", help="classes to show, drawn with --seed (default: 20)")
    p.add_argument("--method", choices=METHODS, default="auto", help="tsne, umap, or auto: UMAP when installed, else t-SNE")
    p.add_argument("--out", type=Path, help="PNG to write (default: embeddings.png next to the checkpoint)")
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
    from dmlfast.retrieve import dataset_split, embed_list, load_model

    if args.classes < 1:
        raise InputError(f"--classes must be at least 1, got {args.classes}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    method = resolve_method(args.method)
    out = args.out if args.out is not None else args.checkpoint.parent / "embeddings.png"
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
    names = [str(split.class_ids[c]) if split.class_ids else str(c) for c in subset.labels.tolist()]
    title = (f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {data_config['dataset']} {split.split} embeddings: "
             f"{len(chosen)} classes, {len(subset)} images\n{args.checkpoint}")
    try:
        draw(points, names, title, out)
        print(f"wrote {out}")
        if _installed("plotly"):
            html = out.with_suffix(".html")
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
