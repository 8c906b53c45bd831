"""Where a fused loss step spends its time on the GPU: torch.profiler tables for one configuration.

    python benchmarks/profile_gpu.py [--loss proxy_anchor|proxy_nca] [--classes 100] [--batch 256] [--dim 512]

Runs forward + backward of the fused op (and of the eager reference, for comparison) a few times
under torch.profiler with CPU and CUDA activities and prints, for each, the operators sorted by
total GPU time and by host time. Read them together: the first H100 run showed the fused ops far
above the GEMM floor at small class counts, which is either many small kernels (GPU table) or
host-side work the GPU waits for, e.g. behind the one device-to-host read of the value checks
(host table).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dmlfast import functional, reference


def step_for(implementation: str, loss: str, x: torch.Tensor, p: torch.Tensor, labels: torch.Tensor):
    fn = getattr(functional if implementation == "dmlfast" else reference, f"{loss}_loss")

    def step():
        x.grad = None
        p.grad = None
        fn(x, p, labels).backward()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("proxy_anchor", "proxy_nca"), default="proxy_anchor")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15, help="operators shown per table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim, device="cuda", requires_grad=True)
    p = torch.randn(args.classes, args.dim, device="cuda", requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch,), device="cuda")
    for implementation in ("dmlfast", "eager"):
        step = step_for(implementation, args.loss, x, p, labels)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n## {implementation} {args.loss}, B={args.batch} C={args.classes} D={args.dim}, {args.steps} steps")
        print(events.table(sort_by="device_time_total", row_limit=args.rows))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
