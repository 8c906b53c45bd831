"""GPU JPEG decoding without DALI: ``torchvision.io.decode_jpeg(list of tensors, device="cuda")``
(nvJPEG, one batched call per batch).

* CPU workers (a ``DataLoader`` over the batch sampler, as the torch loader) do no decoding: each
  reads a file's bytes and plans its crop from the JPEG header's size and the sample's seed, with
  the same random draws as the torch loader (RandomResizedCrop + flip in training; resize of the
  shorter side + centre crop in evaluation). A file that is not a baseline RGB/greyscale JPEG
  (PNG, CMYK JPEG, ...) is the fallback: the worker decodes and transforms it with PIL, as the torch
  loader does, and it travels ready.
* The main process decodes the batch's JPEGs in one call on the device, then crops, resizes
  (bilinear, antialiased), flips, rounds to uint8 and normalises there. On CUDA a background thread
  does this for the next batches on a side stream while the current one trains; if nvJPEG rejects
  a batch, that batch is decoded on the CPU (one warning). On a CPU device the same code decodes with
  torchvision on the CPU (what the tests run; the torch loader is the faster choice there).
"""
from __future__ import annotations

import io
import queue
import threading
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ._common import ImageList
from .torch_loader import _ImageDataset, _SeededBatches, _worker_context
from .transforms import TransformConfig, normalize, pil_transform, random_resized_crop_params

JPEG_SIGNATURE = b"\xff\xd8\xff"
#: JPEG colour modes (PIL's names) that nvJPEG decodes to RGB; others take the CPU fallback.
_DECODABLE_MODES = ("L", "RGB")
_END = object()
_gpu_decode_checked: Dict[int, bool] = {}


def _quiet_torchvision_io():
    """torchvision 0.29 deprecates its image decoders (for TorchCodec) with a warning on every call."""
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)


def crop_plan(width: int, height: int, cfg: TransformConfig, seed: int) -> Tuple[int, ...]:
    """``(top, left, h, w, resize_h, resize_w, crop_top, crop_left, flip)``: resize the region
    (top, left, h, w) of a ``width`` x ``height`` image to (resize_h, resize_w), take the
    ``cfg.image_size`` square at (crop_top, crop_left), flip it horizontally when ``flip``. The same
    geometry as :func:`dmlfast.data.transforms.pil_transform` with the same ``seed``."""
    size = cfg.image_size
    if cfg.train:
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
        flip = bool(cfg.hflip and rng.random() < 0.5)
        return top, left, h, w, size, size, 0, 0, int(flip)
    short, long = min(width, height), max(width, height)  # torchvision's resize of the shorter side
    new_short, new_long = cfg.resize_size, int(cfg.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return 0, 0, height, width, new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0)), 0


class _EncodedImages(_ImageDataset):
    """``(index, seed) -> (bytes as uint8 tensor + crop plan, or the PIL-transformed image, label)``."""

    def __getitem__(self, item):
        from PIL import Image

        index, seed = item
        with open(self.paths[index], "rb") as f:
            data = f.read()
        label = int(self.labels[index])
        with Image.open(io.BytesIO(data)) as image:  # reads the header only, unless decoded below
            if data[:3] == JPEG_SIGNATURE and image.mode in _DECODABLE_MODES:
                plan = crop_plan(image.width, image.height, self.cfg, seed)
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(plan), label
            return pil_transform(image, self.cfg, seed), None, label


def _collate(samples):
    """A batch: the JPEGs' bytes, their plans (one int64 tensor) and positions; the ready images and positions; labels."""
    encoded = [(i, data, plan) for i, (data, plan, _) in enumerate(samples) if plan is not None]
    ready = [(i, image) for i, (image, plan, _) in enumerate(samples) if plan is None]
    plans = torch.stack([plan for _, _, plan in encoded]) if encoded else torch.zeros(0, 9, dtype=torch.int64)
    return {"jpeg_positions": [i for i, _, _ in encoded], "jpegs": [data for _, data, _ in encoded], "plans": plans,
            "ready_positions": [i for i, _ in ready], "ready": [image for _, image in ready],
            "labels": torch.tensor([label for _, _, label in samples], dtype=torch.int64)}


