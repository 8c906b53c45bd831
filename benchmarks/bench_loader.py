"""Images/s of the DALI and torchvision loaders on generated JPEGs.

    python benchmarks/bench_loader.py [--images 300] [--size 224] [--workers 2] [--device cpu|cuda]

Writes `--images` random-content JPEGs (500 x 375, like CUB/SOP photos) into a temporary folder,
then times one warm-up epoch and `--epochs` measured epochs per (loader, train/eval) and prints a
markdown table. On a CUDA device DALI decodes with ``device="mixed"``.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dmlfast.data as D


def write_images(folder: Path, n: int) -> D.ImageList:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        p = folder / f"{i:05d}.jpg"
        im.save(p, quality=90)
        paths.append(p)
    return D.ImageList(paths, np.arange(n) % 50)


def measure(image_list, loader, train, args) -> float:
    ld = D.make_loader(image_list, train=train, batch_size=args.batch_size, image_size=args.size, loader=loader,
                       device=args.device, num_workers=args.workers)
    for _ in ld:  # warm-up: worker start, DALI buffers
        pass
    n, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        ld.set_epoch(epoch + 1)
        for x, y in ld:
            n += len(y)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    loaders = ["torch"] + (["dali"] if D.dali_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp), args.images)
        rows = [(ld, mode, measure(images, ld, mode == "train", args)) for ld in loaders for mode in ("train", "eval")]
    print(f"| loader | transform | images/s ({args.images} JPEGs 500x375 -> {args.size} px, {args.workers} workers, {args.device}) |")
    print("|---|---|---|")
    for ld, mode, ips in rows:
        print(f"| {ld}{' (mixed decode)' if ld == 'dali' and args.device.startswith('cuda') else ''} | {mode} | {ips:,.0f} |")


if __name__ == "__main__":
    main()
