"""Class-sharded proxies (dmlfast.sharded) against one process holding the whole table.

One training step of the proxy side at C = 1,000,000, D = 512, B = 256 per process (defaults): the
fused loss forward + backward and an Adam step on the proxies, measured

- ``single``: one process, the whole table (dmlfast.ProxyAnchorLoss / ProxyNCALoss), batch B, and
  again with the sharded runs' global batch N·B (the same loss computation in one process);
- ``sharded xN``: N gloo processes on this CPU, each holding C/N proxies and their Adam state, each
  with its own batch of B (global batch N·B), embeddings all-gathered, the loss that of the
  global batch (for the softmax family with the distributed log-sum-exp).

Each configuration runs in fresh processes, so every peak is its own: the per-rank peak RSS beyond
the process's baseline after importing torch (ru_maxrss), and the median step time with its split
into loss (forward + backward, including the collectives) and optimizer step. One thread per
process (PERF.md). Prints a markdown table and writes JSON.

    python benchmarks/bench_sharded.py                          # C = 1M, both families, 2 ranks
    python benchmarks/bench_sharded.py --classes 100000 --world 2 3 --steps 5
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from outputs import add_overwrite_argument, refuse_existing

LOSSES = ("proxy_anchor", "proxy_nca")


def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_steps(rank, world, args, init_file, out_file):
    """One process of a configuration: build the loss and Adam, time ``args.steps`` steps, write JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    baseline = rss_bytes()
    if world > 0:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=max(world, 1))
    import dmlfast
    from dmlfast import sharded

    torch.manual_seed(0)
    if world == 0:  # the unsharded baseline
        loss_fn = (dmlfast.ProxyAnchorLoss(args.classes, args.dim) if args.loss == "proxy_anchor"
                   else dmlfast.ProxyNCALoss(args.classes, args.dim))
    else:
        name = "ProxyAnchor" if args.loss == "proxy_anchor" else "ProxyNCA"
        loss_fn = sharded.make_sharded_loss(name, args.classes, args.dim)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + rank)
    batches = [(torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=gen), dim=1).requires_grad_(),
                torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(2)]
    loss_times, step_times = [], []
    for step in range(args.warmup + args.steps):
        x, labels = batches[step % 2]
        if world > 0:
            dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss_fn(x, labels).backward()
        middle = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        if step >= args.warmup:
            loss_times.append(middle - start)
            step_times.append(end - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    result = {"rank": rank, "proxies": list(loss_fn.proxies.shape), "step_s": statistics.median(step_times),
              "loss_s": statistics.median(loss_times), "optimizer_s": statistics.median(s - l for s, l in zip(step_times, loss_times)),
              "peak_bytes": peak}
    with open(out_file, "w") as f:
        json.dump(result, f)
    if world > 0:
        dist.barrier()
        dist.destroy_process_group()


def _spawned(rank, world, args, init_file, folder):
    run_steps(rank, world, args, init_file, os.path.join(folder, f"rank{rank}.json"))


def measure(args, world, batch):
    """Per-rank results of one configuration (world 0: the single unsharded process) with ``batch``
    embeddings per process."""
    import torch.multiprocessing as mp

    args = argparse.Namespace(**{**vars(args), "batch": batch})
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_spawned, args=(world, args, os.path.join(folder, "init"), folder), nprocs=max(world, 1), join=True)
        return [json.load(open(os.path.join(folder, f"rank{rank}.json"))) for rank in range(max(world, 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="embeddings per process")
    parser.add_argument("--world", type=int, nargs="+", default=[2], help="process counts of the sharded runs")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="bench_sharded.json")
    add_overwrite_argument(parser)
    args = parser.parse_args()
    if any(w < 1 for w in args.world) or min(args.classes, args.dim, args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--classes, --dim, --batch, --steps and every --world must be >= 1, --warmup >= 0")
    refuse_existing(args.json, args.overwrite, "--json")

    rows, records = [], []
    for loss in args.losses:
        args.loss = loss
        single = measure(args, 0, args.batch)[0]
        records.append({"loss": loss, "processes": 1, "sharded": False, "global_batch": args.batch, "ranks": [single]})
        rows.append((loss, "single", args.batch, single["proxies"][0], single, single, single))
        for world in args.world:
            wide = measure(args, 0, world * args.batch)[0]
            records.append({"loss": loss, "processes": 1, "sharded": False, "global_batch": world * args.batch, "ranks": [wide]})
            rows.append((loss, "single", world * args.batch, wide["proxies"][0], wide, wide, single))
            ranks = measure(args, world, args.batch)
            records.append({"loss": loss, "processes": world, "sharded": True, "global_batch": world * args.batch, "ranks": ranks})
            worst = max(ranks, key=lambda r: r["step_s"])
            largest = max(ranks, key=lambda r: r["peak_bytes"])
            rows.append((loss, f"sharded x{world}", world * args.batch, max(r["proxies"][0] for r in ranks), worst, largest, single))

    print(f"\nC = {args.classes:,}, D = {args.dim}, B = {args.batch} per process, Adam on the proxies, one thread per process, "
          f"median of {args.steps} steps\n")
    print("| loss | run | global batch | proxies / rank | step s (loss + Adam), slowest rank | step / single B | "
          "peak GB, largest rank | peak / single B |")
    print("|---|---|---|---|---|---|---|---|")
    for loss, run, global_batch, proxies, timing, memory, base in rows:
        print(f"| {loss} | {run} | {global_batch} | {proxies:,} | {timing['step_s']:.2f} ({timing['loss_s']:.2f} + "
              f"{timing['optimizer_s']:.2f}) | {timing['step_s'] / base['step_s']:.2f} | {memory['peak_bytes'] / 2**30:.2f} | "
              f"{memory['peak_bytes'] / base['peak_bytes']:.2f} |")
    with open(args.json, "w") as f:
        json.dump({"machine": platform.node(), "python": sys.version.split()[0], "classes": args.classes, "dim": args.dim,
                   "batch_per_process": args.batch, "steps": args.steps, "results": records}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
