"""Class-sharded proxy losses: each process of a ``torch.distributed`` group holds a slice of the proxies.

For catalogues of 10⁵–10⁷ classes the proxy table and its optimizer state outgrow one device. Here
rank r of N holds classes ``[class_offset, class_offset + count)`` of :func:`shard_range` (uneven
shards allowed: the first C mod N ranks hold one more), so proxies and their Adam state take 1/N of
the memory on each rank. Every forward:

1. all-gathers the embeddings and labels of every rank (:func:`dmlfast.collectives.gather_rows`;
   its backward sums each rank's gradient contributions back onto the rows it owns);
2. runs the fused op on (all embeddings × this rank's proxies) with the class offset and the
   global class count;
3. anchor family (Proxy-Anchor, IDML): every term belongs to one proxy column, so the loss is the
   all-reduced sum of the shards' shares (|P⁺| is counted from the gathered labels, C is global);
   softmax family (ProxyNCA(++), Norm-SoftMax, CosFace, ArcFace, Sub-center ArcFace, SoftTriple; a
   class's K centers stay on one rank): a distributed log-sum-exp, as in Partial FC: pass 1
   gives each row's (max, sum-exp) over the local proxies, two all-reduces (max, then the rescaled
   sums with the logit sums) complete them, pass 2 forms the gradient from the global row LSE.

The returned loss is the loss of the whole global batch against all C proxies, the same value on
every rank; its gradients (local proxies exact, own embeddings exact through the gather) equal the
unsharded loss's. So the backbone's gradient is the *sum* over ranks of their contributions: with
DDP, register :func:`allreduce_sum_hook` (:mod:`dmlfast.collectives`; DDP averages by default).
Proxies are not DDP parameters.
Communication per step: an all-gather of B·D embeddings (and B labels), its backward an all-reduce
of B·D; the softmax family adds two all-reduces of B and 3·B float64.

Proxy-ISA (normalizers summed over all classes' multipliers), the moving proxies and Proxy
Synthesis are not sharded. Without an initialized process group the modules run as one shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ._ops import CHECKS_OFF, value_check_mode
from .checks import anchor_hyperparameters, as_int64_labels, require_int, softmax_hyperparameters
from .collectives import allreduce_sum_hook, gather_rows, group_rank_and_size, sum_over_ranks
from .functional import soft_triple_regularizer
from .losses import LOSSES, IntrospectiveProxyAnchorLoss, NormSoftmaxLoss, ProxyAnchorLoss, ProxyNCALoss
from .margin_losses import (ArcFaceLoss, CosFaceLoss, SoftTripleLoss, SubCenterArcFaceLoss, arcface_hyperparameters,
                            cosface_hyperparameters, soft_triple_hyperparameters)

__all__ = ["SHARDED_LOSSES", "ShardedArcFaceLoss", "ShardedCosFaceLoss", "ShardedIntrospectiveProxyAnchorLoss",
           "ShardedNormSoftmaxLoss", "ShardedProxyAnchorLoss", "ShardedProxyNCALoss", "ShardedSoftTripleLoss",
           "ShardedSubCenterArcFaceLoss", "make_sharded_loss", "reduce_softmax_row_stats", "shard_range",
           # from dmlfast.collectives, for a training loop of one's own:
           "allreduce_sum_hook", "gather_rows", "group_rank_and_size"]


def shard_range(num_classes, rank, world_size):
    """``(first class, count)`` of ``rank``'s shard of ``num_classes`` over ``world_size`` ranks:
    contiguous blocks, the first ``num_classes % world_size`` ranks holding one class more."""
    num_classes = require_int("shard_range", "num_classes", num_classes)
    world_size = require_int("shard_range", "world_size", world_size)
    rank = require_int("shard_range", "rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"shard_range: rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class _ShardedProxyLoss(nn.Module):
    """Holds this rank's proxy rows ``proxies`` ((count, embedding_size), float32) of ``num_classes``."""

    #: The loss of :mod:`dmlfast.losses` this one shards: its math, hyperparameters and initial proxies.
    unsharded = None

    def __init__(self, num_classes, embedding_size, group=None, centers_per_class=1):
        super().__init__()
        owner = type(self).__name__
        num_classes = require_int(owner, "num_classes", num_classes)
        embedding_size = require_int(owner, "embedding_size", embedding_size)
        self.centers_per_class = require_int(owner, "centers_per_class", centers_per_class)
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"{owner}: num_classes ({num_classes}) must be at least the number of ranks "
                             f"({self.world_size}): every rank holds one proxy or more")
        self.num_classes = num_classes
        self.class_offset, count = shard_range(num_classes, self.rank, self.world_size)
        self.proxies = nn.Parameter(torch.empty(count * self.centers_per_class, embedding_size, dtype=torch.float32))

    @property
    def embedding_size(self):
        return self.proxies.shape[1]

    def reset_parameters(self):
        """Draw this shard's rows of the unsharded loss's initial proxies (its ``init_proxies_`` on the
        slice) from a CPU generator seeded by torch's seed and the class offset: shards differ, and a
        run is reproducible for a given world size."""
        generator = torch.Generator().manual_seed((torch.initial_seed() + 1_000_003 * self.class_offset) % 2**63)
        self.unsharded.init_proxies_(self.proxies, self.num_classes * self.centers_per_class, generator)

    def load_full_proxies(self, proxies):
        """Copy this rank's rows of the full ``proxies`` table ((num_classes · K, embedding_size), K
        rows per class) in."""
        owner = f"{type(self).__name__}.load_full_proxies"
        if not isinstance(proxies, torch.Tensor):
            raise TypeError(f"{owner}: proxies must be a torch.Tensor, got {type(proxies).__name__}")
        expected = (self.num_classes * self.centers_per_class, self.embedding_size)
        if tuple(proxies.shape) != expected:
            raise ValueError(f"{owner}: proxies must have shape {expected}, got {tuple(proxies.shape)}")
        first = self.class_offset * self.centers_per_class
        with torch.no_grad():
            self.proxies.copy_(proxies[first:first + self.proxies.shape[0]])

    def _gather(self, embeddings, labels, **extra):
        """Checks this rank's inputs, then gathers them (and ``extra`` (B, ·) tensors) from all ranks."""
        owner = type(self).__name__
        labels = as_int64_labels(owner, labels)
        tensors = dict(embeddings=embeddings, **extra, labels=labels)
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
            if value.device != self.proxies.device:
                raise ValueError(f"{owner}: {name} must be on the proxies' device {self.proxies.device}, got {value.device}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{owner}: embeddings must have shape (batch, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"{owner}: labels must have shape ({embeddings.shape[0]},), got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        for name, value in extra.items():
            if value.dim() != 2 or value.shape[0] != embeddings.shape[0]:
                raise ValueError(f"{owner}: {name} must have shape ({embeddings.shape[0]}, K), got {tuple(value.shape)}")
        return [gather_rows(value, self.group) for value in tensors.values()]

    def extra_repr(self):
        last = self.class_offset + self.proxies.shape[0] // self.centers_per_class
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"shard=[{self.class_offset}, {last}), rank={self.rank}/{self.world_size}")


