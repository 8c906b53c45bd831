"""What keeps the accelerator fed, in one place: the model's memory layout and compilation, the
images' layout, and the images/s of the training steps.

* channels_last: a convolutional backbone on CUDA runs in NHWC (cuDNN's fastest layout for convolutions
  under autocast); a transformer keeps NCHW (its one convolution is the patch embedding).
* ``--compile``: ``torch.compile`` of the backbone, in place (``nn.Module.compile``), so the state dict
  keeps its names and checkpoints do not change. Compiling happens in the first step after the set
  of trained parameters changes (the first step, the end of the warm-up); those steps are left out
  of images/s.
* Pinned memory and non-blocking copies are the loaders' (``dmlfast.data``): batches arrive on the device.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether the model's backbone is convolutional (``backbone.prefers_channels_last``, true for the
    torchvision, BN-Inception and small CNN backbones)."""
    return bool(getattr(getattr(model, "backbone", model), "prefers_channels_last", True))


def prepare_model(model: nn.Module, device: torch.device, compile_backbone: bool = False) -> nn.Module:
    """``model`` on ``device``: channels_last for a convolutional backbone on CUDA, and its backbone
    compiled in place when ``compile_backbone``."""
    model = model.to(device)
    if device.type == "cuda" and prefers_channels_last(model):
        model = model.to(memory_format=torch.channels_last)
    if compile_backbone:
        model.backbone.compile()
    return model


def to_model_layout(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` in the memory layout :func:`prepare_model` gave ``model`` (channels_last for a
    convolutional backbone on CUDA)."""
    if images.is_cuda and prefers_channels_last(model):
        return images.contiguous(memory_format=torch.channels_last)
    return images


class EpochClock:
    """Images/s of one epoch's training steps (loader waits included), leaving out the first step when
    ``skip_first`` (a step that compiled the backbone)."""

    def __init__(self, skip_first: bool = False):
        self.start = time.perf_counter()
        self.skip_first = skip_first
        self.excluded_seconds = 0.0
        self.images = 0
        self.steps = 0

    def step_done(self, step_started: float, images: int) -> None:
        """Count a step that started at ``step_started`` (``time.perf_counter()``) and trained ``images`` images."""
        if self.skip_first and self.steps == 0:
            self.excluded_seconds += time.perf_counter() - step_started
        else:
            self.images += images
        self.steps += 1

    @property
    def seconds(self) -> float:
        """Seconds of the counted steps so far."""
        return max(time.perf_counter() - self.start - self.excluded_seconds, 0.0)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)
