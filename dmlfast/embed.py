"""``python -m dmlfast.embed``: a trained model's embeddings of a folder of images or of a CSV list,
written as arrays that ``python -m dmlfast.evaluate --embeddings`` reads as they are.

::

    python -m dmlfast.embed --checkpoint runs/train/best.pt --images ~/photos --out emb.npy
    python -m dmlfast.embed --checkpoint runs/train/best.pt --list list.csv [--data-root DIR] [--split test] --out emb.npy
    python -m dmlfast.evaluate --embeddings emb.npy --labels emb.labels.npy

Writes ``OUT`` (float32 (N, D), L2-normalised rows, the checkpoint's evaluation transform),
``<OUT stem>.labels.npy`` (each image's label as text: its top-level sub-folder below ``--images``,
or its CSV label; written when every image has one) and ``<OUT stem>.paths.txt`` (the images, one
per line, in the rows' order). The images are listed as ``python -m dmlfast.retrieve --gallery``
lists them (sorted, links followed once, unreadable files skipped with a warning). No existing file
is replaced without ``--overwrite``. Input errors print one ``python -m dmlfast.embed: error: ...``
line and exit with status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from dmlfast._cli import (InputError, Parser, add_image_source_arguments, add_model_arguments, add_overwrite_argument,
                          check_embedding_flags, read_image_source, require_new_files, run_command, share_cores_with_loader)

PROG = "python -m dmlfast.embed"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Embed images with a trained model: arrays for python -m dmlfast.evaluate --embeddings.")
    add_model_arguments(p)
    add_image_source_arguments(p, "--images")
    p.add_argument("--out", type=Path, required=True, metavar="EMB.npy", help="embeddings to write; labels and paths go beside it")
    add_overwrite_argument(p, "the output files")
    return p


def output_files(out: Path):
    """``(embeddings, labels, paths)`` files of ``--out``."""
    if out.suffix != ".npy":
        raise InputError(f"--out must name a .npy file, got {out}")
    return out, out.with_name(f"{out.stem}.labels.npy"), out.with_name(f"{out.stem}.paths.txt")


def embed(args) -> Path:
    """Embed the images the arguments name and write the three files; returns ``--out``."""
    import numpy as np

    from dmlfast.inference import load
    from dmlfast.inference.files import save_array, write_atomically

    check_embedding_flags(args)
    files = output_files(args.out)
    require_new_files("--out", *files, overwrite=args.overwrite)
    if not args.out.parent.is_dir():
        raise InputError(f"--out: no such folder: {args.out.parent}")
    images, labels = read_image_source(args, "--images")
    odd = [p for p in images.paths if "\n" in p or "\r" in p]
    if odd:
        raise InputError(f"--images: {len(odd)} path(s) hold a line break, which {files[2].name} cannot list: {odd[0]!r}")
    share_cores_with_loader(args.workers)
    model = load(args.checkpoint, args.device)
    embeddings = model.embed(images, batch_size=args.batch_size, workers=args.workers, progress=args.progress).numpy()
    write = {files[0]: lambda tmp: save_array(tmp, embeddings),
             files[2]: lambda tmp: Path(tmp).write_text("".join(f"{p}\n" for p in images.paths), encoding="utf-8")}
    unlabelled = sum(label is None for label in labels)
    if not unlabelled:
        write[files[1]] = lambda tmp: save_array(tmp, np.array(labels, dtype=str))
    try:
        for path, writer in write.items():
            write_atomically(path, writer)
    except OSError as error:
        raise InputError(f"--out: cannot write {args.out} ({error.strerror or error})") from error
    print(f"{len(embeddings)} images x {embeddings.shape[1]} -> {files[0]}; paths -> {files[2]}")
    if unlabelled:
        print(f"no {files[1].name}: {unlabelled} image(s) lie directly in {args.images} and have no label")
    else:
        print(f"labels ({len(set(labels))} classes) -> {files[1]}; python -m dmlfast.evaluate --embeddings {files[0]} "
              f"--labels {files[1]}")
    return args.out


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, embed, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
