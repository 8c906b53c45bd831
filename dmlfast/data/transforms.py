"""Transforms shared by both loaders: parameters, normalisation constants, the torchvision/PIL path.

Training: RandomResizedCrop(``image_size``, ``crop_scale``, ``crop_ratio``) + optional horizontal
flip; evaluation: resize of the shorter side to ``resize_size`` + centre crop of ``image_size``.
Images leave the workers as uint8 CHW RGB and are normalised on the training device
(``normalize``); DALI applies the same normalisation inside its pipeline. A normalization is a name
of ``NORMALIZATIONS`` or a backbone's own ``{"mean": [r, g, b], "std": [r, g, b]}`` on the 0-1 scale
(a timm model's pretrained configuration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

NORMALIZATIONS = ("imagenet", "bn_inception")

#: Per-channel mean/std on the 0-255 scale, in the channel order of the output.
NORM_CONSTANTS = {
    "imagenet": dict(order="RGB", mean=(0.485 * 255, 0.456 * 255, 0.406 * 255), std=(0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "bn_inception": dict(order="BGR", mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0)),
}


def norm_constants(normalization) -> Dict[str, Any]:
    """``{"order", "mean", "std"}`` on the 0-255 scale of ``normalization`` (a name of ``NORMALIZATIONS``,
    or a mapping ``{"mean": 3 numbers, "std": 3 positive numbers}`` on the 0-1 scale, RGB)."""
    if isinstance(normalization, str) and normalization in NORM_CONSTANTS:
        return NORM_CONSTANTS[normalization]
    if isinstance(normalization, dict) and set(normalization) == {"mean", "std"}:
        mean, std = (tuple(float(v) for v in normalization[k]) for k in ("mean", "std"))
        if len(mean) == 3 and len(std) == 3 and all(math.isfinite(v) for v in mean) and all(v > 0 and math.isfinite(v) for v in std):
            return dict(order="RGB", mean=tuple(255 * v for v in mean), std=tuple(255 * v for v in std))
    raise ValueError(f"normalization must be one of {NORMALIZATIONS} or {{'mean': [r, g, b], 'std': [r, g, b]}} "
                     f"(0-1 scale, std > 0), got {normalization!r}")


@dataclass(frozen=True)
class TransformConfig:
    train: bool
    image_size: int
    resize_size: int
    crop_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float]
    hflip: bool
    normalization: Any

    def __post_init__(self):
        for name in ("image_size", "resize_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}) for the centre crop")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale!r}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio!r}")
        norm_constants(self.normalization)


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``: returns (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_transform(image, cfg: TransformConfig, seed: int):
    """PIL image -> uint8 CHW RGB tensor; random parameters come from ``seed`` (training only)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    image = image.convert("RGB")
    size = [cfg.image_size, cfg.image_size]
    if cfg.train:
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(image.width, image.height, cfg.crop_scale, cfg.crop_ratio, rng)
        image = F.resized_crop(image, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        if cfg.hflip and rng.random() < 0.5:
            image = F.hflip(image)
    else:
        image = F.resize(image, cfg.resize_size, InterpolationMode.BILINEAR, antialias=True)
        image = F.center_crop(image, size)
    return F.pil_to_tensor(image)


def normalize(images, normalization: str):
    """uint8 NCHW RGB -> float32 NCHW normalised (channel order BGR for ``bn_inception``)."""
    import torch

    try:
        c = norm_constants(normalization)
    except ValueError as error:
        raise ValueError(f"normalize: {error}") from None
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize: expected uint8 N x 3 x H x W, got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    if c["order"] == "BGR":
        x = x.flip(1)
    mean = torch.tensor(c["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(c["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def transform_config(dataset: Optional[str], *, train: bool, image_size: Optional[int] = None, resize_size: Optional[int] = None,
                     crop_scale=None, crop_ratio=None, hflip: Optional[bool] = None, normalization="imagenet") -> TransformConfig:
    """The transform of images of ``dataset`` (a ``DATASET_DEFAULTS`` name; another name or ``None``:
    the generic defaults) that ``make_loader`` applies: arguments left as ``None`` come from the
    dataset's defaults, ``resize_size`` from ``round(image_size * default_resize / default_size)``."""
    from ._common import DATASET_DEFAULTS, dataset_defaults

    d = dataset_defaults(dataset if dataset in DATASET_DEFAULTS else None)
    size = d.image_size if image_size is None else image_size
    if resize_size is None:
        resize_size = round(size * d.resize_size / d.image_size) if isinstance(size, int) else size
    return TransformConfig(train=bool(train), image_size=size, resize_size=resize_size,
                           crop_scale=tuple(d.crop_scale if crop_scale is None else crop_scale),
                           crop_ratio=tuple(d.crop_ratio if crop_ratio is None else crop_ratio),
                           hflip=d.hflip if hflip is None else bool(hflip), normalization=normalization)