def gpu_decode_available(device) -> bool:
    """Whether torchvision decodes JPEGs on the CUDA ``device`` (checked once per device with a tiny image)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_decode_checked:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        _quiet_torchvision_io()
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
        try:
            decoded = decode_jpeg([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)],
                                  mode=ImageReadMode.RGB, device=f"cuda:{index}")
            _gpu_decode_checked[index] = decoded[0].shape == (3, 16, 16)
        except (RuntimeError, TypeError, ValueError):
            _gpu_decode_checked[index] = False
    return _gpu_decode_checked[index]


class NvjpegLoader:
    """Iterable of ``(images float32 NCHW normalised, labels int64)`` on ``device``, decoded by
    torchvision on the device (see the module docstring)."""

    backend = "nvjpeg"

    def __init__(self, image_list: ImageList, sampler, cfg: TransformConfig, device: torch.device, num_workers: int,
                 prefetch: int = 2):
        _quiet_torchvision_io()
        self.sampler = sampler
        self.cfg = cfg
        self.device = device
        self.prefetch = prefetch
        self.cpu_fallbacks = 0  # batches nvJPEG rejected, decoded on the CPU instead
        self.loader = torch.utils.data.DataLoader(
            _EncodedImages(image_list, cfg), batch_sampler=_SeededBatches(sampler), num_workers=num_workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, multiprocessing_context=_worker_context(num_workers))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if self.device.type != "cuda":  # the CPU path: no thread, no stream
            for batch in self.loader:
                yield self.assemble(batch)
            return
        yield from self._prefetched()

    # ---------------------------------------------------------------------------------- one batch

    def decode(self, jpegs: List[torch.Tensor]) -> List[torch.Tensor]:
        """The JPEGs (uint8 1-D CPU tensors) decoded to RGB uint8 CHW tensors on the device, in one
        batched call; a batch the device's decoder rejects is decoded on the CPU and copied there
        (one warning per loader)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        if self.device.type == "cpu":
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB)
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            if not self.cpu_fallbacks:
                warnings.warn(f"decoding JPEGs on {self.device} failed ({str(error).splitlines()[0]}); decoding such "
                              "batches on the CPU", stacklevel=2)
            self.cpu_fallbacks += 1
            return [image.to(self.device, non_blocking=True) for image in decode_jpeg(jpegs, mode=ImageReadMode.RGB)]

    def assemble(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 N x 3 x S x S normalised, labels)`` on the device from one collated batch."""
        size = self.cfg.image_size
        count = len(batch["labels"])
        out = torch.empty(count, 3, size, size, dtype=torch.uint8, device=self.device)
        for position, image, plan in zip(batch["jpeg_positions"], self.decode(batch["jpegs"]), batch["plans"].tolist()):
            out[position] = _apply_plan(image, plan, size)
        for position, image in zip(batch["ready_positions"], batch["ready"]):
            out[position] = image.to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return normalize(out, self.cfg.normalization), labels

    # ------------------------------------------------------------------------ prefetching on CUDA

    def _prefetched(self):
        """Batches assembled by a background thread on a side stream, ``self.prefetch`` ahead."""
        stream = torch.cuda.Stream(self.device)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                with torch.cuda.device(self.device):
                    for batch in self.loader:
                        with torch.cuda.stream(stream):
                            images, labels = self.assemble(batch)
                            done = torch.cuda.Event()
                            done.record(stream)
                        if not put((images, labels, done)):
                            return
                put(_END)
            except BaseException as error:  # handed to the consumer, raised there
                put(error)

        worker = threading.Thread(target=produce, name="dmlfast-nvjpeg", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, labels, done = item
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                images.record_stream(current)
                labels.record_stream(current)
                yield images, labels
        finally:
            stop.set()
            worker.join()


def _apply_plan(image: torch.Tensor, plan, size: int) -> torch.Tensor:
    """:func:`crop_plan`'s geometry applied to a decoded uint8 CHW image: uint8 3 x size x size."""
    top, left, h, w, resize_h, resize_w, crop_top, crop_left, flip = plan
    region = image[:, top:top + h, left:left + w].unsqueeze(0).float()
    resized = F.interpolate(region, size=(resize_h, resize_w), mode="bilinear", antialias=True, align_corners=False)
    out = resized[0, :, crop_top:crop_top + size, crop_left:crop_left + size]
    if flip:
        out = out.flip(2)
    return out.round_().clamp_(0, 255).to(torch.uint8)