class _ShardedAnchorLoss(_ShardedProxyLoss):
    """The anchor family's margin δ and scale α."""

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0, group=None):
        super().__init__(num_classes, embedding_size, group)
        self.margin, self.alpha = anchor_hyperparameters(type(self).__name__, margin, alpha)
        self.reset_parameters()


class ShardedProxyAnchorLoss(_ShardedAnchorLoss):
    """Proxy-Anchor (:func:`dmlfast.functional.proxy_anchor_loss`) with class-sharded proxies, made
    after ``torch.distributed.init_process_group``::

        loss_fn = ShardedProxyAnchorLoss(num_classes, 512, margin=0.1, alpha=32.0)   # this rank's proxy rows
        loss = loss_fn(embeddings, labels)

    ``forward`` takes this rank's embeddings (B, D) float32/bfloat16/float16/float64 and labels (B,) of
    any integer dtype in [0, num_classes) (global class indices) and returns the loss of the global
    batch (every rank's rows) against all proxies: a 0-dim float32 tensor (float64 for float64
    inputs), the same on every rank."""

    unsharded = ProxyAnchorLoss

    def forward(self, embeddings, labels):
        x, y = self._gather(embeddings, labels)
        local = torch.ops.dmlfast.proxy_anchor_loss(x, self.proxies, y, self.margin, self.alpha, None, False,
                                                    self.class_offset, self.num_classes,
                                                    value_check_mode(x, self.proxies))[0]
        return sum_over_ranks(local, self.group)


