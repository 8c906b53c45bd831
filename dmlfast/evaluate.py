"""Command line retrieval evaluation of saved embeddings or of a training checkpoint.

``python -m dmlfast.evaluate --embeddings E.npy --labels L.npy`` evaluates arrays;
``python -m dmlfast.evaluate --checkpoint runs/train/best.pt [--dataset NAME --data-root DIR]``
rebuilds the model of a ``python -m dmlfast.train`` checkpoint, embeds the held-out split of its
dataset (or of ``--dataset``; In-shop: query against gallery) and evaluates it with that dataset's Ks
(``--metrics``, ``--backend``, ``--binary`` and ``--seed`` apply to both). The arrays may be those
``python -m dmlfast.embed`` writes (``emb.npy`` and ``emb.labels.npy``).

Prints a table of the metrics of :func:`dmlfast.evaluation.retrieval_metrics`, as fractions in [0, 1]
(the unit of every metric dmlfast prints or writes); ``--json PATH`` also writes them as JSON (a NaN
metric, when no query has a match, as null). Input errors
(missing files, bad shapes, NaN embeddings, k too large) print one
``python -m dmlfast.evaluate: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dmlfast._cli import (InputError, Parser, add_custom_data_arguments, add_overwrite_argument, require_new_files, run_command,
                          share_cores_with_loader)
from dmlfast.checks import require_at_least
from dmlfast.training.config import DATASET_KS, apply_dataset_arguments
from dmlfast.training.embedding import TRAINING_METRICS, evaluate_model
from dmlfast.training.setup import amp_dtype, load_splits, make_eval_loaders, read_checkpoint, resolve_device, resolve_loader, restore_model

PROG = "python -m dmlfast.evaluate"

# The command, and the library names (dmlfast._cli, dmlfast.training) that stay importable from this module.
__all__ = ["PROG", "build_parser", "evaluate", "evaluate_checkpoint", "format_table", "load_array", "main",
           "add_custom_data_arguments", "apply_dataset_arguments"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; other commands (e.g. checkpoint evaluation) add their options to it."""
    from dmlfast.evaluation import METRICS

    parser = Parser(prog=PROG, description="Exact retrieval metrics (Recall@K, MAP@R, R-Precision, NMI) of saved embeddings.")
    parser.add_argument("--embeddings", type=Path, help="query embeddings, .npy of shape [N, D] (or give --checkpoint)")
    parser.add_argument("--labels", type=Path, help="query labels, .npy of shape [N]")
    parser.add_argument("--reference", type=Path, help="gallery embeddings, .npy [M, D] (default: queries against each other)")
    parser.add_argument("--reference-labels", type=Path, help="gallery labels, .npy [M]")
    parser.add_argument("--ks", type=int, nargs="+", help="K values of Recall@K (default: 1 2 4 8; with --checkpoint the dataset's)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, help="metrics to compute (default: all; with --checkpoint "
                        f"the training run's: {' '.join(TRAINING_METRICS)})")
    parser.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto", help="k-NN backend (default: auto)")
    parser.add_argument("--device", help="torch device to evaluate on: cpu, cuda or cuda:N (default: cuda when available, "
                        "else cpu, as in training)")
    parser.add_argument("--binary", action="store_true", help="evaluate sign-binarised embeddings")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed for NMI (default: 0)")
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    add_overwrite_argument(parser, "--json")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    ckpt = parser.add_argument_group("checkpoint evaluation (instead of --embeddings/--labels)")
    ckpt.add_argument("--checkpoint", type=Path, help="a last.pt/best.pt of python -m dmlfast.train: embed the dataset's held-out split with it")
    ckpt.add_argument("--dataset", help="dataset to embed (default: the checkpoint's)")
    ckpt.add_argument("--data-root", type=Path, help="the dataset's folder (default: the checkpoint's)")
    add_custom_data_arguments(ckpt)
    ckpt.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto", help="image loader (default: auto)")
    ckpt.add_argument("--workers", type=int, default=2, help="loader workers / DALI threads (default: 2)")
    return parser


def load_array(path: Path, option: str) -> np.ndarray:
    """Load a .npy file given on the command line, or raise InputError naming the option."""
    if not path.is_file():
        raise InputError(f"{option}: no such file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{option}: cannot read {path} as a .npy array ({error})") from error


def format_table(metrics: dict) -> str:
    """Two-column text table: metric name, value (fractions in [0, 1] with 4 decimals, counts as integers)."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in metrics.items():
        shown = str(value) if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Rebuild the model saved in ``args.checkpoint`` and compute its metrics on the held-out split."""
    if args.embeddings is not None or args.labels is not None or args.reference is not None:
        raise InputError("--checkpoint cannot be combined with --embeddings/--labels/--reference")
    state = read_checkpoint(args.checkpoint, "--checkpoint", entries=("model",))
    config = apply_dataset_arguments(state["config"], args)
    require_at_least("--workers", args.workers, 0)
    share_cores_with_loader(args.workers)
    config.update(workers=args.workers, weights="none", binary_eval=False,
                  ks=list(args.ks) if args.ks else list(DATASET_KS[config["dataset"]]))
    device = resolve_device(args.device)
    config["loader"] = resolve_loader(args.loader, device)
    splits = load_splits(config)
    model = restore_model(config, state["model"], device)
    dtype = amp_dtype(config["amp"], device)
    loaders = make_eval_loaders(config, splits, device)
    try:
        return evaluate_model(model, loaders, config, device, dtype, progress=args.progress, metrics=args.metrics or TRAINING_METRICS,
                              backend=args.backend, binary=args.binary, seed=args.seed)
    except (ValueError, TypeError) as error:
        raise InputError(str(error)) from error


def evaluate(args: argparse.Namespace) -> dict:
    """Load the arrays named in ``args`` and compute their metrics."""
    import torch

    from dmlfast.evaluation import METRICS, retrieval_metrics

    if args.embeddings is None or args.labels is None:
        raise InputError("give --embeddings and --labels (saved arrays) or --checkpoint (a training checkpoint)")
    if (args.reference is None) != (args.reference_labels is None):
        raise InputError("--reference and --reference-labels must be given together")
    device = resolve_device(args.device)
    embeddings = torch.from_numpy(load_array(args.embeddings, "--embeddings")).to(device)
    labels = load_array(args.labels, "--labels")
    reference = reference_labels = None
    if args.reference is not None:
        reference = torch.from_numpy(load_array(args.reference, "--reference")).to(device)
        reference_labels = load_array(args.reference_labels, "--reference-labels")
    try:
        return retrieval_metrics(
            embeddings,
            labels,
            ks=tuple(args.ks or (1, 2, 4, 8)),
            reference=reference,
            reference_labels=reference_labels,
            metrics=tuple(args.metrics or METRICS),
            binary=args.binary,
            backend=args.backend,
            progress=None if args.progress else False,
            seed=args.seed,
        )
    except (ValueError, TypeError) as error:
        raise InputError(str(error)) from error


def _run(args) -> None:
    """The command: the metrics, written to ``--json`` when given, printed as a table."""
    require_new_files("--json", args.json, overwrite=args.overwrite)
    metrics = evaluate_checkpoint(args) if args.checkpoint is not None else evaluate(args)
    if args.json is not None:
        try:
            json_ready = {name: None if value != value else value for name, value in metrics.items()}
            args.json.write_text(json.dumps(json_ready, indent=2) + "\n")
        except OSError as error:
            raise InputError(f"--json: cannot write {args.json} ({error.strerror or error})") from error
    print(format_table(metrics))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for input errors, printed as one line)."""
    return run_command(PROG, _run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
