"""A trained model ready to embed images: :func:`load` a training checkpoint, then
:meth:`TrainedModel.embed` image files, a folder or PIL images into float32 L2-normalised rows.

The checkpoint is read without running code from it (:func:`dmlfast.training.setup.load_model`:
``torch.load(weights_only=True)``), the model is rebuilt from the configuration saved with it, and
images get the run's evaluation transform (:class:`EvalTransform`): resize of the shorter side,
centre crop, the backbone's normalisation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


class EvalTransform:
    """The evaluation transform of a training run, as its loaders apply it: a PIL image -> RGB, shorter
    side resized to ``resize_size`` (bilinear, antialiased), centre crop of ``image_size`` x
    ``image_size``, then the backbone's normalisation (``normalization``: ``"imagenet"``: RGB, ImageNet
    mean/std; ``"bn_inception"``: BGR, 0-255, mean [104, 117, 128]).

    ``transform(image)`` -> float32 (3, S, S) normalised tensor (usable in a ``DataLoader`` of your
    own); :meth:`to_uint8` stops before the normalisation (uint8 (3, S, S) RGB), which is the input of
    an exported model (:mod:`dmlfast.inference.export`)."""

    def __init__(self, config):
        from dmlfast.data.transforms import transform_config
        from dmlfast.training.setup import image_options

        self.config = transform_config(config["dataset"], train=False, **image_options(config))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def resize_size(self) -> int:
        return self.config.resize_size

    @property
    def normalization(self):
        return self.config.normalization

    def to_uint8(self, image) -> torch.Tensor:
        """uint8 (3, S, S) RGB: the resized, centre-cropped ``image`` (a ``PIL.Image.Image``)."""
        from PIL import Image

        from dmlfast.data.transforms import pil_transform

        if not isinstance(image, Image.Image):
            raise TypeError(f"EvalTransform: image must be a PIL.Image.Image, got {type(image).__name__}")
        return pil_transform(image, self.config, seed=0)

    def __call__(self, image) -> torch.Tensor:
        from dmlfast.data import normalize

        return normalize(self.to_uint8(image)[None], self.normalization)[0]

    def __repr__(self) -> str:
        return (f"EvalTransform(resize shorter side to {self.resize_size} px, centre crop {self.image_size} x {self.image_size}, "
                f"normalization {self.normalization!r})")


class TrainedModel:
    """A training checkpoint's model in evaluation mode: ``model`` (a
    :class:`dmlfast.models.EmbeddingModel` on ``device``), ``config`` (the run's configuration, a dict),
    ``transform`` (:class:`EvalTransform`), ``dtype`` (the run's autocast dtype on this device, or
    ``None`` for float32), ``checkpoint`` (the file). Made by :func:`load`."""

    def __init__(self, model, config: Dict[str, Any], device: torch.device, dtype, checkpoint: Path):
        self.model, self.config, self.device, self.dtype, self.checkpoint = model, config, device, dtype, Path(checkpoint)
        self.transform = EvalTransform(config)
        self._sha256: Optional[str] = None

    @property
    def embedding_size(self) -> int:
        return self.config["embedding_size"]

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 (hex) of the checkpoint file, read once on first use: what a gallery index records
        to recognise the model its embeddings came from."""
        if self._sha256 is None:
            from dmlfast.training.gallery import file_digest

            self._sha256 = file_digest(self.checkpoint).hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return (f"TrainedModel({self.checkpoint}: {self.config['model']}, embedding {self.embedding_size}, device {self.device}, "
                f"{self.transform!r})")

    def embed(self, images, *, batch_size: int = 64, workers: int = 0, progress: Optional[bool] = None) -> torch.Tensor:
        """float32 (N, D) L2-normalised embeddings (on the CPU), one row per image, in order.

        ``images``: a folder (every image below it, in the order of
        :func:`dmlfast.training.gallery.gallery_from_folder`: sorted paths, links followed once,
        unreadable files skipped with a warning), a list of image paths (each must decode), a
        :class:`dmlfast.data.ImageList`, or one or a list of ``PIL.Image.Image``. ``workers``: loader
        processes for files (the training's loader); 0 reads them here, one batch at a time, without a
        loader to start (a few ms for one query image). ``progress``: a bar (default: when there is more
        than one batch; :func:`dmlfast.progress.progress_bars` silences it)."""
        from dmlfast.progress import bars_enabled
        from dmlfast.training.embedding import embed, embed_list

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TrainedModel.embed: batch_size must be a positive int, got {batch_size!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"TrainedModel.embed: workers must be an int >= 0, got {workers!r}")
        pictures = _as_pictures(images)
        if pictures is None:
            image_list = self._image_list(images)
            if workers > 0:
                show = (len(image_list) > batch_size if progress is None else progress) and bars_enabled()
                return embed_list(self.model, image_list, self.config, self.device, self.dtype, batch_size=batch_size,
                                  workers=workers, progress=show, desc="embed")
            pictures = image_list.paths
        show = (len(pictures) > batch_size if progress is None else progress) and bars_enabled()
        batches = _PictureBatches(pictures, self.transform, batch_size, self.device)
        embeddings, _ = embed(self.model, batches, self.device, self.dtype, show, "embed", self.embedding_size)
        return torch.nn.functional.normalize(embeddings.float(), dim=1).cpu()

    def _image_list(self, images):
        """An ImageList of the files ``images`` names, with the run's dataset (so its transform defaults)."""
        from dmlfast.data import ImageList, image_problem
        from dmlfast.training.gallery import gallery_from_folder

        if isinstance(images, ImageList):
            paths = images.paths
        elif isinstance(images, (str, Path)) and Path(images).is_dir():
            paths = gallery_from_folder(Path(images), flag="images")[0].paths
        elif isinstance(images, (str, Path)):
            raise ValueError(f"TrainedModel.embed: images must be a folder, a list of paths or PIL images; {images} is not a folder")
        else:
            paths = [os.fspath(p) for p in images]
            for p in paths:
                problem = "no such file" if not os.path.isfile(p) else image_problem(p)
                if problem is not None:
                    raise ValueError(f"TrainedModel.embed: {p}: {problem}")
        if len(paths) == 0:
            raise ValueError("TrainedModel.embed: no images given")
        return ImageList(paths, np.zeros(len(paths), dtype=np.int64), ["-"], self.config["dataset"], "embed")


def _as_pictures(images):
    """``images`` as a list of PIL images, or ``None`` when they are files (a folder, paths, an ImageList)."""
    from PIL import Image

    from dmlfast.data import ImageList

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        return list(images)
    if isinstance(images, (list, tuple)) and any(isinstance(i, Image.Image) for i in images):
        raise TypeError("TrainedModel.embed: images must be all PIL images or all paths, not a mix")
    if not isinstance(images, (str, Path, list, tuple, ImageList)):
        raise TypeError(f"TrainedModel.embed: images must be a folder, a list of paths, an ImageList or PIL images, got "
                        f"{type(images).__name__}")
    return None


class _PictureBatches:
    """Batches ``(normalised images on device, dummy labels)`` of PIL images, or of image files opened
    one batch at a time: what :func:`dmlfast.training.embedding.embed` iterates."""

    def __init__(self, pictures, transform: EvalTransform, batch_size: int, device):
        self.pictures, self.transform, self.batch_size, self.device = pictures, transform, batch_size, device

    def __len__(self) -> int:
        return -(-len(self.pictures) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.pictures), self.batch_size):
            chunk = [_opened(p) for p in self.pictures[start:start + self.batch_size]]
            yield torch.stack([self.transform(p) for p in chunk]).to(self.device), torch.zeros(len(chunk), dtype=torch.long)


def _opened(picture):
    """``picture`` itself, or the image file it names read into memory."""
    from PIL import Image

    if isinstance(picture, Image.Image):
        return picture
    with Image.open(picture) as image:
        image.load()
        return image


def load(checkpoint, device=None) -> TrainedModel:
    """The model of a ``python -m dmlfast.train`` checkpoint (``best.pt``/``last.pt``), ready to embed.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` (default: CUDA when
    available). The file is read with ``torch.load(weights_only=True)``: nothing in it can run
    code. Raises :class:`dmlfast.checks.InputError` (one line) for a missing, unsafe or foreign
    checkpoint or an unusable device."""
    from dmlfast.training.setup import load_model

    if not isinstance(checkpoint, (str, Path)):
        raise TypeError(f"load: checkpoint must be a path, got {type(checkpoint).__name__}")
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"load: device must be a str or torch.device, got {type(device).__name__}")
    model, config, device, dtype = load_model(Path(checkpoint), None if device is None else str(device))
    return TrainedModel(model, config, device, dtype, Path(checkpoint))