class ShardedIntrospectiveProxyAnchorLoss(_ShardedAnchorLoss):
    """IDML's introspective Proxy-Anchor (:func:`dmlfast.functional.idml_proxy_anchor_loss`) with
    class-sharded proxies: ``loss = loss_fn(embeddings, uncertainty, labels)``, this rank's rows,
    with the uncertainty (B, K) beside the embeddings; otherwise as :class:`ShardedProxyAnchorLoss`
    (the global batch's loss, a 0-dim float32 tensor, the same on every rank)."""

    unsharded = IntrospectiveProxyAnchorLoss

    def forward(self, embeddings, uncertainty, labels):
        x, v, y = self._gather(embeddings, labels, uncertainty=uncertainty)
        local = torch.ops.dmlfast.idml_proxy_anchor_loss(x, v, self.proxies, y, self.margin, self.alpha,
                                                         self.class_offset, self.num_classes,
                                                         value_check_mode(x, v, self.proxies))[0]
        return sum_over_ranks(local, self.group)


def reduce_softmax_row_stats(stats, group=None):
    """Complete per-shard softmax row statistics ([4, B] float64: max, sum of e^{z - max}, logit sum,
    target logit) over the ranks: all-reduce the max, then the sums rescaled to it (a shard with no
    denominator logit in a row has max -inf and contributes 0)."""
    if group_rank_and_size(group)[1] == 1:
        return stats
    row_max = stats[0].clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([stats[1] * torch.exp(stats[0] - row_max), stats[2], stats[3]])
    dist.all_reduce(sums, group=group)
    return torch.cat([row_max.unsqueeze(0), sums])


class ShardedProxyNCALoss(_ShardedProxyLoss):
    """ProxyNCA / ProxyNCA++ (:func:`dmlfast.functional.proxy_nca_loss`) with class-sharded proxies
    and a distributed log-sum-exp: ``loss = loss_fn(embeddings, labels)`` on this rank's rows, shapes
    and dtypes as :class:`ShardedProxyAnchorLoss`'s; returns the global batch's loss against all
    proxies, a 0-dim float32 tensor (float64 for float64 inputs), the same on every rank."""

    unsharded = ProxyNCALoss

    def __init__(self, num_classes, embedding_size, scale=18.0, smoothing=0.0, exclude_positive=False, group=None):
        super().__init__(num_classes, embedding_size, group)
        self.scale, self.smoothing, self.exclude_positive = softmax_hyperparameters(
            type(self).__name__, scale, smoothing, exclude_positive)
        self.reset_parameters()

    def forward(self, embeddings, labels):
        x, y = self._gather(embeddings, labels)
        shard = (self.class_offset, self.num_classes)
        # Pass 2 checks the same inputs, so pass 1 runs unchecked.
        stats = torch.ops.dmlfast.proxy_nca_shard_row_stats(x.detach(), self.proxies.detach(), y, self.scale,
                                                             self.exclude_positive, *shard, CHECKS_OFF)
        stats = reduce_softmax_row_stats(stats, self.group)
        return torch.ops.dmlfast.proxy_nca_shard_loss_and_grads(x, self.proxies, y, stats, self.scale, self.smoothing,
                                                                self.exclude_positive, *shard,
                                                                value_check_mode(x, self.proxies))[0]


class ShardedNormSoftmaxLoss(ShardedProxyNCALoss):
    """Norm-SoftMax (softmax cross-entropy on scale · cos) with class-sharded proxies:
    ``loss = loss_fn(embeddings, labels)``, as :class:`ShardedProxyNCALoss`."""

    unsharded = NormSoftmaxLoss

    def __init__(self, num_classes, embedding_size, scale=23.0, group=None):
        super().__init__(num_classes, embedding_size, scale=scale, group=group)


