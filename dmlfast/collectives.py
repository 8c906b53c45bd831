"""Collectives over a ``torch.distributed`` process group, for the class-sharded losses
(:mod:`dmlfast.sharded`) and data-parallel training (:mod:`dmlfast.training.distributed`).

Without an initialized process group (or in a group of one) a process is rank 0 of 1 and every
collective returns its input, so callers need no single-process branch.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether a process group is initialized (``torch.distributed`` available and set up)."""
    return dist.is_available() and dist.is_initialized()


def group_rank_and_size(group=None) -> Tuple[int, int]:
    """``(rank, world size)`` in ``group`` (default: the whole world), or ``(0, 1)`` without a process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return group_rank_and_size()[0]


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return group_rank_and_size()[1]


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; other ranks' argument is ignored)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of the scalar ``value`` over all ranks, as a Python float (every rank gets the same)."""
    value = value.detach().float().reshape(1).clone()
    if is_initialized():
        dist.all_reduce(value)
        value /= world_size()
    return value.item()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (uneven row counts allowed); backward: the sum over ranks of the
    gradient of the gathered tensor, restricted to this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, group):
        rank, world = group_rank_and_size(group)
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        counts = [int(c) for c in torch.cat(counts).tolist()]
        longest = max(counts)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        first = sum(ctx.counts[: ctx.rank])
        return total[first:first + ctx.counts[ctx.rank]], None


def gather_rows(tensor, group=None):
    """``tensor`` of every rank of ``group`` concatenated along dim 0, in rank order (row counts
    may differ). Differentiable: the gradient of each rank's rows is summed over the ranks that
    used them. Without a process group (or with one rank) ``tensor`` itself."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"gather_rows: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 1:
        raise ValueError("gather_rows: tensor must have at least one dimension (the rows to gather)")
    if group_rank_and_size(group)[1] == 1:
        return tensor
    return _GatherRows.apply(tensor, group)


def sum_over_ranks(local_loss, group=None):
    """The sum of every rank's ``local_loss`` as the value; its gradient reaches ``local_loss`` only
    (each rank back-propagates its own share)."""
    if group_rank_and_size(group)[1] == 1:
        return local_loss
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=group)
    return local_loss + (total - local_loss.detach())


def allreduce_sum_hook(process_group, bucket):
    """A DDP communication hook that sums gradients over ranks instead of averaging them, for
    backbones trained through a sharded loss (``ddp.register_comm_hook(None, allreduce_sum_hook)``):
    each rank's backward holds only its own samples' share of the global-batch gradient."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])
