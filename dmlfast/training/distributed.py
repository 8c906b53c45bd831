"""Data-parallel training under ``torchrun``: process group, per-rank device, DDP wrapping and the
few collectives the training loop needs.

``torchrun --nproc-per-node N -m dmlfast.train ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in their environment; ``WORLD_SIZE`` > 1 means distributed. One process
per device: ``cuda:LOCAL_RANK`` with NCCL when the run is on CUDA, the CPU with gloo otherwise.

Every helper also works in a plain single process (no process group): ``rank()`` is 0,
``world_size()`` 1, the collectives return their input, ``replicate`` wraps nothing, so the
training loop calls them unconditionally and a single-process run computes what it always did.
The rank helpers and collectives (``rank``, ``world_size``, ``is_initialized``, ``barrier``,
``broadcast_object``, ``mean_over_ranks``) are :mod:`dmlfast.collectives`', importable from here.

What is replicated and who writes what lives in :func:`replicate` and :func:`writes_checkpoints`;
with class-sharded proxies (``--shard-proxies``) the loss stays unwrapped, the backbone's gradients
are summed (:func:`replicate`), and each rank also saves its shard (:func:`shard_checkpoint_path`).
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dmlfast.checks import InputError
from dmlfast.collectives import (allreduce_sum_hook, barrier, broadcast_object, gather_rows, is_initialized,
                                 mean_over_ranks, rank, world_size)

__all__ = ["ENV_VARS", "DistributedSetupError", "LossInputs", "all_gather_rows", "backend_for", "device_for_rank",
           "gather_in_order", "is_main", "local_rank", "main_first", "print_main", "process_group", "replicate",
           "requested_world_size", "shard_checkpoint_path", "sync_buffers", "trainable_signature", "writes_checkpoints",
           # from dmlfast.collectives:
           "barrier", "broadcast_object", "is_initialized", "mean_over_ranks", "rank", "world_size"]

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedSetupError(InputError, ValueError):
    """The torchrun environment or the requested device cannot run a distributed training."""


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name} must be an integer (torchrun sets it), got {text!r}") from None


def requested_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset: a plain ``python -m dmlfast.train``)."""
    size = _env_int("WORLD_SIZE", 1)
    if size < 1:
        raise DistributedSetupError(f"environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset): this process's index on its machine."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Whether this process is rank 0, the one that prints, logs and writes files."""
    return rank() == 0


def writes_checkpoints() -> bool:
    """Whether this rank writes ``last.pt`` / ``best.pt``: rank 0 only, since every rank holds the
    same (replicated) model, proxies, optimizer and RNG state; the files are those of a single-process run.
    (With sharded proxies every rank also writes its own shard file: :func:`shard_checkpoint_path`.)"""
    return is_main()


def print_main(*args: Any) -> None:
    """``print(*args, flush=True)`` on rank 0, nothing elsewhere."""
    if is_main():
        print(*args, flush=True)


def device_for_rank(name: Optional[str], local: int):
    """The device of the process with ``LOCAL_RANK`` ``local`` for ``--device name`` under torchrun.

    ``None`` (default) or ``"cuda"``: ``cuda:local`` (NCCL), ``None`` falling back to the CPU when
    CUDA is unavailable; ``"cpu"``: the CPU (gloo). ``DistributedSetupError`` when ``cuda`` is asked
    for and this process has no GPU (no CUDA, or ``local`` >= the visible device count: NCCL needs
    one GPU per process), and for ``cuda:N``, which would put every process on the same GPU.
    """
    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DistributedSetupError(f"--device: {error}") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DistributedSetupError(f"--device must be cpu or cuda under torchrun, got {name!r}")
    if device.index is not None:
        raise DistributedSetupError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                                    "(and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if not torch.cuda.is_available():
        raise DistributedSetupError(f"--device {name}: CUDA is not available on this machine (no GPU, or torch without CUDA), "
                                    "so NCCL cannot run; use --device cpu (gloo)")
    count = torch.cuda.device_count()
    if local >= count:
        raise DistributedSetupError(f"--device {name}: process LOCAL_RANK {local} has no GPU of its own, {count} are visible "
                                    f"and NCCL needs one per process; use --nproc-per-node {count} or --device cpu (gloo)")
    return torch.device("cuda", local)


def backend_for(device) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def process_group(device) -> Iterator[None]:
    """Join the torchrun process group on ``device`` for the duration of the block (nothing when
    ``WORLD_SIZE`` <= 1); the group is destroyed on exit, errors included. ``DistributedSetupError``
    when the environment does not describe a group (``WORLD_SIZE`` set by hand, without torchrun)."""
    if requested_world_size() <= 1:
        yield
        return
    device = torch.device(device)
    options = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device  # NCCL binds to this GPU (collectives and barriers need not guess it)
    try:
        dist.init_process_group(backend_for(device), **options)
    except ValueError as error:  # e.g. MASTER_ADDR or RANK missing
        raise DistributedSetupError(f"WORLD_SIZE is {requested_world_size()} but the process group cannot start ({error}); "
                                    "launch with torchrun --nproc-per-node N -m dmlfast.train") from error
    try:
        yield
        gc.collect()  # DDP wrappers left in reference cycles go while the group lives, not at interpreter exit
        dist.barrier()  # a normal end: no rank leaves while another still communicates
    finally:
        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it finished (e.g. rendering or downloading
    into a shared cache once)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (e.g. BatchNorm running statistics), as DDP does
    at the start of each forward: after an epoch's last step each rank's statistics moved with its own
    batch, and evaluation and checkpoints must use one model, rank 0's."""
    if not is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` of every rank, rank 0's first; ranks may hold different row counts.
    No gradient: :func:`dmlfast.collectives.gather_rows` of the detached tensor."""
    return gather_rows(tensor.detach())


def gather_in_order(tensors: Sequence[torch.Tensor], positions: Sequence[int], total: int) -> List[torch.Tensor]:
    """Reassemble a sharded pass over a dataset: each rank holds ``tensors`` whose rows are the dataset
    items ``positions`` (in the order its loader produced them); returns, on every rank, each tensor
    with all ``total`` rows in dataset order, as a single process would have produced them.
    ``ValueError`` if the ranks' positions do not cover ``0..total-1`` exactly once."""
    positions = torch.as_tensor(list(positions), dtype=torch.long)
    for t in tensors:
        if t.shape[0] != len(positions):
            raise ValueError(f"gather_in_order: a tensor has {t.shape[0]} rows for {len(positions)} positions")
    if not is_initialized():
        if not torch.equal(positions, torch.arange(total)):
            raise ValueError(f"gather_in_order: positions must be 0..{total - 1} in order in a single process")
        return list(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    everywhere = all_gather_rows(positions.to(device))
    if len(everywhere) != total or not torch.equal(torch.sort(everywhere).values, torch.arange(total, device=device)):
        raise ValueError(f"gather_in_order: the ranks' positions do not cover 0..{total - 1} exactly once")
    result = []
    for t in tensors:
        rows = all_gather_rows(t)
        ordered = torch.empty_like(rows)
        ordered[everywhere] = rows
        result.append(ordered)
    return result


class LossInputs(nn.Module):
    """The model outputs the loss takes before the labels: ``(μ,)``, or ``(μ, v)`` with the
    uncertainty head (IDML). A module, so that DDP sees the forward (calling
    ``model.forward_with_uncertainty`` on a DDP-wrapped model would bypass its gradient sync)."""

    def __init__(self, model: nn.Module, uncertainty: bool):
        super().__init__()
        self.model = model
        self.uncertainty = bool(uncertainty)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.model.forward_with_uncertainty(images) if self.uncertainty else (self.model(images),)


def trainable_signature(*modules: nn.Module) -> Tuple[bool, ...]:
    """Which parameters of ``modules`` require a gradient: :func:`replicate` must run again when it changes."""
    return tuple(p.requires_grad for m in modules for p in m.parameters())


def replicate(forward: nn.Module, loss_fn: nn.Module, device, sharded_loss: bool = False) -> Tuple[nn.Module, nn.Module]:
    """The modules to call in the training step: ``(forward, loss_fn)`` themselves in a single
    process; under torchrun each wrapped in its own ``DistributedDataParallel``.

    Replicated proxies are parameters like any other: the ``loss_fn`` DDP all-reduces (averages)
    their gradients, so every rank applies the same optimizer step and the proxies stay equal. A
    separate wrapper (rather than one DDP around a model+loss module) keeps the two decisions apart:
    a loss without trainable parameters (moving proxies, a buffer) is not wrapped, and a mode with
    class-sharded proxies would leave ``loss_fn`` unwrapped and reduce the backbone's gradients by
    a sum (a communication hook on the ``forward`` wrapper) instead of DDP's mean.

    DDP only synchronises the parameters that require a gradient when it is built: call this again
    whenever :func:`trainable_signature` changes (the end of warm-up), and drop the old wrappers
    first. A dropped DDP wrapper can sit in a reference cycle (seen with torch 2.14: the first one a
    process builds, held through a frame of its own constructor), so dropping it need not free it:
    this call collects such cycles, and the old reducers leave the parameters' gradient hooks at the
    same point on every rank instead of whenever each process's garbage collector happens to run.
    Building a wrapper broadcasts rank 0's parameters and buffers, so the ranks start equal.

    ``sharded_loss``: ``loss_fn`` holds this rank's shard of the proxies (:mod:`dmlfast.sharded`) and
    returns the global batch's loss, so it stays unwrapped and the ``forward`` wrapper sums the
    ranks' gradients (:func:`dmlfast.collectives.allreduce_sum_hook`) instead of averaging them.
    """
    if not is_initialized():
        return forward, loss_fn
    gc.collect()
    device = torch.device(device)
    ids = [device.index] if device.type == "cuda" else None

    def wrap(module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    if sharded_loss:
        wrapped = wrap(forward)
        if wrapped is not forward:
            wrapped.register_comm_hook(None, allreduce_sum_hook)
        return wrapped, loss_fn
    return wrap(forward), wrap(loss_fn)


def shard_checkpoint_path(path, rank_index: int, world: int) -> Path:
    """Where rank ``rank_index`` of ``world`` keeps its proxy shard of checkpoint ``path``: ``last.pt``
    -> ``last.shard-1-of-2.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shard-{rank_index}-of-{world}{path.suffix}")
