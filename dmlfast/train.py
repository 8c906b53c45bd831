"""``python -m dmlfast.train``: train an embedding network with a fused proxy loss and a published recipe.

With no arguments it trains a small CNN with Proxy-Anchor on the built-in glyph set (rendered on
first use, no download) on the CPU or GPU that is there, in a few minutes on a laptop, and prints
Recall@K and MAP@R on the held-out classes before and after training. ``--dataset`` picks a
benchmark (``--data-root`` its folder) and the recipe of ``dmlfast.recipes`` for the dataset, the
loss and the backbone; any flag given overrides the recipe. Run ``python -m dmlfast.train --help``.

Outputs in ``--output``: ``config.json`` (the final configuration), ``last.pt`` (after every epoch;
``--resume`` continues from it), ``best.pt`` (best Recall@1), ``log.jsonl``, ``curves.png`` and,
with ``--tensorboard`` / ``--wandb``, the same scalars as TensorBoard events / an offline W&B run.
One run at a time holds ``--output`` (a lock; a second run is an error naming the live one), and a
folder holding an earlier run's results is continued with ``--resume`` or replaced with
``--overwrite``, never silently. User errors (bad flags, missing data, wrong checkpoint, a full disk,
a diverging loss) print one ``error:`` line and exit with status 2.

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
import sys
from pathlib import Path
from typing import List, Optional

from dmlfast._cli import InputError, Parser, name_choice, parse_test_classes_flag, run_command, share_cores_with_loader
from dmlfast.checks import canonical_name
from dmlfast.training.config import (AMP_MODES, DATASET_KS, LATER_KEYS, RESUMABLE_CHANGES, check_dataset_options,
                                     check_shard_proxies, dataset_options, make_config)
from dmlfast.training.embedding import embed, embed_all, evaluate_model
from dmlfast.training.loop import format_summary, train
from dmlfast.training.setup import (amp_dtype, epoch_seed, load_splits, make_eval_loaders, make_loss, make_model,
                                    make_optimizer, resolve_device, resolve_loader, restore_model)

PROG = "python -m dmlfast.train"

# The command, and the library names (dmlfast.training) that stay importable from this module.
__all__ = ["EPILOG", "PROG", "UsageError", "build_parser", "main",
           "AMP_MODES", "DATASET_KS", "LATER_KEYS", "RESUMABLE_CHANGES", "amp_dtype", "check_dataset_options",
           "check_shard_proxies", "dataset_options", "embed", "embed_all", "epoch_seed", "evaluate_model", "format_summary",
           "load_splits", "make_config", "make_eval_loaders", "make_loss", "make_model", "make_optimizer", "resolve_device",
           "resolve_loader", "restore_model", "train"]

#: The error type of the user's mistakes (:class:`dmlfast.checks.InputError`), under this module's name for it.
UsageError = InputError


EPILOG = """\
recipes (dmlfast/recipes.py; every flag below overrides the recipe's value):
  glyphs, Omniglot   smallcnn from scratch, emb 128, batch 128, AdamW lr 2e-3 (proxies x100), StepLR 4/0.3, 8 epochs
                     (Omniglot: 32 px, StepLR 5/0.3, 10 epochs)
  ProxyAnchor        bn_inception, emb 512, batch 180 (resnet50 120), AdamW lr 1e-4, proxies x100, wd 1e-4,
                     StepLR 10/0.5, warm-up 1 epoch (resnet50 5), frozen BN, 60 epochs, GAP+GMP;
                     SOP/In-shop lr 6e-4, StepLR 20/0.25, BN trained; Cars bn_inception step 20; resnet50 CUB 5, Cars 10
  ProxyNCA           ProxyNCA++: resnet50, GMP + LayerNorm, emb 2048, Adam eps 1 wd 0, lr 4e-3, proxies x1e5,
                     batch 32 (4 per class), warm-up 5 + 40 epochs, crop 256/resize 288, scale 18; lr x0.1 on a
                     plateau (patience 4) of the Recall@1 of half of the training classes, held out for it; the
                     summary prints the second run's flags (all classes, --lr-schedule multistep at those epochs);
                     SOP/In-shop lr 2.4e-2, batch 192 (3 per class), 5 + 80 epochs, SOP proxies x1e4
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
  SoftTriple         the official code: bn_inception, GAP, emb 64, Adam eps 0.01 lr 1e-4, centers x100, wd 1e-4,
                     StepLR 20/0.1, batch 32, 50 epochs, frozen BN, la 20, gamma 0.1, tau 0.2, margin 0.01, K 10
                     (SOP/In-shop, dmlfast's choice: emb 512, K 2)
  CosFace, ArcFace,  the papers' margins and scales (CosFace 0.35, ArcFace 28.6 degrees, s 64; 3 sub-centers) on
  SubCenterArcFace   SoftTriple's optimisation with emb 512 (dmlfast's choice: their published training is faces')
  --margin, --scale, --centers  the loss's own margin, logit scale and proxies per class (see their help)
  --proxy-synthesis  wraps ProxyAnchor, ProxyNCA or NormSoftmax (published with NormSoftmax: 0.4,1.0)
  --shard-proxies    under torchrun, each process holds 1/N of the proxies and their optimizer state; the loss is
                     the whole global batch's (every loss but ProxyISA and Moving; dmlfast/sharded.py)
  --mixup            image-level mixup, lambda ~ Beta(1,1): adds lambda L(x_mix,y) + (1-lambda) L(x_mix,y_perm) (IDML: on)
  all                gradient values clipped at 10 (Moving: not clipped)
  timm:NAME          a pretrained timm CNN takes ResNet-50's rows (ProxyAnchor: batch 120, 5 warm-up epochs, frozen BN)
  timm:vit_small_patch16_224[.dino] with ProxyAnchor: HIER's ViT-S/16 recipe: class token, LayerNorm, emb 128,
                     patch embedding frozen, AdamW eps 1e-4 lr 1e-5 (dino 5e-6) constant, wd 1e-2, proxies x1e4,
                     batch 180 (2 per class), warm-up 1, 100 epochs, crops of scale 0.2-1 (SOP/In-shop: wd 1e-4,
                     warm-up 5, 150 epochs, embedding lr x100)
  folder, csv        your own data: the loss's recipe above on resnet50 with torchvision's ImageNet weights
                     (--model smallcnn: from scratch, BN trained, lr 2e-3, no warm-up, 64 px)

input: the backbone's: its image size on the real datasets and folder/csv (224; smallcnn 64; a timm model its
  pretrained configuration's) unless the recipe or --image-size sets one, and its normalization (timm: its mean/std).
weights: --weights imagenet (or pretrained) uses torchvision's download/cache (ResNet-50: IMAGENET1K_V1, as in the
  papers); a timm model's default pretrained tag comes from the local Hugging Face / torch hub cache only, never
  downloaded. BN-Inception's weights are not in torchvision: download bn_inception-52deb4733.pth from
  https://github.com/Cadene/pretrained-models.pytorch and pass --weights PATH (.pth, .bin or .safetensors).

examples:
  python -m dmlfast.train                                   # glyphs, CPU or GPU, a few minutes
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --weights ~/bn_inception-52deb4733.pth
  python -m dmlfast.train --dataset SOP --data-root ~/data/SOP --model resnet50 --loss ProxyAnchor
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --model timm:vit_small_patch16_224.dino --weights dino.pth
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --loss ProxyNCA   # then the printed second run
  python -m dmlfast.train --dataset Cars196 --data-root ~/data/Cars --loss ProxyISA --k 0.4
  python -m dmlfast.train --loss NormSoftmax --proxy-synthesis 0.4,1.0 --binary-eval
  python -m dmlfast.train --dataset CUB --data-root ~/data/CUB --loss IDML --weights imagenet
  python -m dmlfast.train --dataset SOP --data-root ~/data/SOP --loss SubCenterArcFace --margin 20 --centers 2
  python -m dmlfast.train --output runs/glyphs --resume     # continue a killed run
  python -m dmlfast.train --output runs/glyphs --overwrite  # start afresh, replacing the earlier run there
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


def _model_name(text: str) -> str:
    """``--model``: one of the built-in backbones, in any case (:func:`dmlfast.checks.canonical_name`),
    or ``timm:NAME`` as given (timm's names are its own)."""
    from dmlfast.models import BACKBONES, is_timm_name

    if is_timm_name(text):
        if text == "timm:":
            raise argparse.ArgumentTypeError("timm:NAME needs a timm model's name after 'timm:', e.g. timm:resnet50")
        return text
    try:
        return canonical_name("model", text, BACKBONES)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}, or timm:NAME (any timm model)") from None


