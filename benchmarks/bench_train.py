"""Images/s of full training steps (load, forward, loss, backward, clip, AdamW) per backbone x loader x
compile, and where a step's time goes: waiting for data, the backbone (forward, backward, optimizer)
and the fused loss.

    python benchmarks/bench_train.py [--models resnet50 timm:vit_small_patch16_224] [--loaders dali nvjpeg torch]
                                     [--compile off on] [--size 224] [--batch-size 180] [--steps 20]
                                     [--device cpu|cuda] [--amp bf16|fp16|off] [--workers N] [--json PATH]

Writes ``--images`` random-content JPEGs (500 x 375) into a temporary folder. Each case builds the
model as ``python -m dmlfast.train`` does (random weights; GAP+GMP head for a CNN, a ViT's class
token; embedding 512; channels_last for a CNN on CUDA; ``--compile``: the backbone compiled in place)
with Proxy-Anchor over ``--classes`` proxies and the backbone's own normalization, runs
``--warmup-steps`` steps (compilation included) and then two timed passes:

* throughput: ``--steps`` steps as the trainer runs them (one host read of the loss per step);
  images/s = images / wall time, loader waits included;
* profile: ``--profile-steps`` steps with a device synchronisation between the phases, so each
  phase's time is its own: data (waiting for the next batch), loss (the fused loss's forward and
  backward on detached embeddings) and backbone (the model's forward, then the embeddings' gradient
  sent back through it, clipping and AdamW: the same arithmetic as one ``loss.backward()``).

Prints a markdown table and, with ``--json``, rewrites the file after every case.
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
from dmlfast.models import build_model, input_spec
from dmlfast.training.throughput import prepare_model, to_model_layout
from outputs import add_overwrite_argument, refuse_existing


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


class Batches:
    """Endless batches of a loader, epoch after epoch."""

    def __init__(self, loader):
        self.loader, self.epoch, self.it = loader, 0, iter(())

    def next(self):
        while True:
            try:
                return next(self.it)
            except StopIteration:
                self.loader.set_epoch(self.epoch)
                self.epoch += 1
                self.it = iter(self.loader)


def build(args, model_name, loader_name, compiled, image_list, device):
    torch.manual_seed(0)
    model = prepare_model(build_model(model_name, 512, weights="none", image_size=args.size), device, compiled).train()
    loss_fn = dmlfast.ProxyAnchorLoss(args.classes, 512).to(device)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": loss_fn.parameters(), "lr": 1e-2}], lr=1e-4)
    loader = D.make_loader(image_list, train=True, batch_size=args.batch_size, image_size=args.size, loader=loader_name,
                           device=device, normalization=input_spec(model_name).normalization, num_workers=args.workers)
    return model, loss_fn, optimizer, loader


def step(model, loss_fn, optimizer, x, y, device, dtype, marks=None):
    """One training step; with ``marks`` (a list), the device is synchronised and the time taken after
    the forward, after the loss and at the end."""
    x = to_model_layout(model, x)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        emb = model(x)
    if marks is not None:
        sync(device)
        marks.append(time.perf_counter())
    detached = emb.detach().requires_grad_(True)
    loss = loss_fn(detached, y)
    loss.backward()
    if marks is not None:
        sync(device)
        marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=False)
    emb.backward(detached.grad)
    torch.nn.utils.clip_grad_value_(model.parameters(), 10.0)
    torch.nn.utils.clip_grad_value_(loss_fn.parameters(), 10.0)
    optimizer.step()
    loss_fn.proxies.grad = None
    if marks is not None:
        sync(device)
        marks.append(time.perf_counter())
    return loss


def run_case(args, model_name, loader_name, compiled, image_list, device, dtype):
    started = time.perf_counter()
    model, loss_fn, optimizer, loader = build(args, model_name, loader_name, compiled, image_list, device)
    batches = Batches(loader)
    for _ in range(args.warmup_steps):  # compilation, cuDNN's plans, the loader's workers starting
        step(model, loss_fn, optimizer, *batches.next(), device, dtype).item()
    sync(device)
    warmup_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(model, loss_fn, optimizer, *batches.next(), device, dtype).item()  # the trainer reads each step's loss
    sync(device)
    images_per_s = args.steps * args.batch_size / (time.perf_counter() - t0)
    phases = {"data": 0.0, "backbone": 0.0, "loss": 0.0}
    for _ in range(args.profile_steps):
        start = time.perf_counter()
        x, y = batches.next()
        sync(device)
        marks = [time.perf_counter()]
        step(model, loss_fn, optimizer, x, y, device, dtype, marks)
        phases["data"] += marks[0] - start
        phases["backbone"] += (marks[1] - marks[0]) + (marks[3] - marks[2])
        phases["loss"] += marks[2] - marks[1]
    total = sum(phases.values())
    return {"model": model_name, "loader": loader.backend, "compile": compiled, "images_per_s": images_per_s,
            **{f"{k}_share": v / total for k, v in phases.items()}, "profiled_step_ms": 1000 * total / args.profile_steps,
            "warmup_seconds": warmup_seconds, "steps": args.steps, "batch_size": args.batch_size, "size": args.size}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "timm:vit_small_patch16_224"])
    p.add_argument("--loaders", nargs="+", choices=("dali", "nvjpeg", "torch"), default=["dali", "nvjpeg", "torch"])
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=180)
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (after the warm-up)")
    p.add_argument("--profile-steps", type=int, default=8, help="steps timed phase by phase")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--images", type=int, default=720)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16")
    p.add_argument("--json", type=Path)
    add_overwrite_argument(p)
    args = p.parse_args()
    if min(args.batch_size, args.steps, args.profile_steps, args.warmup_steps) < 1 or args.images < args.batch_size:
        p.error("need --batch-size, --steps, --profile-steps, --warmup-steps >= 1 and --images >= --batch-size")
    refuse_existing(args.json, args.overwrite, "--json")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = {"device": name, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_list = write_images(Path(tmp), args.images, args.classes)
        for model_name in args.models:
            for loader_name in args.loaders:
                if loader_name == "dali" and not D.dali_available():
                    print(f"skipping dali: {D.DALI_INSTALL_HINT}")
                    continue
                if loader_name == "nvjpeg" and device.type == "cuda" and not D.gpu_decode_available(device):
                    print("skipping nvjpeg: torchvision cannot decode JPEGs on this GPU")
                    continue
                for compiled in args.compile:
                    rows.append(run_case(args, model_name, loader_name, compiled == "on", image_list, device, dtype))
                    r = rows[-1]
                    print(f"{model_name} {r['loader']} compile {compiled}: {r['images_per_s']:.1f} images/s "
                          f"(warm-up {r['warmup_seconds']:.0f} s)", flush=True)
                    if args.json:
                        args.json.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print(f"\n{args.size} px, batch {args.batch_size}, autocast {args.amp}, Proxy-Anchor over {args.classes} proxies, "
          f"{args.steps} timed + {args.profile_steps} profiled steps, {name}\n")
    print("| backbone | loader | compile | images/s | data | backbone | loss | profiled step |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['loader']} | {'on' if r['compile'] else 'off'} | {r['images_per_s']:.1f} | "
              f"{100 * r['data_share']:.1f} % | {100 * r['backbone_share']:.1f} % | {100 * r['loss_share']:.2f} % | "
              f"{r['profiled_step_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
