"""Shared pytest fixtures and markers for dmlfast's tests."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


def relative_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute error when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def write_colour_block_classes(root: Path, classes: int = 8, per_class: int = 4, seed: int = 0, noise: float = 20.0) -> Path:
    """A class-folder dataset under ``root``: each class a random 4x4 colour pattern, its 32 px
    images noisy copies (Gaussian noise of standard deviation ``noise`` grey levels;
    ``root/class_<c>/<i>.png``). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        base = rng.integers(0, 255, (4, 4, 3))
        for i in range(per_class):
            image = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, noise, (32, 32, 3))
            path = root / f"class_{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return root


def train_tiny_folder_run(base: Path, *, seed: int, test_classes: str) -> tuple:
    """``(data root, best.pt)`` of a 1-epoch smallcnn run on 8 colour-block classes under ``base``."""
    from dmlfast import train

    root = write_colour_block_classes(base / "data", seed=seed)
    out = base / "run"
    assert train.main(["--dataset", "folder", "--data-root", str(root), "--test-classes", test_classes, "--model", "smallcnn",
                       "--epochs", "1", "--batch-size", "8", "--image-size", "16", "--embedding-size", "16", "--workers", "0",
                       "--loader", "torch", "--no-progress", "--output", str(out)]) == 0
    return root, out / "best.pt"