def _milestones(text: str):
    """``--lr-milestones``: ``"17,30"`` -> (17, 30)."""
    from dmlfast.training.schedule import parse_milestones

    try:
        return parse_milestones(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line; options left out (``None``) take the recipe's value."""
    from dmlfast.data import DATASETS
    from dmlfast.models import BACKBONES, POOLINGS
    from dmlfast.recipes import LOSSES, LR_SCHEDULES, OPTIMIZERS

    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                                description="Train an embedding network with a fused proxy loss; evaluates Recall@K and "
                                            "MAP@R on the held-out classes before training and every --eval-every epochs.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="glyphs", type=name_choice("dataset", DATASETS), metavar="NAME",
                   help=f"one of {', '.join(DATASETS)} (default: glyphs, built in)")
    g.add_argument("--data-root", type=Path, metavar="DIR", help="the dataset's folder (glyphs: where to render it, default ~/.cache/dmlfast)")
    g.add_argument("--list", type=Path, metavar="FILE.csv", help="--dataset csv: rows path,label[,split] (paths relative to "
                   "--data-root; split train|test|query|gallery); looked up as given, else under --data-root")
    g.add_argument("--test-classes", type=parse_test_classes_flag, metavar="N|FRACTION",
                   help="--dataset folder/csv without a train/test split: hold out N classes (or this fraction of them), "
                        "drawn from --seed")
    g.add_argument("--loader", choices=("auto", "dali", "nvjpeg", "torch"), default="auto",
                   help="image loader: NVIDIA DALI, torchvision's batched GPU JPEG decoding (nvjpeg; CPU workers only "
                        "read files), or torchvision with PIL decoding in CPU workers (torch); auto = on CUDA DALI when "
                        "installed, else nvjpeg, else torch; on a CPU torch (DALI's threads would compete with the "
                        "training for the cores)")
    g.add_argument("--workers", type=int, default=2, metavar="N", help="loader worker processes / DALI threads (default: 2; 0 = load in the main process)")
    g.add_argument("--image-size", type=int, metavar="PX", help="training/evaluation crop size (recipe: the backbone's "
                   "input size on real datasets and folder/csv, the dataset's own for glyphs and Omniglot)")
    g.add_argument("--samples-per-class", type=int, metavar="M", help="class-balanced batches with M images per class (recipe; 0 = random batches)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=_model_name, metavar="NAME",
                   help=f"backbone: {', '.join(BACKBONES)} (in any case), or timm:NAME for any timm model (pip install timm) "
                        "(recipe)")
    g.add_argument("--weights", metavar="imagenet|pretrained|none|PATH",
                   help="backbone initialisation: the published pretrained weights (torchvision's; a timm model's default "
                        "tag from the local cache), random, or a local state dict .pth/.bin/.safetensors (recipe)")
    g.add_argument("--embedding-size", type=int, metavar="D", help="embedding dimension (recipe)")
    g.add_argument("--pooling", choices=POOLINGS, help="global pooling of the feature map; backbone = the backbone's own "
                   "pooled feature (timm transformers' class token; set for them) (recipe)")
    g.add_argument("--freeze-bn", choices=("on", "off"), help="keep BatchNorm statistics and affine parameters frozen (recipe)")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--loss", default="ProxyAnchor", type=name_choice("loss", LOSSES), metavar="NAME",
                   help=f"{', '.join(LOSSES)}, in any case (default: ProxyAnchor)")
    g.add_argument("--k", type=float, help="ProxyISA: width of the informative band (recipe: 0.9; Cars196 0.4, In-shop 0.1)")
    g.add_argument("--temperature", type=float, help="Moving: softmax temperature (recipe: 0.03; SOP/In-shop 0.05)")
    g.add_argument("--momentum", type=float, help="Moving: weight of the batch's class sums in the proxy update (recipe: 0.5; SOP/In-shop 0.95)")
    g.add_argument("--margin", type=float, metavar="M",
                   help="the loss's margin: Proxy-Anchor, ProxyISA and IDML delta (recipe: 0.1), CosFace m (0.35), "
                        "ArcFace and SubCenterArcFace m in degrees (28.6), SoftTriple delta (0.01)")
    g.add_argument("--scale", type=float, metavar="S",
                   help="the loss's logit scale: ProxyNCA and NormSoftmax (recipe: 18 and 23), CosFace, ArcFace and "
                        "SubCenterArcFace s (64), Proxy-Anchor, ProxyISA and IDML alpha (32), SoftTriple lambda (20)")
    g.add_argument("--centers", type=int, metavar="K",
                   help="proxies per class: SubCenterArcFace (recipe: 3), SoftTriple (10; SOP/In-shop 2)")
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
                        "(every loss but ProxyISA and Moving); the loss is that of the global batch against all proxies")
    g.add_argument("--binary-eval", action="store_true", help="also report the metrics of sign-binarised embeddings")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (recipe)")
    g.add_argument("--lr", type=float, help="backbone learning rate (recipe)")
    g.add_argument("--proxy-lr-mult", type=float, metavar="X", help="proxies' learning rate = X * lr (recipe)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay of every group (recipe)")
    g.add_argument("--batch-size", type=int, metavar="B", help="images per training batch, per process under torchrun (recipe)")
    g.add_argument("--epochs", type=int, metavar="E", help="training epochs (recipe)")
    g.add_argument("--warmup-epochs", type=int, metavar="W", help="first epochs training only the embedding and proxies (recipe)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="per-epoch learning-rate schedule: step (StepLR), multistep "
                   "(--lr-milestones) or plateau (ProxyNCA++'s: on half of the training classes' Recall@1) (recipe)")
    g.add_argument("--lr-step", type=int, metavar="S", help="StepLR period in epochs, 0 = constant (recipe)")
    g.add_argument("--lr-gamma", type=float, metavar="G", help="factor of each lowering of the learning rate (recipe)")
    g.add_argument("--lr-milestones", type=_milestones, metavar="E1,E2", help="multistep: the epochs from which the rate is "
                   "multiplied by --lr-gamma (implies --lr-schedule multistep)")
    g.add_argument("--lr-patience", type=int, metavar="P", help="plateau: epochs without a better validation Recall@1 "
                   "before the rate is lowered (recipe: 4)")
    g.add_argument("--grad-clip", type=float, metavar="V", help="clip gradient values at +-V, 0 = off (recipe: 10)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu); under torchrun "
                   "cuda (each process on cuda:LOCAL_RANK, NCCL) or cpu (gloo)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone (its compilation steps are left out "
                   "of images/s)")
    g.add_argument("--amp", choices=AMP_MODES, default="auto", help="autocast dtype: bf16, fp16 (with GradScaler) or off; auto = bf16 on CUDA, off on CPU")
    g.add_argument("--eval-every", type=int, default=1, metavar="N", help="evaluate every N epochs and after the last (default: 1)")
    g.add_argument("--output", type=Path, default=Path("runs/train"), metavar="DIR", help="folder for checkpoints, config and logs (default: runs/train)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt (starts afresh when "
                   "--output holds no earlier run); with as many processes as wrote it")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds an earlier run, removing its "
                   "checkpoints, logs and summary (without it, such a folder is an error)")
    g.add_argument("--seed", type=int, default=1, help="seed of initialisation, batches and augmentation (default: 1, as Proxy-Anchor)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--tensorboard", action="store_true", help="mirror log.jsonl's scalars to TensorBoard events in OUTPUT/tensorboard "
                   "(pip install tensorboard)")
    g.add_argument("--wandb", action="store_true", help="mirror them to a Weights & Biases run in OUTPUT/wandb, offline unless "
                   "WANDB_MODE says otherwise (pip install wandb)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for user errors, printed as one line;
    under torchrun each failing process prints its line, naming its rank)."""
    return run_command(f"{PROG}{_rank_tag()}", _train, build_parser().parse_args(argv))


def _train(args) -> None:
    """The command: the configuration, the CPU threads beside the loader's workers, the run."""
    config = make_config(args)
    share_cores_with_loader(config["workers"])
    train(config)


def _rank_tag() -> str:
    """`` (rank R)`` in a torchrun process (``WORLD_SIZE`` > 1), else empty."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
