"""torchvision/PIL loader: a ``torch.utils.data.DataLoader`` over a batch sampler.

Workers decode with PIL and return uint8 batches (pinned when the device is CUDA); the batch is
moved to the device and normalised there. Random crop/flip parameters are drawn per sample from a
seed derived from (sampler seed, epoch, position), so a run is reproducible for any worker count.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ._common import ImageList
from .transforms import TransformConfig, normalize, pil_transform


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, image_list: ImageList, cfg: TransformConfig):
        self.paths = image_list.paths
        self.labels = image_list.labels
        self.cfg = cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item
        from PIL import Image

        with Image.open(self.paths[index]) as im:
            x = pil_transform(im, self.cfg, seed)
        return x, int(self.labels[index])


class _SeededBatches:
    """Wraps a batch sampler: yields ``[(index, seed), ...]`` with per-sample augmentation seeds."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        rng = np.random.default_rng([s.seed, s.epoch, s.shard_id, 0x5EED])
        for batch in s:
            seeds = rng.integers(0, 2**63 - 1, size=len(batch))
            yield list(zip(batch, seeds.tolist()))


def _worker_context(num_workers: int):
    """Forked workers crash once DALI's thread pools exist in the parent; use forkserver then."""
    if num_workers > 0 and "nvidia.dali" in sys.modules and sys.platform.startswith("linux"):
        return "forkserver"
    return None


class TorchLoader:
    """Iterable of ``(images float32 NCHW normalised, labels int64)`` on ``device``."""

    backend = "torch"

    def __init__(self, image_list: ImageList, sampler, cfg: TransformConfig, device: torch.device, num_workers: int):
        self.sampler = sampler
        self.cfg = cfg
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            _ImageDataset(image_list, cfg),
            batch_sampler=_SeededBatches(sampler),
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            multiprocessing_context=_worker_context(num_workers),
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        non_blocking = self.device.type == "cuda"
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=non_blocking)
            yield normalize(images, self.cfg.normalization), labels.to(self.device, non_blocking=non_blocking)
