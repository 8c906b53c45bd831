"""``python -m dmlfast.export``: a trained model as ONNX or TorchScript for serving.

::

    python -m dmlfast.export --checkpoint runs/train/best.pt --format onnx --out model.onnx
    python -m dmlfast.export --checkpoint runs/train/best.pt --format torchscript --out model.pt

The exported model takes ``images``, uint8 (N, 3, S, S) RGB, any N: images resized (shorter side
to R px, bilinear, antialiased) and centre-cropped to S x S; the normalisation is inside. It returns
``embeddings``, float32 (N, D), L2-normalised (:mod:`dmlfast.inference.export`). S, R and the rest
are printed and recorded in the file. ONNX needs ``pip install onnx onnxscript``. An existing
``--out`` is replaced only with ``--overwrite``. Input errors print one
``python -m dmlfast.export: error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from dmlfast._cli import Parser, add_model_arguments, name_choice, run_command
from dmlfast.inference.export import EXPORT_FORMATS

PROG = "python -m dmlfast.export"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Export a trained model (uint8 images in, unit embeddings out) as ONNX or TorchScript.")
    add_model_arguments(p, embedding=False)
    p.add_argument("--format", required=True, type=name_choice("format", EXPORT_FORMATS), help=" or ".join(EXPORT_FORMATS))
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def export(args) -> dict:
    """Load the checkpoint, write the exported model and print what it takes and returns."""
    from dmlfast.inference import export_model, load

    model = load(args.checkpoint, args.device)
    metadata = export_model(model, args.out, args.format, overwrite=args.overwrite)
    given, made = metadata["input"], metadata["output"]
    print(f"wrote {args.out} ({args.format}, {args.out.stat().st_size / 1e6:.1f} MB)")
    print(f"input  {given['name']}: uint8 [batch, 3, {given['size']}, {given['size']}] RGB; each image resized (shorter side to "
          f"{given['resize_shorter_side']} px, {given['interpolation']}), centre-cropped; normalisation "
          f"{given['normalization_inside']!r} is inside")
    print(f"output {made['name']}: float32 [batch, {made['shape'][1]}], L2-normalised")
    return metadata


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
