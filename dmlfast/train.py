"""``python -m dmlfast.train``: train an embedding network with a fused proxy loss and a published recipe.

With no arguments it trains a small CNN with Proxy-Anchor on the built-in glyph set (rendered on
first use, no download) on the CPU or GPU that is there, in a few minutes on a laptop, and prints
Recall@K and MAP@R on the held-out classes before and after training. ``--dataset`` picks a
benchmark (``--data-root`` its folder) and the recipe of ``dmlfast.recipes`` for the dataset, the
loss and the backbone; any flag given overrides the recipe. Run ``python -m dmlfast.train --help``.

Outputs in ``--output``: ``config.json`` (the final configuration), ``last.pt`` (after every epoch;
``--resume`` continues from it), ``best.pt`` (best Recall@1), ``log.jsonl``, ``curves.png`` and,
with ``--tensorboard`` / ``--wandb``, the same scalars as TensorBoard events / an offline W&B run.
User errors (bad flags, missing data, wrong checkpoint) print one ``error:`` line and exit with status 2.

``torchrun --nproc-per-node N -m dmlfast.train ...`` trains data-parallel in N processes
(:mod:`dmlfast.training.distributed`): one per GPU (``cuda:LOCAL_RANK``, NCCL) or on the CPU
(gloo); model and proxies replicated, their gradients averaged by DDP; ``--batch-size`` per
process (global batch N x B) and the batches sharded by rank; evaluation sharded and gathered in
dataset order, its metrics computed on rank 0 and sent to all; rank 0 alone prints, logs and
writes the files, which are those of a single-process run (no ``module.`` prefix) plus
``world_size`` in the configuration. ``--resume`` needs the same N. ``--loss ProxyISA`` runs in
one process only. Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing changes.
``--shard-proxies`` splits the proxies instead (:mod:`dmlfast.sharded`): each process holds 1/N of
them and of their optimizer state, the loss is the global batch's, the backbone's gradients are
summed over ranks, and every process saves its shard beside ``last.pt``/``best.pt``
(``last.shard-R-of-N.pt``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from dmlfast._cli import InputError, run_command

PROG = "python -m dmlfast.train"

#: Recall@K cut-offs of each dataset's published evaluation.
DATASET_KS = {"CUB": (1, 2, 4, 8), "Cars196": (1, 2, 4, 8), "SOP": (1, 10, 100, 1000),
              "In-shop": (1, 10, 20, 30, 40, 50), "Omniglot": (1, 2, 4, 8), "glyphs": (1, 2, 4, 8),
              "folder": (1, 2, 4, 8), "csv": (1, 2, 4, 8)}
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: Configuration keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {"resume", "output", "device", "workers", "data_root", "progress", "loader", "tensorboard", "wandb"}
#: Configuration keys added after checkpoints were first written, with the value older runs had.
LATER_KEYS = {"shard_proxies": False}


#: A problem with the user's input: printed as one ``error:`` line, exit status 2 (the error type
#: every command-line tool shares, so evaluate, retrieve and plot pass it on as it is).
UsageError = InputError


EPILOG = """\
recipes (dmlfast/recipes.py; every flag below overrides the recipe's value):
  glyphs, Omniglot   smallcnn from scratch, emb 128, batch 128, AdamW lr 2e-3 (proxies x100), StepLR 4/0.3, 8 epochs
                     (Omniglot: 32 px, StepLR 5/0.3, 10 epochs)
  ProxyAnchor        bn_inception, emb 512, batch 180 (resnet50 120), AdamW lr 1e-4, proxies x100, wd 1e-4,
                     StepLR 10/0.5, warm-up 1 epoch (resnet50 5), frozen BN, 60 epochs, GAP+GMP;
                     SOP/In-shop lr 6e-4, StepLR 20/0.25, BN trained; Cars bn_inception step 20; resnet50 CUB 5, Cars 10
  ProxyNCA           ProxyNCA++: resnet50, GMP + LayerNorm, emb 2048, Adam eps 1 wd 0, lr 4e-3, proxies x1e5,
                     batch 32 (4 per class), warm-up 5, crop 256/resize 288, scale 18, 40 epochs;
                     SOP/In-shop lr 2.4e-2, batch 192 (3 per class), 80 epochs, SOP proxies x1e4
  NormSoftmax        bn_inception, GAP, emb 512, Adam eps 0.01, lr 1e-4, proxies x100, wd 1e-4, StepLR 50/0.1,
                     batch 128, 130 epochs, frozen BN, scale 23
  ProxyISA           Proxy-Anchor's backbone and head, Adam lr 1e-4 (SOP/In-shop AdamW 6e-4), proxies x100, wd 1e-4,
                     StepLR 10/0.5, batch 128, 100 epochs, warm-up 1 (CUB/Cars 0); k 0.9 (Cars 0.4, In-shop 0.1),
                     V 100, lam 0.1, memory 55,000, memory from epoch 2, outlier filter from epoch 3 (0-indexed)
  Moving             asymptotic proxies: resnet50, GMP + LayerNorm, emb 512, Adam lr 1e-4 wd 0, StepLR at half the
                     30 epochs (x0.1), batch 128, frozen BN, crop 256/resize 292, temperature 0.03, momentum 0.5
                     (SOP/In-shop lr 4e-5, temperature 0.05, momentum 0.95); proxies moved, not trained, not clipped
  IDML               resnet50, GAP+GMP, semantic + uncertainty heads, emb 512, AdamW lr 6e-4 (Cars 2.5e-4), proxies x100,
                     wd 1e-4, StepLR 5/0.5 (Cars 10/0.5, SOP 10/0.25), batch 120, warm-up 5, frozen BN, 60 epochs,
                     mixup on, uncertainty L2-normalised as released (--uncertainty-l2-norm off lets it carry ||v||)
  --proxy-synthesis  wraps ProxyAnchor, ProxyNCA or NormSoftmax (published with NormSoftmax: 0.4,1.0)
  --shard-proxies    under torchrun, each process holds 1/N of the proxies and their optimizer state; the loss is
                     the whole global batch's (ProxyAnchor, ProxyNCA, NormSoftmax, IDML; dmlfast/sharded.py)
  --mixup            image-level mixup, lambda ~ Beta(1,1): adds lambda L(x_mix,y) + (1-lambda) L(x_mix,y_perm) (IDML: on)
  all                gradient values clipped at 10 (Moving: not clipped)
  folder, csv        your own data: the loss's recipe above on resnet50 with torchvision's ImageNet weights
                     (--model smallcnn: from scratch, BN trained, lr 2e-3, no warm-up)

weights: --weights imagenet uses torchvision's download/cache (ResNet-50: IMAGENET1K_V1, as in the papers);
  BN-Inception's weights are not in torchvision: download bn_inception-52deb4733.pth from
  https://github.com/Cadene/pretrained-models.pytorch and pass --weights PATH.

examples:
  python -m dmlfast.train                                   # glyphs, CPU or GPU, a few minutes
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --weights ~/bn_inception-52deb4733.pth
  python -m dmlfast.train --dataset SOP --data-root ~/data/SOP --model resnet50 --loss ProxyAnchor
  python -m dmlfast.train --dataset Cars196 --data-root ~/data/Cars --loss ProxyISA --k 0.4
  python -m dmlfast.train --loss NormSoftmax --proxy-synthesis 0.4,1.0 --binary-eval
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --loss IDML --weights imagenet
  python -m dmlfast.train --output runs/glyphs --resume     # continue a killed run
  torchrun --nproc-per-node 4 -m dmlfast.train --dataset SOP --data-root ~/data/SOP --model resnet50 --batch-size 30
                                                            # 4 GPUs, 4 x 30 images per step; rank 0 prints and writes
  python -m dmlfast.train --dataset folder --data-root ~/photos --test-classes 0.5   # DIR/<class>/<image>
  python -m dmlfast.train --dataset csv --data-root ~/shop --list ~/shop/list.csv    # path,label[,split] rows
  python -m dmlfast.evaluate --checkpoint runs/glyphs/best.pt
"""


def _alpha_mu(text: str):
    """``"ALPHA,MU"`` -> (alpha, mu) for --proxy-synthesis."""
    try:
        alpha, mu = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA,MU such as 0.4,1.0, got {text!r}") from None
    if not (alpha > 0 and 0 <= mu <= 1):
        raise argparse.ArgumentTypeError(f"ALPHA must be > 0 and MU in [0, 1], got {text!r}")
    return alpha, mu


def _test_classes(text: str):
    """``--test-classes``: an int N or a fraction in (0, 1)."""
    from dmlfast.data import parse_test_classes

    try:
        return parse_test_classes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line; options left out (``None``) take the recipe's value."""
    from dmlfast.data import DATASETS
    from dmlfast.models import BACKBONES, POOLINGS
    from dmlfast.recipes import LOSSES, OPTIMIZERS

    p = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                                description="Train an embedding network with a fused proxy loss; evaluates Recall@K and "
                                            "MAP@R on the held-out classes before training and every --eval-every epochs.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="glyphs", choices=list(DATASETS), metavar="NAME",
                   help=f"one of {', '.join(DATASETS)} (default: glyphs, built in)")
    g.add_argument("--data-root", type=Path, metavar="DIR", help="the dataset's folder (glyphs: where to render it, default ~/.cache/dmlfast)")
    g.add_argument("--list", type=Path, metavar="FILE.csv", help="--dataset csv: rows path,label[,split] (paths relative to "
                   "--data-root; split train|test|query|gallery); looked up as given, else under --data-root")
    g.add_argument("--test-classes", type=_test_classes, metavar="N|FRACTION",
                   help="--dataset folder/csv without a train/test split: hold out N classes (or this fraction of them), "
                        "drawn from --seed")
    g.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="image loader: NVIDIA DALI or torchvision; auto = DALI on CUDA when installed, else torchvision "
                        "(on a CPU, DALI's threads compete with the training for the cores)")
    g.add_argument("--workers", type=int, default=2, metavar="N", help="loader worker processes / DALI threads (default: 2; 0 = load in the main process)")
    g.add_argument("--image-size", type=int, metavar="PX", help="training/evaluation crop size (recipe: the dataset's default)")
    g.add_argument("--samples-per-class", type=int, metavar="M", help="class-balanced batches with M images per class (recipe; 0 = random batches)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=BACKBONES, metavar="NAME", help=f"backbone: {', '.join(BACKBONES)} (recipe)")
    g.add_argument("--weights", metavar="imagenet|none|PATH", help="backbone initialisation: torchvision ImageNet weights, random, or a local state dict (recipe)")
    g.add_argument("--embedding-size", type=int, metavar="D", help="embedding dimension (recipe)")
    g.add_argument("--pooling", choices=POOLINGS, help="global pooling of the feature map (recipe)")
    g.add_argument("--freeze-bn", choices=("on", "off"), help="keep BatchNorm statistics and affine parameters frozen (recipe)")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--loss", default="ProxyAnchor", choices=LOSSES, metavar="NAME", help=f"{', '.join(LOSSES)} (default: ProxyAnchor)")
    g.add_argument("--k", type=float, help="ProxyISA: width of the informative band (recipe: 0.9; Cars196 0.4, In-shop 0.1)")
    g.add_argument("--temperature", type=float, help="Moving: softmax temperature (recipe: 0.03; SOP/In-shop 0.05)")
    g.add_argument("--momentum", type=float, help="Moving: weight of the batch's class sums in the proxy update (recipe: 0.5; SOP/In-shop 0.95)")
    g.add_argument("--proxy-synthesis", metavar="ALPHA,MU", type=_alpha_mu,
                   help="wrap the loss in Proxy Synthesis with lambda ~ Beta(ALPHA, ALPHA) and MU*B synthetic classes per batch (published: 0.4,1.0)")
    g.add_argument("--mixup", nargs="?", const="on", choices=("on", "off"),
                   help="image-level mixup each step (a second forward), for the stateless losses; bare --mixup = on "
                        "(recipe: on for IDML, off otherwise)")
    g.add_argument("--uncertainty-l2-norm", choices=("on", "off"),
                   help="IDML: L2-normalise the uncertainty embedding (recipe: on, as released, which leaves the "
                        "uncertainty head without gradient)")
    g.add_argument("--shard-proxies", action="store_true",
                   help="class-sharded proxies: each torchrun process holds 1/N of the proxies and their optimizer state "
                        "(ProxyAnchor, ProxyNCA, NormSoftmax, IDML); the loss is that of the global batch against all proxies")
    g.add_argument("--binary-eval", action="store_true", help="also report the metrics of sign-binarised embeddings")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (recipe)")
    g.add_argument("--lr", type=float, help="backbone learning rate (recipe)")
    g.add_argument("--proxy-lr-mult", type=float, metavar="X", help="proxies' learning rate = X * lr (recipe)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay of every group (recipe)")
    g.add_argument("--batch-size", type=int, metavar="B", help="images per training batch, per process under torchrun (recipe)")
    g.add_argument("--epochs", type=int, metavar="E", help="training epochs (recipe)")
    g.add_argument("--warmup-epochs", type=int, metavar="W", help="first epochs training only the embedding and proxies (recipe)")
    g.add_argument("--lr-step", type=int, metavar="S", help="StepLR period in epochs, 0 = constant (recipe)")
    g.add_argument("--lr-gamma", type=float, metavar="G", help="StepLR factor (recipe)")
    g.add_argument("--grad-clip", type=float, metavar="V", help="clip gradient values at +-V, 0 = off (recipe: 10)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); under torchrun "
                   "cuda (each process on cuda:LOCAL_RANK, NCCL) or cpu (gloo)")
    g.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype: bf16, fp16 (with GradScaler) or off; auto = bf16 on CUDA, off on CPU")
    g.add_argument("--eval-every", type=int, default=1, metavar="N", help="evaluate every N epochs and after the last (default: 1)")
    g.add_argument("--output", type=Path, default=Path("runs/train"), metavar="DIR", help="folder for checkpoints, config and logs (default: runs/train)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt (starts afresh when there is none); "
                   "with as many processes as wrote it")
    g.add_argument("--seed", type=int, default=1, help="seed of initialisation, batches and augmentation (default: 1, as Proxy-Anchor)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--tensorboard", action="store_true", help="mirror log.jsonl's scalars to TensorBoard events in OUTPUT/tensorboard "
                   "(pip install tensorboard)")
    g.add_argument("--wandb", action="store_true", help="mirror them to a Weights & Biases run in OUTPUT/wandb, offline unless "
                   "WANDB_MODE says otherwise (pip install wandb)")
    return p


def make_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The final configuration: the recipe for (dataset, loss, model) with the given flags applied."""
    from dmlfast.recipes import resolve_recipe

    try:
        recipe = resolve_recipe(args.dataset, args.loss, args.model)
    except ValueError as error:
        raise UsageError(str(error)) from error
    overrides = {name: getattr(args, name) for name in ("weights", "embedding_size", "pooling", "optimizer", "lr", "proxy_lr_mult",
                                                         "weight_decay", "batch_size", "epochs", "warmup_epochs", "lr_step",
                                                         "lr_gamma", "grad_clip", "image_size", "samples_per_class")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.freeze_bn is not None:
        overrides["freeze_bn"] = args.freeze_bn == "on"
    if overrides.get("samples_per_class") == 0:
        overrides["samples_per_class"] = None
    if "image_size" in overrides:
        overrides["resize_size"] = None
    if args.proxy_synthesis is not None:
        overrides["proxy_synthesis"] = args.proxy_synthesis
    if args.mixup is not None:
        if args.loss in ("ProxyISA", "Moving"):
            raise UsageError(f"--mixup does not apply to --loss {args.loss}: its per-step state update would run on "
                             "the mixed batch too")
        overrides["mixup"] = args.mixup == "on"
    if args.uncertainty_l2_norm is not None:
        if args.loss != "IDML":
            raise UsageError(f"--uncertainty-l2-norm does not apply to --loss {args.loss}")
        overrides["normalize_uncertainty"] = args.uncertainty_l2_norm == "on"
    loss_flags = {"k": args.k, "temperature": args.temperature, "momentum": args.momentum}
    for name, value in loss_flags.items():
        if value is None:
            continue
        if name not in recipe.loss_kwargs:
            raise UsageError(f"--{name} does not apply to --loss {args.loss}")
        overrides.setdefault("loss_kwargs", dict(recipe.loss_kwargs))[name] = value
    config = recipe.replace(**overrides).to_dict()
    config.update(dataset=args.dataset, data_root=None if args.data_root is None else str(args.data_root), loss=args.loss,
                  device=args.device, amp=args.amp, loader=args.loader, workers=args.workers, eval_every=args.eval_every,
                  output=str(args.output), resume=args.resume, seed=args.seed, progress=args.progress,
                  ks=list(DATASET_KS[args.dataset]), binary_eval=args.binary_eval,
                  data_list=None if args.list is None else str(args.list), test_classes=args.test_classes,
                  tensorboard=args.tensorboard, wandb=args.wandb, shard_proxies=args.shard_proxies)
    _check_config(config)
    return config


def _check_config(c: Dict[str, Any]) -> None:
    positive = ("embedding_size", "batch_size", "epochs", "eval_every")
    for name in positive:
        if c[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {c[name]}")
    for name in ("warmup_epochs", "lr_step", "workers"):
        if c[name] < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    for name in ("lr", "proxy_lr_mult", "lr_gamma"):
        if not (c[name] > 0 and math.isfinite(c[name])):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {c[name]}")
    for name in ("weight_decay", "grad_clip"):
        if not (c[name] >= 0 and math.isfinite(c[name])):
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if c["image_size"] is not None and c["image_size"] < 8:
        raise UsageError(f"--image-size must be at least 8, got {c['image_size']}")
    m = c["samples_per_class"]
    if m is not None and (m < 1 or c["batch_size"] % m):
        raise UsageError(f"--samples-per-class must be >= 1 and divide --batch-size ({c['batch_size']}), got {m}")
    if c["dataset"] != "glyphs" and c["data_root"] is None:
        raise UsageError(f"--dataset {c['dataset']} needs --data-root DIR, the folder holding it")
    if c["data_root"] is not None and c["dataset"] != "glyphs" and not Path(c["data_root"]).is_dir():
        raise UsageError(f"--data-root: no such folder: {c['data_root']}")
    check_dataset_options(c)
    check_shard_proxies(c)
    from dmlfast.training import TrackingUnavailableError, check_trackers

    try:
        check_trackers(c.get("tensorboard", False), c.get("wandb", False))
    except TrackingUnavailableError as error:
        raise UsageError(str(error)) from error
    if c["weights"] not in ("imagenet", "none") and not Path(c["weights"]).is_file():  # before any data is prepared
        raise UsageError(f"--weights: no such file: {c['weights']} (give 'imagenet', 'none' or the path of a state dict)")


def check_shard_proxies(c: Dict[str, Any]) -> None:
    """``--shard-proxies`` only for the losses :mod:`dmlfast.sharded` has, without Proxy Synthesis."""
    if not c.get("shard_proxies"):
        return
    from dmlfast.sharded import SHARDED_LOSSES

    if c["loss"] not in SHARDED_LOSSES:
        raise UsageError(f"--shard-proxies: class-sharded proxies exist for --loss {', '.join(SHARDED_LOSSES)}, not {c['loss']}")
    if c["proxy_synthesis"] is not None:
        raise UsageError("--shard-proxies cannot be combined with --proxy-synthesis (its synthetic proxies mix rows of "
                         "every shard)")


def check_dataset_options(c: Dict[str, Any]) -> None:
    """``--list`` only and always with ``--dataset csv``; ``--test-classes`` only with folder/csv."""
    if c["dataset"] == "csv" and c.get("data_list") is None:
        raise UsageError("--dataset csv needs --list FILE.csv, the rows path,label[,split]")
    if c["dataset"] != "csv" and c.get("data_list") is not None:
        raise UsageError(f"--list applies to --dataset csv, not {c['dataset']}")
    if c["dataset"] not in ("folder", "csv") and c.get("test_classes") is not None:
        raise UsageError(f"--test-classes applies to --dataset folder or csv, not {c['dataset']}")


def dataset_options(config: Dict[str, Any]) -> Dict[str, Any]:
    """The ``load_dataset`` options of ``config``: list file, held-out classes and seed for folder/csv."""
    if config["dataset"] not in ("folder", "csv"):
        return {}
    options = {"test_classes": config.get("test_classes"), "seed": config["seed"]}
    if config["dataset"] == "csv":
        options["list_file"] = config.get("data_list")
    return options


def resolve_device(name: Optional[str]):
    """``torch.device`` for ``--device`` (default: cuda when available); ``UsageError`` when it cannot be used."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (no GPU, or torch without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_loader(name: str, device) -> str:
    """``"dali"`` or ``"torch"`` for ``--loader name``; ``UsageError`` when DALI is asked for and missing."""
    from dmlfast.data import DALI_INSTALL_HINT, dali_available

    if name not in ("auto", "dali", "torch"):
        raise UsageError(f"--loader must be auto, dali or torch, got {name!r}")
    if name == "dali" and not dali_available():
        raise UsageError(f"--loader dali: NVIDIA DALI is not installed ({DALI_INSTALL_HINT}); or use --loader torch")
    if name == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    return name


def amp_dtype(mode: str, device) -> Optional["torch.dtype"]:
    """The autocast dtype of ``--amp mode`` on ``device`` (``None``: float32)."""
    import torch

    if mode not in AMP_MODES:
        raise ValueError(f"amp_dtype: mode must be one of {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def load_splits(config: Dict[str, Any]):
    """The dataset's splits; missing data becomes a one-line ``UsageError`` with the fix."""
    from dmlfast.data import DatasetLayoutError, load_dataset

    try:
        return load_dataset(config["dataset"], config["data_root"], **dataset_options(config))
    except DatasetLayoutError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        if config["dataset"] in ("folder", "csv"):  # the user's own data: the reader's message says what to fix
            raise UsageError(" ".join(lines)) from error
        source = next((line for line in lines if "published at" in line), "")
        hint = f"; {source}" if source else ""
        raise UsageError(f"{lines[0]}{hint}; point --data-root at the extracted dataset (layouts: help(dmlfast.data))") from error


def make_loss(config: Dict[str, Any], num_classes: int):
    """The loss module named by ``config['loss']`` with its proxies for ``num_classes`` classes."""
    import dmlfast

    classes = {"ProxyAnchor": dmlfast.ProxyAnchorLoss, "ProxyNCA": dmlfast.ProxyNCALoss, "NormSoftmax": dmlfast.NormSoftmaxLoss,
               "ProxyISA": dmlfast.ProxyISALoss, "Moving": dmlfast.MovingProxyLoss,
               "IDML": dmlfast.IntrospectiveProxyAnchorLoss}
    if config["loss"] not in classes:
        raise UsageError(f"unknown loss {config['loss']!r}; choose one of {', '.join(classes)}")
    try:
        if config.get("shard_proxies"):
            from dmlfast.sharded import make_sharded_loss

            return make_sharded_loss(config["loss"], num_classes, config["embedding_size"], **config["loss_kwargs"])
        loss_fn = classes[config["loss"]](num_classes, config["embedding_size"], **config["loss_kwargs"])
    except (ValueError, TypeError) as error:
        raise UsageError(f"--loss {config['loss']}: {error}") from error
    if config["proxy_synthesis"] is not None:
        if config["loss"] not in ("ProxyAnchor", "ProxyNCA", "NormSoftmax"):
            raise UsageError(f"--proxy-synthesis wraps ProxyAnchor, ProxyNCA or NormSoftmax, not {config['loss']}")
        alpha, mu = config["proxy_synthesis"]
        loss_fn = dmlfast.ProxySynthesis(loss_fn, alpha=alpha, mu=mu)
    return loss_fn


def make_model(config: Dict[str, Any]):
    """The embedding model of ``config`` (weights loaded as ``config['weights']`` says)."""
    from dmlfast.models import WeightsUnavailableError, build_model

    try:
        return build_model(config["model"], config["embedding_size"], weights=config["weights"], pooling=config["pooling"],
                           layer_norm=config["layer_norm"], freeze_bn=config["freeze_bn"],
                           uncertainty_head=config.get("loss") == "IDML",
                           normalize_uncertainty=config.get("normalize_uncertainty", True))
    except WeightsUnavailableError as error:
        raise UsageError(str(error)) from error


def restore_model(config: Dict[str, Any], model_state: Dict[str, Any], device):
    """The model of a checkpoint's ``config`` (no pretrained download) with ``model_state`` loaded,
    on ``device``; ``UsageError`` when the state does not fit that configuration."""
    model = make_model(dict(config, weights="none"))
    try:
        model.load_state_dict(model_state)
    except RuntimeError as error:
        raise UsageError(f"--checkpoint: the model state does not fit the configuration saved with it ({error})") from error
    return model.to(device)


def make_eval_loaders(config: Dict[str, Any], splits, device):
    """``(query loader, reference loader or None)``: the test split against itself, or In-shop's query
    vs gallery; under torchrun each rank's loaders yield its shard (global batches rank, rank + N, ...)."""
    from dmlfast.data import make_loader
    from dmlfast.models import NORMALIZATION
    from dmlfast.training import distributed

    kw = dict(train=False, batch_size=max(256, config["batch_size"]), device=device, loader=config["loader"],
              image_size=config["image_size"], normalization=NORMALIZATION[config["model"]], num_workers=config["workers"],
              shard_id=distributed.rank(), num_shards=distributed.world_size())
    if config["image_size"] is not None and config["resize_size"] is not None:
        kw["resize_size"] = config["resize_size"]
    if splits.test is not None:
        return make_loader(splits.test, **kw), None
    return make_loader(splits.query, **kw), make_loader(splits.gallery, **kw)


def embed(model, loader, device, dtype, progress: bool, desc: str, dim: Optional[int] = None):
    """Embeddings (float32, on ``device``) and labels of every image of ``loader``, in order. A loader
    with no batch (a rank's share of a small set) gives empty tensors with ``dim`` columns
    (``ValueError`` when ``dim`` is not given)."""
    import torch
    from tqdm import tqdm

    model.eval()
    embeddings, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for images, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            embeddings.append(model(images).float())
            labels.append(y)
    if not embeddings:
        if dim is None:
            raise ValueError(f"embed: {desc}: the loader yielded no batch; pass dim to get empty embeddings")
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(embeddings), torch.cat(labels)


def embed_all(model, loader, device, dtype, progress: bool, desc: str, dim: int):
    """:func:`embed` over the whole set: under torchrun each rank embeds its shard of ``loader`` and
    the rows of all ranks are gathered back into the dataset's order (the single-process result)."""
    from dmlfast.training import distributed

    embeddings, labels = embed(model, loader, device, dtype, progress, desc, dim)
    positions = [i for batch in loader.sampler for i in batch]
    return distributed.gather_in_order((embeddings, labels), positions, len(loader.sampler.labels))


def evaluate_model(model, loaders, config: Dict[str, Any], device, dtype, progress: bool) -> Dict[str, float]:
    """Recall@K (the dataset's Ks), MAP@R and R-Precision of ``model`` on the held-out classes.

    Under torchrun the loaders are sharded (:func:`make_eval_loaders`): every rank embeds its share,
    rank 0 computes the metrics on the gathered embeddings and every rank returns rank 0's dict."""
    from dmlfast.training import distributed

    query_loader, reference_loader = loaders
    dim = config["embedding_size"]
    q, ql = embed_all(model, query_loader, device, dtype, progress, "embed test", dim)
    reference = reference_labels = None
    if reference_loader is not None:
        reference, reference_labels = embed_all(model, reference_loader, device, dtype, progress, "embed gallery", dim)
    result = _retrieval_metrics(q, ql, reference, reference_labels, config) if distributed.is_main() else None
    return distributed.broadcast_object(result)


def _retrieval_metrics(q, ql, reference, reference_labels, config: Dict[str, Any]) -> Dict[str, float]:
    """:func:`evaluate_model`'s dict from the embeddings and labels of the whole query (and reference) set."""
    from dmlfast.evaluation import retrieval_metrics

    count = len(reference_labels) if reference_labels is not None else len(ql) - 1
    ks = tuple(k for k in config["ks"] if k <= count)
    labels = None if reference_labels is None else reference_labels.cpu().numpy()
    keys = ("recall@", "map@r", "r_precision")
    metrics = retrieval_metrics(q, ql.cpu().numpy(), ks=ks, reference=reference, reference_labels=labels,
                                metrics=("recall", "map@r", "r_precision"), progress=False)
    result = {k: float(v) for k, v in metrics.items() if k.startswith(keys)}
    if config.get("binary_eval"):
        binary = retrieval_metrics(q, ql.cpu().numpy(), ks=ks, reference=reference, reference_labels=labels,
                                   metrics=("recall", "map@r", "r_precision"), binary=True, progress=False)
        result.update({f"binary_{k}": float(v) for k, v in binary.items() if k.startswith(keys)})
    return result


def _param_groups(model, loss_fn, config):
    groups = [
        {"name": "backbone", "params": model.backbone_parameters(), "lr": config["lr"]},
        {"name": "embedding", "params": model.embedding_parameters(), "lr": config["lr"] * config["embedding_lr_mult"]},
        {"name": "proxies", "params": list(loss_fn.parameters()), "lr": config["lr"] * config["proxy_lr_mult"]},
    ]
    return [group for group in groups if group["params"]]  # moving proxies are a buffer: no group


def make_optimizer(model, loss_fn, config):
    """AdamW / Adam / SGD (momentum 0.9, Nesterov) over the backbone, embedding and proxy groups."""
    import torch

    groups = _param_groups(model, loss_fn, config)
    wd = config["weight_decay"]
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=wd, eps=config["adam_eps"])
    if config["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=config["lr"], weight_decay=wd, eps=config["adam_eps"])
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], weight_decay=wd, momentum=0.9, nesterov=True)
    raise UsageError(f"unknown optimizer {config['optimizer']!r}")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` of a run seeded ``seed`` (torch, numpy and random are reseeded with it)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _compare_configs(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    saved = {**LATER_KEYS, **saved}
    differ = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now" for k in differ[:4])
        raise UsageError(f"--resume: {path} is from another configuration ({shown}); use the same flags or another --output")


def format_summary(before: Dict[str, float], after: Dict[str, float], best: Dict[str, Any], seconds: float,
                   images_per_s: float) -> str:
    """The end-of-run table: each metric before and after training, the best epoch, time and speed."""
    names = [k for k in before if k.startswith("recall@")] + ["map@r"]
    names += [k for k in before if k.startswith("binary_recall@")] + [k for k in before if k == "binary_map@r"]
    lines = [f"{'metric':<18}{'before':>9}{'after':>9}{'change':>9}", "-" * 45]
    for name in names:
        b, a = before.get(name, float("nan")), after.get(name, float("nan"))
        lines.append(f"{name:<18}{100 * b:>9.2f}{100 * a:>9.2f}{100 * (a - b):>+9.2f}")
    lines.append("-" * 45)
    lines.append(f"best Recall@1 {100 * best['recall@1']:.2f} at epoch {best['epoch']}")
    lines.append(f"time {seconds:.1f} s, training {images_per_s:.0f} images/s")
    return "\n".join(lines)


def train(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run (or resume) the training ``config`` describes; returns ``{"before", "after", "best", "history", ...}``.

    Under torchrun (``WORLD_SIZE`` > 1) this process joins the process group on its own device for
    the run, left again at the end (errors included), and trains data-parallel (module docstring);
    ``config["world_size"]`` is set to the number of processes (1 otherwise)."""
    from dmlfast.training import distributed

    try:
        processes = distributed.requested_world_size()
        if processes > 1 and config["loss"] == "ProxyISA":
            raise UsageError(f"--loss ProxyISA cannot train in {processes} processes: its per-class counters and cross-batch "
                             "memory are updated inside the loss from the local batch, so the ranks would diverge; "
                             "run it in one process")
        device = distributed.device_for_rank(config["device"], distributed.local_rank()) if processes > 1 \
            else resolve_device(config["device"])
        with distributed.process_group(device):
            return _train(dict(config, world_size=processes), device)
    except distributed.DistributedSetupError as error:
        raise UsageError(str(error)) from error


def _check_world_size(saved: Dict[str, Any], current: Dict[str, Any], path: Path) -> None:
    """``UsageError`` unless the checkpoint's run had as many processes as this one (checkpoints from
    before multi-process training record none: 1)."""
    written, now = saved.get("world_size", 1), current["world_size"]
    if written != now:
        how = "python -m dmlfast.train" if written == 1 else f"torchrun --nproc-per-node {written}"
        raise UsageError(f"--resume: {path} was written by {written} process(es), this run has {now}; the batches, their "
                         f"shards and the optimizer steps depend on it: resume with {how}, or start afresh in another --output")


def _load_proxy_shard(last_path: Path, config: Dict[str, Any], epoch: int) -> Dict[str, Any]:
    """This rank's ``{"loss", "optimizer"}`` state saved beside ``last_path`` by a run with sharded
    proxies; ``UsageError`` when it is missing or from another epoch than ``last_path`` (``epoch``)."""
    from dmlfast.training import CheckpointError, distributed, load_checkpoint

    path = distributed.shard_checkpoint_path(last_path, distributed.rank(), config["world_size"])
    try:
        shard = load_checkpoint(path)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error} (with --shard-proxies every process saves its proxies there)") from error
    if shard["epoch"] != epoch:
        raise UsageError(f"--resume: {path} holds the proxies after epoch {shard['epoch']}, {last_path} the model after "
                         f"epoch {epoch} (a run stopped while saving); start afresh in another --output")
    return shard


def _train(config: Dict[str, Any], device) -> Dict[str, Any]:
    """:func:`train`'s run on ``device``, inside the process group when there is one; ``config`` has ``world_size``."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from dmlfast.data import make_loader
    from dmlfast.models import NORMALIZATION
    from dmlfast.training import (CheckpointError, NullLogger, RunLogger, distributed, load_checkpoint, mixup_loss, plot_curves,
                                  rng_state, save_checkpoint, set_rng_state)

    start_time = time.perf_counter()
    dtype = amp_dtype(config["amp"], device)
    config = dict(config, loader=resolve_loader(config["loader"], device))
    world, main = config["world_size"], distributed.is_main()
    say = distributed.print_main
    out = Path(config["output"])
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if config["resume"] and last_path.is_file():
        try:
            state = load_checkpoint(last_path)
        except CheckpointError as error:
            raise UsageError(f"--resume: {error}") from error
        _check_world_size(state["config"], config, last_path)
        _compare_configs(dict(state["config"], world_size=config["world_size"]), config, last_path)
    elif not config["resume"] and last_path.is_file():
        raise UsageError(f"--output {out} already holds a run (last.pt); pass --resume to continue it or choose another --output")
    distributed.barrier()  # every rank has looked at last.pt before rank 0 writes anything
    progress = config["progress"] and main

    with distributed.main_first():  # a dataset rendered or weights downloaded into a shared cache: by rank 0 alone
        splits = load_splits(config)
        _seed_everything(config["seed"])
        model = make_model(config).to(device)
    loss_fn = make_loss(config, splits.train.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, loss_fn, config)
    step_size = config["lr_step"] if config["lr_step"] > 0 else 10**9
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=config["lr_gamma"])
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    if len(splits.train) < config["batch_size"] * world:
        processes = f" x {world} processes" if world > 1 else ""
        raise UsageError(f"--batch-size {config['batch_size']}{processes} is larger than the training set ({len(splits.train)} images)")
    train_loader = make_loader(splits.train, train=True, batch_size=config["batch_size"], device=device, loader=config["loader"],
                               image_size=config["image_size"], resize_size=config["resize_size"] if config["image_size"] else None,
                               normalization=NORMALIZATION[config["model"]], samples_per_class=config["samples_per_class"],
                               seed=config["seed"], num_workers=config["workers"], shard_id=distributed.rank(), num_shards=world)
    eval_loaders = make_eval_loaders(config, splits, device)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    say("configuration:\n" + "\n".join(f"  {k}: {v}" for k, v in config.items()))
    say(f"device {device}, autocast {dtype or 'off'}, loader {train_loader.backend}, train {splits.train!r}")
    if world > 1:
        say(f"data-parallel: {world} processes ({distributed.backend_for(device)}), global batch {world} x "
            f"{config['batch_size']} = {world * config['batch_size']} images per step")
    logger = RunLogger(out, tensorboard=config.get("tensorboard", False), wandb=config.get("wandb", False), config=config) \
        if main else NullLogger()

    sharded = bool(config.get("shard_proxies"))
    if state is not None:
        model.load_state_dict(state["model"])
        own = _load_proxy_shard(last_path, config, state["epoch"]) if sharded else state
        loss_fn.load_state_dict(own["loss"])
        optimizer.load_state_dict(own["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        say(f"resumed from {last_path} after epoch {start_epoch}")
    else:
        before = evaluate_model(model, eval_loaders, config, device, dtype, progress)
        history = [{"epoch": 0, "loss": None, **before}]
        best = {"epoch": 0, "recall@1": before["recall@1"]}
        start_epoch = 0
        logger.log("eval", 0, epoch=0, **before)
        say(f"before training: Recall@1 {100 * before['recall@1']:.2f}, MAP@R {100 * before['map@r']:.2f}")

    def save(epoch: int, *paths: Path) -> None:
        """The checkpoint after ``epoch`` to ``paths``, written by the rank(s) :func:`writes_checkpoints` names.
        With sharded proxies, every rank also writes its proxies and optimizer state beside each path
        (:func:`distributed.shard_checkpoint_path`); the main file then holds neither."""
        own = {"loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict()}
        if sharded:
            for path in paths:
                save_checkpoint({"config": config, "epoch": epoch, **own},
                                distributed.shard_checkpoint_path(path, distributed.rank(), world))
        if not distributed.writes_checkpoints():
            return
        state_now = {"config": config, "epoch": epoch, "model": model.state_dict(), **(dict.fromkeys(own) if sharded else own),
                     "scheduler": scheduler.state_dict(), "scaler": None if scaler is None else scaler.state_dict(),
                     "rng": rng_state(), "history": history, "best": best}
        for path in paths:
            save_checkpoint(state_now, path)

    if state is None:
        save(0, last_path, best_path)
    step = start_epoch * len(train_loader)
    images_seen, train_seconds = 0, 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    proxy_params = list(loss_fn.parameters())  # empty for moving proxies (a buffer)
    backbone_params = model.backbone_parameters()  # fixed now: warm-up toggles requires_grad on them
    model_inputs = distributed.LossInputs(model, uncertainty=config["loss"] == "IDML")
    replicated_for, forward, criterion = None, model_inputs, loss_fn

    def loss_inputs(images):
        """The model outputs the loss takes before the labels: (μ,), or IDML's (μ, v)."""
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return forward(images)

    for epoch in range(start_epoch + 1, config["epochs"] + 1):
        _seed_everything(epoch_seed(config["seed"], epoch))
        train_loader.set_epoch(epoch)
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch - 1)  # the losses count epochs from 0
        warm = epoch <= config["warmup_epochs"]
        for p in backbone_params:
            p.requires_grad_(not warm)
        if distributed.trainable_signature(model_inputs, loss_fn) != replicated_for:  # first epoch, end of warm-up
            forward = criterion = None  # the old DDP wrappers go before the new ones hook the parameters
            forward, criterion = distributed.replicate(model_inputs, loss_fn, device, sharded_loss=sharded)
            replicated_for = distributed.trainable_signature(model_inputs, loss_fn)
        model.train()
        losses = []
        epoch_start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config['epochs']}" + (" (warm-up)" if warm else ""),
                   disable=not progress, unit="batch", dynamic_ncols=True)
        for images, labels in bar:
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            inputs = loss_inputs(images)
            loss = criterion(*inputs, labels)
            if config.get("mixup"):
                loss = loss + mixup_loss(loss_inputs, criterion, images, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config["grad_clip"] > 0:
                torch.nn.utils.clip_grad_value_(params, config["grad_clip"])
                if config["clip_proxies"] and proxy_params:
                    torch.nn.utils.clip_grad_value_(proxy_params, config["grad_clip"])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if hasattr(loss_fn, "update_proxies"):  # every rank moves its copy by the whole global batch
                loss_fn.update_proxies(distributed.all_gather_rows(inputs[0].detach()), distributed.all_gather_rows(labels))
            value = distributed.mean_over_ranks(loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at epoch {epoch}, step {step}; lower --lr or use --amp off")
            losses.append(value)
            step += 1
            images_seen += len(labels) * world
            rate = len(losses) * config["batch_size"] * world / max(time.perf_counter() - epoch_start, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.0f}")
            logger.log("step", step, epoch=epoch, loss=value, lr=optimizer.param_groups[0]["lr"], images_per_s=rate)
        train_seconds += time.perf_counter() - epoch_start
        distributed.sync_buffers(model)
        scheduler.step()
        record = {"epoch": epoch, "loss": float(np.mean(losses))}
        if epoch % config["eval_every"] == 0 or epoch == config["epochs"]:
            metrics = evaluate_model(model, eval_loaders, config, device, dtype, progress)
            record.update(metrics)
            say(f"epoch {epoch}: loss {record['loss']:.4f}, Recall@1 {100 * metrics['recall@1']:.2f}, "
                f"MAP@R {100 * metrics['map@r']:.2f}")
        else:
            say(f"epoch {epoch}: loss {record['loss']:.4f}")
        history.append(record)
        logger.log("epoch", step, **record)
        improved = record.get("recall@1", -1.0) > best["recall@1"]
        if improved:
            best = {"epoch": epoch, "recall@1": record["recall@1"]}
        save(epoch, *((best_path, last_path) if improved else (last_path,)))
    logger.close()
    evaluated = [h for h in history if "recall@1" in h]
    before, after = evaluated[0], evaluated[-1]
    seconds = time.perf_counter() - start_time
    images_per_s = images_seen / train_seconds if train_seconds > 0 else float("nan")
    summary = {"before": before, "after": after, "best": best, "history": history, "seconds": seconds, "images_per_s": images_per_s}
    if main:
        plot_curves(history, out / "curves.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say(format_summary(before, after, best, seconds, images_per_s))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for user errors, printed as one line;
    under torchrun each failing process prints its line, naming its rank)."""
    return run_command(f"{PROG}{_rank_tag()}", lambda args: train(make_config(args)), build_parser().parse_args(argv))


def _rank_tag() -> str:
    """`` (rank R)`` in a torchrun process (``WORLD_SIZE`` > 1), else empty."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