class _ShardedClassSoftmaxLoss(_ShardedProxyLoss):
    """The margin softmaxes and SoftTriple (:mod:`dmlfast.margin_losses`) with class-sharded centers:
    the softmax family's two passes with the unsharded module's class-logit arguments
    (``logit_arguments``), each rank holding the K centers of its classes."""

    def forward(self, embeddings, labels):
        x, y = self._gather(embeddings, labels)
        shard = (self.class_offset, self.num_classes)
        scale, *logits = self.logit_arguments()
        # Pass 2 checks the same inputs, so pass 1 runs unchecked.
        stats = torch.ops.dmlfast.proxy_nca_shard_row_stats(x.detach(), self.proxies.detach(), y, scale, False, *shard,
                                                             CHECKS_OFF, *logits)
        stats = reduce_softmax_row_stats(stats, self.group)
        loss = torch.ops.dmlfast.proxy_nca_shard_loss_and_grads(x, self.proxies, y, stats, scale, 0.0, False, *shard,
                                                                value_check_mode(x, self.proxies), *logits)[0]
        return loss + self.regularizer()

    def regularizer(self):
        """A term on the centers added to the loss (SoftTriple's); none by default."""
        return 0.0


class ShardedCosFaceLoss(_ShardedClassSoftmaxLoss):
    """CosFace (:class:`dmlfast.CosFaceLoss`) with class-sharded proxies."""

    unsharded = CosFaceLoss
    logit_arguments = CosFaceLoss.logit_arguments

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0, group=None):
        super().__init__(num_classes, embedding_size, group)
        self.margin, self.scale = cosface_hyperparameters(type(self).__name__, margin, scale)
        self.reset_parameters()


class ShardedArcFaceLoss(_ShardedClassSoftmaxLoss):
    """ArcFace (:class:`dmlfast.ArcFaceLoss`, margin in degrees) with class-sharded proxies."""

    unsharded = ArcFaceLoss
    logit_arguments = ArcFaceLoss.logit_arguments

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, group=None, centers_per_class=1):
        super().__init__(num_classes, embedding_size, group, centers_per_class)
        self.margin, self.scale = arcface_hyperparameters(type(self).__name__, margin, scale)
        self.reset_parameters()


class ShardedSubCenterArcFaceLoss(ShardedArcFaceLoss):
    """Sub-center ArcFace (:class:`dmlfast.SubCenterArcFaceLoss`) with class-sharded sub-centers."""

    unsharded = SubCenterArcFaceLoss

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, sub_centers=3, group=None):
        super().__init__(num_classes, embedding_size, margin, scale, group, centers_per_class=sub_centers)


class ShardedSoftTripleLoss(_ShardedClassSoftmaxLoss):
    """SoftTriple (:class:`dmlfast.SoftTripleLoss`) with class-sharded centers; the centre
    regulariser is each rank's classes' share of it, summed over the ranks."""

    unsharded = SoftTripleLoss
    logit_arguments = SoftTripleLoss.logit_arguments

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2,
                 group=None):
        super().__init__(num_classes, embedding_size, group, centers_per_class)
        self.la, self.gamma, self.margin, self.tau = soft_triple_hyperparameters(
            type(self).__name__, la, gamma, margin, tau)
        self.reset_parameters()

    def regularizer(self):
        if self.tau == 0 or self.centers_per_class == 1:
            return 0.0
        local_classes = self.proxies.shape[0] // self.centers_per_class
        share = soft_triple_regularizer(self.proxies, self.centers_per_class) * (local_classes / self.num_classes)
        return self.tau * sum_over_ranks(share, self.group)


#: The sharded loss of each name of :data:`dmlfast.losses.LOSSES` that has one
#: (``python -m dmlfast.train --loss NAME --shard-proxies``).
SHARDED_LOSSES = {name: sharded for name, loss in LOSSES.items()
                  for sharded in (ShardedProxyAnchorLoss, ShardedProxyNCALoss, ShardedNormSoftmaxLoss,
                                  ShardedIntrospectiveProxyAnchorLoss, ShardedCosFaceLoss, ShardedArcFaceLoss,
                                  ShardedSubCenterArcFaceLoss, ShardedSoftTripleLoss) if sharded.unsharded is loss}


def make_sharded_loss(name, num_classes, embedding_size, group=None, **loss_kwargs):
    """The sharded loss module for the trainer's loss ``name`` (a key of :data:`SHARDED_LOSSES`)."""
    if name not in SHARDED_LOSSES:
        raise ValueError(f"make_sharded_loss: class-sharded proxies exist for {', '.join(SHARDED_LOSSES)}, not {name!r}")
    return SHARDED_LOSSES[name](num_classes, embedding_size, group=group, **loss_kwargs)
