"""Images/s of a full training step (load, forward, loss, backward, clip, AdamW) and the loss's share.

    python benchmarks/bench_train.py [--model resnet50] [--size 224] [--batch-size 16] [--steps 4]
                                     [--device cpu|cuda] [--amp bf16|fp16|off] [--loaders dali torch]
                                     [--weights none] [--json PATH]

Writes ``--images`` random-content JPEGs (500 x 375) into a temporary folder, builds the model of
``python -m dmlfast.train`` (GAP+GMP head, embedding 512) with Proxy-Anchor over ``--classes``
proxies, and for each loader times one warm-up step then ``--steps`` steps. The step is split so the
loss's forward + backward can be timed alone: the embeddings are detached, the fused loss runs its
forward and backward on them, then their gradient is sent back through the network (the same
arithmetic as one ``loss.backward()``). Prints a markdown table: images/s of the whole step
(including waiting for the loader), the share of the step spent in the loss, and in the loader.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dmlfast
import dmlfast.data as D
from dmlfast.models import NORMALIZATION, build_model


def write_images(folder: Path, n: int, classes: int) -> D.ImageList:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return D.ImageList(paths, np.arange(n) % classes)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(image_list, loader_name, args, device, dtype):
    torch.manual_seed(0)
    model = build_model(args.model, 512, weights=args.weights).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = dmlfast.ProxyAnchorLoss(args.classes, 512).to(device)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": loss_fn.parameters(), "lr": 1e-2}], lr=1e-4)
    loader = D.make_loader(image_list, train=True, batch_size=args.batch_size, image_size=args.size, loader=loader_name,
                           device=device, normalization=NORMALIZATION[args.model], num_workers=args.workers)
    totals = {"step": 0.0, "loss": 0.0, "data": 0.0}
    images = steps = 0
    epoch = 0
    while steps < args.steps + 1:
        loader.set_epoch(epoch)
        epoch += 1
        it = iter(loader)
        while steps < args.steps + 1:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            sync(device)
            t1 = time.perf_counter()
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                emb = model(x)
            sync(device)
            t2 = time.perf_counter()
            detached = emb.detach().requires_grad_(True)
            loss = loss_fn(detached, y)
            loss.backward()
            sync(device)
            t3 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            emb.backward(detached.grad)
            torch.nn.utils.clip_grad_value_(model.parameters(), 10.0)
            torch.nn.utils.clip_grad_value_(loss_fn.parameters(), 10.0)
            optimizer.step()
            loss_fn.proxies.grad = None
            sync(device)
            t4 = time.perf_counter()
            if steps > 0:  # the first step is warm-up
                totals["step"] += t4 - t0
                totals["loss"] += t3 - t2
                totals["data"] += t1 - t0
                images += len(y)
            steps += 1
    return {"loader": loader.backend, "images_per_s": images / totals["step"], "loss_share": totals["loss"] / totals["step"],
            "data_share": totals["data"] / totals["step"], "steps": args.steps, "batch_size": args.batch_size}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--weights", default="none", help="imagenet|none|PATH (speed does not depend on it)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per loader (after one warm-up step)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16")
    p.add_argument("--loaders", nargs="+", choices=("dali", "torch"), default=["dali", "torch"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.batch_size < 1 or args.steps < 1 or args.images < args.batch_size:
        p.error("need --batch-size >= 1, --steps >= 1 and --images >= --batch-size")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_list = write_images(Path(tmp), args.images, args.classes)
        for loader_name in args.loaders:
            if loader_name == "dali" and not D.dali_available():
                print(f"skipping dali: {D.DALI_INSTALL_HINT}")
                continue
            rows.append(run(image_list, loader_name, args, device, dtype))
    print(f"\n{args.model} at {args.size} px, batch {args.batch_size}, autocast {args.amp}, Proxy-Anchor over {args.classes} "
          f"proxies, {args.steps} timed steps, {name}\n")
    print("| loader | images/s (whole step) | loss share | loader wait share |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['images_per_s']:.2f} | {100 * r['loss_share']:.2f} % | {100 * r['data_share']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
