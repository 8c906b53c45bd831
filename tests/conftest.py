"""Shared pytest fixtures and markers for dmlfast's tests."""
import faulthandler
import gc
import os
import traceback
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


def write_colour_block_classes(root: Path, classes: int = 8, per_class: int = 4, seed: int = 0, noise: float = 20.0,
                               suffix: str = ".png") -> Path:
    """A class-folder dataset under ``root``: each class a random 4x4 colour pattern, its 32 px
    images noisy copies (Gaussian noise of standard deviation ``noise`` grey levels;
    ``root/class_<c>/<i><suffix>``, PNG or JPEG). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        base = rng.integers(0, 255, (4, 4, 3))
        for i in range(per_class):
            image = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, noise, (32, 32, 3))
            path = root / f"class_{c}" / f"{i}{suffix}"
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


def spawn_gloo_ranks(fn, world: int, folder: Path, *args) -> None:
    """Run ``fn(rank, world, folder, *args)`` in ``world`` spawned processes joined in one gloo
    process group; returns when every rank has finished.

    The rendezvous is a file in ``folder`` (no port to race for, and no rank hosts a store that the
    others still need while it exits). Each rank's stderr, and faulthandler's Python stacks if it
    crashes, go to ``folder/rank<r>.stderr``: a rank that dies fails the test with those logs, not
    only with its signal's name.
    """
    import torch.multiprocessing as mp

    folder = Path(folder)
    try:
        mp.spawn(_gloo_rank, args=(fn, world, str(folder), args), nprocs=world, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as error:
        logs = []
        for rank in range(world):
            path = folder / f"rank{rank}.stderr"
            text = path.read_text(errors="replace").strip() if path.is_file() else "(no log)"
            logs.append(f"--- rank {rank} stderr (last 40 lines) ---\n" + "\n".join(text.splitlines()[-40:]))
        raise pytest.fail.Exception(f"{str(error).strip()}\n" + "\n".join(logs), pytrace=False) from None


def _gloo_rank(rank: int, fn, world: int, folder: str, args: tuple) -> None:
    """One process of :func:`spawn_gloo_ranks`."""
    import torch.distributed as dist

    log = open(os.path.join(folder, f"rank{rank}.stderr"), "w")  # kept open until the process is gone
    os.dup2(log.fileno(), 2)  # C++ messages (e.g. std::terminate's) too, not only Python's
    faulthandler.enable(log, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        fn(rank, world, folder, *args)
        gc.collect()  # wrappers left in reference cycles (DDP) go now, while the group is alive
        dist.barrier()  # no rank tears its connections down while another still talks to it
    except BaseException:
        traceback.print_exc()  # into this rank's log: spawn reports only the first rank to fail
        raise
    finally:
        dist.destroy_process_group()
