"""Batch samplers shared by the DALI and torchvision loaders.

Both yield lists of dataset indices, are deterministic per ``(seed, epoch)`` (``set_epoch``) and
shard by batch: with ``num_shards`` > 1 shard ``shard_id`` takes global batches ``shard_id,
shard_id + num_shards, ...``; in training (``drop_last``) every shard gets the same number of batches.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np


def _check_common(labels, batch_size: int, seed: int, shard_id: int, num_shards: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"sampler: labels must be a non-empty 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"sampler: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"sampler: seed must be a non-negative int, got {seed!r}")
    if not isinstance(num_shards, (int, np.integer)) or num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"sampler: need 0 <= shard_id < num_shards, got shard_id={shard_id!r} num_shards={num_shards!r}")
    return labels


class _Base:
    def __init__(self, labels, batch_size: int, seed: int, shard_id: int, num_shards: int):
        self.labels = _check_common(labels, batch_size, seed, shard_id, num_shards)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shard_id = int(shard_id)
        self.num_shards = int(num_shards)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration produces."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _global_batches(self) -> List[np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[List[int]]:
        for b in self._global_batches()[self.shard_id::self.num_shards][: len(self)]:
            yield b.tolist()


class RandomBatchSampler(_Base):
    """Shuffled (``shuffle=True``) or sequential batches of ``batch_size``; ``drop_last`` drops the
    final partial batch (the Proxy-Anchor training default)."""

    def __init__(self, labels, batch_size: int, *, shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1):
        super().__init__(labels, batch_size, seed, shard_id, num_shards)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if drop_last and len(self.labels) < batch_size * num_shards:
            raise ValueError(f"RandomBatchSampler: {len(self.labels)} images are fewer than one batch of {batch_size} x {num_shards} shard(s) with drop_last=True")

    def _global_batches(self) -> List[np.ndarray]:
        order = self._rng().permutation(len(self.labels)) if self.shuffle else np.arange(len(self.labels))
        n_full = len(order) // self.batch_size
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n_full)]
        if not self.drop_last and len(order) % self.batch_size:
            batches.append(order[n_full * self.batch_size:])
        return batches

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last:
            return (n // self.batch_size) // self.num_shards
        total = -(-n // self.batch_size)
        return len(range(self.shard_id, total, self.num_shards))


class MPerClassSampler(_Base):
    """Balanced batches: ``batch_size // m`` distinct classes with ``m`` images each (drawn with
    replacement for classes smaller than ``m``). An epoch has ``len(labels) // batch_size`` batches;
    classes are visited in a shuffled cycle so that all of them appear about equally often."""

    def __init__(self, labels, batch_size: int, m: int, *, seed: int = 0, shard_id: int = 0, num_shards: int = 1):
        super().__init__(labels, batch_size, seed, shard_id, num_shards)
        if not isinstance(m, (int, np.integer)) or m < 1 or batch_size % m:
            raise ValueError(f"MPerClassSampler: samples_per_class m={m!r} must be a positive int dividing batch_size={batch_size}")
        self.m = int(m)
        self.classes_per_batch = batch_size // m
        self._classes, inverse = np.unique(self.labels, return_inverse=True)
        if len(self._classes) < self.classes_per_batch:
            raise ValueError(f"MPerClassSampler: batch_size {batch_size} / m {m} needs {self.classes_per_batch} classes per batch, the labels have {len(self._classes)}")
        order = np.argsort(inverse, kind="stable")
        self._members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        if len(self) == 0:
            raise ValueError(f"MPerClassSampler: {len(self.labels)} images give no batch of {batch_size} for {num_shards} shard(s)")

    def __len__(self) -> int:
        return (len(self.labels) // self.batch_size) // self.num_shards

    def _global_batches(self) -> List[np.ndarray]:
        rng = self._rng()
        pools = [rng.permutation(m) for m in self._members]
        cursor = np.zeros(len(pools), dtype=np.int64)
        class_cycle = np.empty(0, dtype=np.int64)
        batches = []
        for _ in range(len(self) * self.num_shards):
            if len(class_cycle) < self.classes_per_batch:
                class_cycle = np.concatenate([class_cycle, rng.permutation(len(pools))])
            chosen, class_cycle = class_cycle[: self.classes_per_batch], class_cycle[self.classes_per_batch:]
            if len(np.unique(chosen)) < len(chosen):  # a cycle boundary repeated a class: redraw distinct ones
                chosen = rng.choice(len(pools), self.classes_per_batch, replace=False)
            batch = []
            for c in chosen:
                pool = pools[c]
                if len(pool) < self.m:
                    batch.append(rng.choice(pool, self.m, replace=True))
                    continue
                if cursor[c] + self.m > len(pool):
                    pools[c] = pool = rng.permutation(pool)
                    cursor[c] = 0
                batch.append(pool[cursor[c]:cursor[c] + self.m])
                cursor[c] += self.m
            batches.append(np.concatenate(batch))
        return batches
