"""Image-level mixup as IDML trains with it (docs/losses.md §6).

One λ ~ Beta(1, 1) and one random permutation π per step, drawn from torch's (CPU) generator so a
seeded run repeats exactly; x_mix = λ x + (1 - λ) x_π and the extra loss
λ L(x_mix, y) + (1 - λ) L(x_mix, y_π), added to the plain L(x, y): a second forward per step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def mixup_loss(forward: Callable[[torch.Tensor], Sequence[torch.Tensor]], loss_fn, images: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """λ L(forward(x_mix), y) + (1 - λ) L(forward(x_mix), y_π) for the batch (images, labels).

    ``forward`` maps images to the loss's model inputs (e.g. (μ,) or IDML's (μ, v)); ``loss_fn``
    takes them followed by the labels.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"mixup_loss: images and labels differ in batch size: {images.shape[0]} and {labels.shape[0]}")
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    permutation = torch.randperm(labels.shape[0]).to(labels.device)
    mixed = lam * images + (1 - lam) * images[permutation.to(images.device)]
    outputs = forward(mixed)
    return lam * loss_fn(*outputs, labels) + (1 - lam) * loss_fn(*outputs, labels[permutation])
