"""``python -m dmlfast.index``: a gallery index for serving, built once, then queried.

::

    python -m dmlfast.index build --checkpoint runs/train/best.pt --gallery ~/catalogue --out catalogue.index [--kind flat|ivf|hnsw]
    python -m dmlfast.index query catalogue.index --image photo.jpg [photo2.jpg ...] --top 8 [--json results.json]

``build`` embeds the gallery once with the checkpoint's model (through the gallery cache next to the
checkpoint that ``python -m dmlfast.retrieve`` uses; ``--no-cache`` skips it) and writes a folder:
``index.faiss`` (faiss's own format) and ``gallery.json`` (paths, labels, the checkpoint's path and
SHA-256; :mod:`dmlfast.inference.index`). ``--kind flat`` is exact; ``ivf`` and ``hnsw`` are
approximate, for 10^6+ images (README, "Using a trained model"). ``query`` loads the index and the
checkpoint it names (or ``--checkpoint``, which must be the same file), embeds every ``--image`` in
one pass and searches them in one call; a query that is itself a gallery image is left out of its
results. Nothing is replaced without ``--overwrite``. Input errors print one
``python -m dmlfast.index: error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from dmlfast._cli import (InputError, Parser, add_image_source_arguments, add_model_arguments, add_overwrite_argument,
                          check_embedding_flags, name_choice, read_image_source, require_new_files, run_command,
                          share_cores_with_loader)
from dmlfast.checks import require_at_least
from dmlfast.inference.index import DEFAULT_HNSW_M, INDEX_KINDS

PROG = "python -m dmlfast.index"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Build a gallery index of a trained model's embeddings, or query one.")
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    build = commands.add_parser("build", help="embed a gallery and write its index")
    add_model_arguments(build)
    add_image_source_arguments(build, "--gallery")
    build.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="the index folder to write")
    build.add_argument("--kind", type=name_choice("index kind", INDEX_KINDS), default="flat",
                       help="flat (exact, default), ivf or hnsw (approximate, for 10^6+ images)")
    build.add_argument("--nlist", type=int, help="ivf: cells (default: 4 sqrt(N))")
    build.add_argument("--hnsw-m", type=int, default=DEFAULT_HNSW_M, help=f"hnsw: links per node (default: {DEFAULT_HNSW_M})")
    build.add_argument("--no-cache", action="store_true", help="embed the gallery again and do not write retrieve's gallery cache")
    build.add_argument("--overwrite", action="store_true", help="replace an index in --out")
    query = commands.add_parser("query", help="the gallery images nearest to query images")
    query.add_argument("index", type=Path, help="an index folder written by build")
    query.add_argument("--image", type=Path, nargs="+", required=True, help="query image(s), embedded and searched together")
    query.add_argument("--top", type=int, default=8, metavar="K", help="results per query (default: 8)")
    query.add_argument("--checkpoint", type=Path, help="the model (default: the checkpoint the index was built with)")
    query.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    query.add_argument("--nprobe", type=int, help="ivf: cells searched (default: the index's)")
    query.add_argument("--ef-search", type=int, help="hnsw: candidates searched (default: the index's)")
    query.add_argument("--json", type=Path, help="also write the results to this JSON file")
    add_overwrite_argument(query, "--json")
    return p


def build_index(args):
    """Embed the gallery, build the index, write it."""
    from dmlfast.inference import GalleryIndex, load
    from dmlfast.inference.index import require_free

    check_embedding_flags(args)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out: {args.out} is a file; the index is a folder")
    require_free(args.out, args.overwrite)  # before the work
    gallery, labels = read_image_source(args, "--gallery")
    share_cores_with_loader(args.workers)
    model = load(args.checkpoint, args.device)
    try:
        index, cached = GalleryIndex.from_gallery(model, gallery, labels, kind=args.kind, nlist=args.nlist, hnsw_m=args.hnsw_m,
                                                  use_cache=not args.no_cache, batch_size=args.batch_size, workers=args.workers,
                                                  progress=args.progress)
    except ValueError as error:
        raise InputError(f"--{'nlist' if args.kind == 'ivf' else 'hnsw-m'}: {error}") from error
    index.save(args.out, overwrite=args.overwrite)
    source = "read from the gallery cache" if cached else "embedded"
    print(f"{len(index)} images {source}; {index.info['kind']} index of dimension {index.info['embedding_size']} -> {args.out}")
    return index


def query_index(args):
    """Embed the query images, search them, print (and write) the ranked lists."""
    from dmlfast.inference import GalleryIndex, load

    require_at_least("--top", args.top, 1)
    require_new_files("--json", args.json, overwrite=args.overwrite)
    index = GalleryIndex.load(args.index)
    for image in args.image:
        if not image.is_file():
            raise InputError(f"--image: no such file: {image}")
    checkpoint = args.checkpoint or Path(index.info.get("checkpoint", {}).get("path", ""))
    model = load(checkpoint, args.device)
    search = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    try:
        results = index.query(model, args.image, args.top, **{k: v for k, v in search.items() if v is not None})
    except ValueError as error:
        raise InputError(str(error).replace("GalleryIndex.search: ", "").replace("k must", "--top must")) from error
    for result in results:
        own = result["left_out"]
        print(f"query: {result['query']}" + ("" if own is None else f" (gallery image #{own}, left out of its results)"))
        for rank, (path, label, similarity) in enumerate(result["results"], 1):
            print(f"{rank:>4}  {similarity:>8.4f}  {'' if label is None else label:<20}  {path}")
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        except OSError as error:
            raise InputError(f"--json: cannot write {args.json} ({error.strerror or error})") from error
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, build_index if args.command == "build" else query_index, args)


if __name__ == "__main__":
    sys.exit(main())
