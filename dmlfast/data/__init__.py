"""Datasets and loaders for proxy-based deep metric learning.

Datasets
--------
``load_dataset(name, root=None, strict=False) -> DatasetSplits`` reads one of ``DATASETS``:

==========  =====================================================  ===========================
name        layout under ``root``                                   splits
==========  =====================================================  ===========================
CUB         ``CUB_200_2011/images/<class>/*.jpg``                   train 0-99, test 100-199
Cars196     ``cars_annos.mat``, ``car_ims/*.jpg``                   train 1-98, test 99-196
SOP         ``Ebay_train.txt``, ``Ebay_test.txt``, ``*/ *.JPG``     train, test
In-shop     ``Eval/list_eval_partition.txt``, ``img/...``           train, query, gallery
Omniglot    ``images_background/``, ``images_evaluation/``         train, test (characters)
glyphs      rendered into ``root`` or ``~/.cache/dmlfast``          train, test (characters)
folder      ``<class>/<image>``, or ``train/<class>/...`` + ``test/``  train, test (disjoint classes)
csv         a list file of ``path,label[,split]`` rows               train, test (or query, gallery)
==========  =====================================================  ===========================

``folder`` and ``csv`` are the user's own data (``dmlfast.data.custom``): options ``test_classes``
(N or a fraction of the classes to hold out, drawn with ``seed``) and, for ``csv``, ``list_file``.

``DatasetSplits`` has ``train``, ``test`` (``None`` for In-shop) and, for In-shop, ``query`` and
``gallery`` (one label mapping shared by both). Each split is an ``ImageList`` (``paths``,
``labels`` int64 in ``0..num_classes-1``, ``class_ids``, ``dataset``, ``split``). A missing file
raises ``DatasetLayoutError`` (naming the file, the expected layout and the download page); corrupt
images are skipped with one warning (``CorruptImageError`` when ``strict``); counts differing from the
published ones give a warning. ``glyphs`` needs no download: see ``dmlfast.data.glyphs``.

Loaders
-------
``make_loader(image_list, *, train, batch_size, device="cpu", loader="auto", ...)`` returns an
iterable with ``len()`` and ``set_epoch(epoch)`` yielding ``(images, labels)``: float32 NCHW
normalised images and int64 labels on ``device``. ``loader="dali"`` uses NVIDIA DALI (``mixed``
decode on a GPU, CPU-only mode otherwise), ``"nvjpeg"`` torchvision's batched GPU JPEG decoding
(``dmlfast.data.nvjpeg_loader``; CPU workers only read bytes and plan crops), ``"torch"`` a
torchvision ``DataLoader`` decoding with PIL in CPU workers, ``"auto"`` DALI when it is installed,
else nvJPEG on a CUDA device where torchvision can decode there, else torch. Training batches come from ``RandomBatchSampler`` (shuffled,
``drop_last``) or, with ``samples_per_class=m``, ``MPerClassSampler``; both are deterministic per
``(seed, epoch)`` and shard with ``shard_id``/``num_shards``. Transform defaults per dataset
(image size 224 for the real datasets, 64 for Omniglot, 32 for glyphs) are in ``DATASET_DEFAULTS``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from ._common import (
    DATASET_DEFAULTS,
    IMAGE_EXTENSIONS,
    CorruptImageError,
    DataDefaults,
    DatasetLayoutError,
    DatasetSplits,
    FolderImages,
    ImageList,
    check_images,
    dataset_defaults,
    image_folders,
    image_problem,
    remap_labels,
)
from .dali_loader import DALI_INSTALL_HINT, dali_available
from .nvjpeg_loader import gpu_decode_available
from .custom import CUSTOM_DATASETS, parse_test_classes, read_csv_list, read_folder
from .glyphs import read_glyphs
from .readers import read_cars196, read_cub, read_inshop, read_omniglot, read_sop
from .samplers import MPerClassSampler, RandomBatchSampler
from .transforms import NORMALIZATIONS, TransformConfig, normalize, transform_config

#: name -> reader(root, strict) -> DatasetSplits
DATASETS: Dict[str, Callable[..., DatasetSplits]] = {
    "CUB": read_cub,
    "Cars196": read_cars196,
    "SOP": read_sop,
    "In-shop": read_inshop,
    "Omniglot": read_omniglot,
    "glyphs": read_glyphs,
    "folder": read_folder,
    "csv": read_csv_list,
}

#: Keyword options ``load_dataset`` passes on, per dataset (the others take none).
DATASET_OPTIONS = {"folder": ("test_classes", "seed"), "csv": ("list_file", "test_classes", "seed")}

LOADERS = ("auto", "dali", "nvjpeg", "torch")

__all__ = [
    "DATASETS", "DATASET_DEFAULTS", "IMAGE_EXTENSIONS", "LOADERS", "NORMALIZATIONS", "DALI_INSTALL_HINT",
    "CUSTOM_DATASETS", "DATASET_OPTIONS", "CorruptImageError", "DataDefaults", "DatasetLayoutError", "DatasetSplits", "FolderImages",
    "ImageList", "MPerClassSampler", "RandomBatchSampler", "TransformConfig",
    "check_images", "choose_loader", "dali_available", "dataset_defaults", "gpu_decode_available", "image_folders",
    "image_problem", "load_dataset", "make_loader", "make_sampler", "normalize", "parse_test_classes", "remap_labels",
]


def load_dataset(name: str, root=None, strict: bool = False, **options) -> DatasetSplits:
    """Read dataset ``name`` (a key of ``DATASETS``) from ``root``.

    ``root`` is required for the real datasets; for ``glyphs`` it is the folder the set is rendered
    into (default ``$XDG_CACHE_HOME/dmlfast`` or ``~/.cache/dmlfast``). ``options``: those of
    ``DATASET_OPTIONS[name]`` (``folder``/``csv``: ``test_classes``, ``seed``; ``csv``: ``list_file``)."""
    if name not in DATASETS:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if root is None and name != "glyphs":
        raise ValueError(f"load_dataset: dataset {name!r} needs root= (the folder holding it)")
    if not isinstance(strict, bool):
        raise ValueError(f"load_dataset: strict must be a bool, got {strict!r}")
    unknown = sorted(set(options) - set(DATASET_OPTIONS.get(name, ())))
    if unknown:
        raise ValueError(f"load_dataset: dataset {name!r} takes options {list(DATASET_OPTIONS.get(name, ()))}, got {unknown}")
    return DATASETS[name](root, strict=strict, **options)


def make_sampler(labels, *, train: bool, batch_size: int, samples_per_class: Optional[int] = None, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1, drop_last: Optional[bool] = None):
    """The batch sampler ``make_loader`` uses: shuffled ``drop_last`` batches or m-per-class batches in
    training, sequential batches (last one partial) in evaluation."""
    if samples_per_class is not None:
        if not train:
            raise ValueError("make_sampler: samples_per_class is for training (train=True) only")
        if drop_last is False:
            raise ValueError("make_sampler: m-per-class batches are always full; drop_last=False is not supported with samples_per_class")
        return MPerClassSampler(labels, batch_size, samples_per_class, seed=seed, shard_id=shard_id, num_shards=num_shards)
    return RandomBatchSampler(labels, batch_size, shuffle=train, drop_last=train if drop_last is None else drop_last,
                              seed=seed, shard_id=shard_id, num_shards=num_shards)


def choose_loader(loader: str, device) -> str:
    """The loader ``make_loader`` uses for ``loader`` on ``device``: ``"auto"`` becomes ``"dali"`` when
    DALI is installed, else ``"nvjpeg"`` on a CUDA device where torchvision decodes JPEGs, else ``"torch"``."""
    if loader not in LOADERS:
        raise ValueError(f"choose_loader: loader must be one of {LOADERS}, got {loader!r}")
    if loader != "auto":
        return loader
    if dali_available():
        return "dali"
    return "nvjpeg" if gpu_decode_available(device) else "torch"


def make_loader(image_list: ImageList, *, train: bool, batch_size: int, device="cpu", loader: str = "auto",
                image_size: Optional[int] = None, resize_size: Optional[int] = None,
                crop_scale: Optional[Tuple[float, float]] = None, crop_ratio: Optional[Tuple[float, float]] = None,
                hflip: Optional[bool] = None, normalization="imagenet", samples_per_class: Optional[int] = None,
                seed: int = 0, num_workers: int = 2, shard_id: int = 0, num_shards: int = 1,
                drop_last: Optional[bool] = None):
    """Batches ``(images float32 N x 3 x S x S normalised, labels int64 N)`` on ``device``.

    ``train`` picks RandomResizedCrop + flip and shuffled batches (else resize + centre crop, in
    order). Transform arguments left as ``None`` come from ``DATASET_DEFAULTS[image_list.dataset]``;
    ``resize_size`` defaults to ``round(image_size * default_resize / default_size)``.
    ``normalization``: ``"imagenet"`` (RGB, mean/std of ImageNet), ``"bn_inception"`` (BGR, 0-255,
    mean [104, 117, 128]) or a backbone's ``{"mean": [r, g, b], "std": [r, g, b]}`` (0-1 scale). ``num_workers``: DataLoader workers, or DALI CPU threads. ``drop_last``
    defaults to ``train``. The returned object has ``len()``, ``set_epoch(epoch)``, ``sampler`` and
    ``backend`` (``"dali"``, ``"nvjpeg"`` or ``"torch"``)."""
    import torch

    if not isinstance(image_list, ImageList):
        raise TypeError(f"make_loader: image_list must be an ImageList, got {type(image_list).__name__}")
    if len(image_list) == 0:
        raise ValueError(f"make_loader: {image_list!r} is empty")
    if loader not in LOADERS:
        raise ValueError(f"make_loader: loader must be one of {LOADERS}, got {loader!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be a non-negative int, got {num_workers!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"make_loader: device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"make_loader: device {device} was asked for but CUDA is not available")
    cfg = transform_config(image_list.dataset, train=train, image_size=image_size, resize_size=resize_size, crop_scale=crop_scale,
                           crop_ratio=crop_ratio, hflip=hflip, normalization=normalization)
    sampler = make_sampler(image_list.labels, train=train, batch_size=batch_size, samples_per_class=samples_per_class,
                           seed=seed, shard_id=shard_id, num_shards=num_shards, drop_last=drop_last)
    if loader == "dali" and not dali_available():
        raise ImportError(f"make_loader: loader='dali' needs NVIDIA DALI, which is not installed: {DALI_INSTALL_HINT}; or use loader='torch'")
    loader = choose_loader(loader, device)
    if loader == "dali":
        from .dali_loader import DaliLoader

        return DaliLoader(image_list, sampler, cfg, device, num_threads=max(1, num_workers))
    if loader == "nvjpeg":
        from .nvjpeg_loader import NvjpegLoader

        return NvjpegLoader(image_list, sampler, cfg, device, num_workers)
    from .torch_loader import TorchLoader

    return TorchLoader(image_list, sampler, cfg, device, num_workers)
