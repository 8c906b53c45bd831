"""The pictures of the commands: the retrieval grid of ``python -m dmlfast.retrieve`` (the query,
then the results in rows of up to ``GRID_COLUMNS``, each cell ``CELL_WIDTH`` x ``CELL_HEIGHT`` px: a
``TILE`` px image in a ``FRAME`` px frame and two caption lines) and the 2-D embedding map of
``python -m dmlfast.plot`` (t-SNE or UMAP, coloured by class; a PNG and an interactive HTML).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

TILE = 160
FRAME = 6
CAPTION = 40
GRID_COLUMNS = 8
CELL_WIDTH = TILE + 2 * FRAME
CELL_HEIGHT = TILE + 2 * FRAME + CAPTION
COLOURS = {"query": (40, 90, 220), "correct": (20, 170, 60), "wrong": (210, 40, 40), "unknown": (170, 170, 170)}


# ------------------------------------------------------------------------------------------- grid

def grid_size(k: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the grid for ``k`` results."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"grid_size: k must be an int >= 1, got {k!r}")
    return CELL_WIDTH * (1 + min(k, GRID_COLUMNS)), CELL_HEIGHT * math.ceil(k / GRID_COLUMNS)


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


# -------------------------------------------------------------------------------------------- map

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


def draw_map(points, names: Sequence[str], title: str, out: Path) -> None:
    """Scatter plot PNG of ``points [N, 2]``, one colour per distinct name (legend up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(names):
        raise ValueError(f"draw_map: points must be [N, 2] with one name per point; got shape {points.shape} and {len(names)} names")
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
