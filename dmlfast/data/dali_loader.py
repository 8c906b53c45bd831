"""NVIDIA DALI loader: encoded files from the batch sampler go through ``fn.external_source`` into a
decode → (random) crop → resize → crop_mirror_normalize pipeline.

On a CUDA device decoding is ``device="mixed"`` (nvJPEG) and outputs stay on the GPU; on the CPU the
pipeline runs in DALI's CPU-only mode (``device_id=None``, every op ``device="cpu"``).
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import ImageList
from .transforms import TransformConfig, norm_constants

DALI_INSTALL_HINT = "pip install nvidia-dali-cuda130  (or nvidia-dali-cuda120 for CUDA 12), see https://docs.nvidia.com/deeplearning/dali/"


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _centre_pos(margin, dmath, fn, types):
    """Relative crop position giving torchvision's centre-crop offset ``int(round(margin / 2))``
    (Python rounds halves to even), as a DALI expression of the integer ``margin``."""
    half = margin // 2
    offset = half + (margin - 2 * half) * (half - 2 * (half // 2))
    return fn.cast(offset, dtype=types.FLOAT) / fn.cast(dmath.max(margin, 1), dtype=types.FLOAT)


class DaliLoader:
    """Iterable of ``(images float32 NCHW normalised, labels int64)`` on ``device``."""

    backend = "dali"

    def __init__(self, image_list: ImageList, sampler, cfg: TransformConfig, device: torch.device, num_threads: int,
                 prefetch: int = 2):
        try:
            from nvidia.dali import fn, pipeline_def, types
            from nvidia.dali import math as dmath
        except ImportError as exc:
            raise ImportError(f"loader='dali' needs NVIDIA DALI, which is not installed: {DALI_INSTALL_HINT}") from exc
        self.sampler = sampler
        self.cfg = cfg
        self.device = device
        self.paths = image_list.paths
        self.labels = image_list.labels
        self._batches = iter(())
        self._open = False
        gpu = device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        norm = norm_constants(cfg.normalization)
        out_type = types.BGR if norm["order"] == "BGR" else types.RGB
        size = cfg.image_size

        @pipeline_def(batch_size=sampler.batch_size, num_threads=num_threads, device_id=device_id,
                      seed=(sampler.seed * 1_000_003 + sampler.shard_id) % (2**31), prefetch_queue_depth=prefetch)
        def pipeline():
            files, labels = fn.external_source(source=self._next_batch, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
            decoder = "mixed" if gpu else "cpu"
            if cfg.train:
                images = fn.decoders.image_random_crop(files, device=decoder, output_type=out_type, random_area=list(cfg.crop_scale),
                                                       random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10)
                images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5) if cfg.hflip else 0
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=list(norm["mean"]),
                                                  std=list(norm["std"]), mirror=mirror)
            else:
                # Output size as torchvision computes it (shorter side = resize_size, longer side truncated),
                # so that the centre crops of both loaders cover the same pixels.
                shape = fn.peek_image_shape(files, dtype=types.INT64)
                height, width = shape[0], shape[1]
                shorter = dmath.min(height, width)
                new_h, new_w = height * cfg.resize_size // shorter, width * cfg.resize_size // shorter
                images = fn.decoders.image(files, device=decoder, output_type=out_type)
                images = fn.resize(images, resize_y=fn.cast(new_h, dtype=types.FLOAT), resize_x=fn.cast(new_w, dtype=types.FLOAT),
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                                  crop_pos_y=_centre_pos(new_h - size, dmath, fn, types),
                                                  crop_pos_x=_centre_pos(new_w - size, dmath, fn, types),
                                                  mean=list(norm["mean"]), std=list(norm["std"]))
            return images, labels

        self.pipe = pipeline()
        self.pipe.build()

    def _next_batch(self):
        batch = next(self._batches)  # StopIteration ends DALI's epoch
        files = [np.fromfile(self.paths[i], dtype=np.uint8) for i in batch]
        return files, [np.array([self.labels[i]], dtype=np.int64) for i in batch]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _finish_epoch(self) -> None:
        """Drop what the pipeline prefetched and reset it for the next epoch."""
        self._batches = iter(())
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()
        self._open = False

    def _to_torch(self, images, labels):
        tensor = images.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            out = torch.from_numpy(np.array(tensor))
        lab = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1)).to(self.device)
        return out, lab

    def __iter__(self):
        if self._open:
            self._finish_epoch()
        self._batches = iter(self.sampler)
        self._open = True
        try:
            while True:
                try:
                    images, labels = self.pipe.run()
                except StopIteration:
                    self.pipe.reset()
                    self._open = False
                    return
                yield self._to_torch(images, labels)
        finally:
            if self._open:
                self._finish_epoch()
