"""Fused proxy losses, forward + backward, against the usual ways of computing them (PERF.md).

For each loss and class count (B = 256, D = 512 unless given) it times, side by side on one machine:

- ``gemm3``: the three B x C x D matrix products any implementation must do (S = X Pᵀ, G P, Gᵀ X),
  the floor every other figure is divided by;
- ``dmlfast``: the fused op;
- ``eager``: the float32 eager reference (dmlfast.reference, the official formulas);
- ``compiled``: torch.compile of that reference;
- ``pml``: pytorch-metric-learning's loss (pinned 2.9.0), when installed (it has no Proxy-ISA or IDML).

``proxy_isa`` uses per-class bands typical of a trained run (s̄ = 0.1, θ = -0.3, w = 0.18,
easy-negative weight 0.01, positive filter on), so every band of docs/losses.md §3.3 is exercised.
``idml`` (docs/losses.md §6) adds a B x D uncertainty embedding of unit rows (the released model's) with its
own gradient; the embeddings are unit rows as the model emits them.

Each (implementation, loss, C) runs in a fresh subprocess so its peak memory is its own. Time is
the median of ``--repeats`` runs after warm-up; memory is the peak beyond the inputs and their two
gradients (which every implementation must hold), from ru_maxrss on the CPU and
torch.cuda.max_memory_allocated on the GPU. On the CPU, one thread (PERF.md). Prints a markdown
table of ratios and writes JSON with every figure.

    python benchmarks/bench_losses.py                       # all cases, CPU
    python benchmarks/bench_losses.py --cases SOP --repeats 9
    python benchmarks/bench_losses.py --device cuda --json out.json
    python benchmarks/bench_losses.py --interleave --cases SOP --implementations gemm3 dmlfast --repeats 30
"""
import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time

from outputs import add_overwrite_argument, refuse_existing
from timing import cuda_step_times

CASES = {"CUB": 100, "In-shop": 3_997, "SOP": 11_318, "100k": 100_000, "1M": 1_000_000}
IMPLEMENTATIONS = ("gemm3", "dmlfast", "eager", "compiled", "pml")
LOSSES = ("proxy_anchor", "proxy_nca", "proxy_isa", "idml", "cosface", "arcface", "subcenter_arcface", "soft_triple")
#: Proxy rows per class of the class-center losses (the others have one): C classes have C·K proxies, the
#: three GEMMs run over all of them.
CENTERS = {"subcenter_arcface": 3, "soft_triple": 10}
NCA_SCALE = 18.0  # pml's softmax_scale = scale / 2


def current_rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def isa_bands(proxies):
    """Per-class Proxy-ISA inputs of a trained run (docs/losses.md §3.2 at saturation), as keyword arguments."""
    import torch

    full = lambda value: torch.full((proxies.shape[0],), value, device=proxies.device)  # noqa: E731
    return {"class_center": full(0.1), "class_threshold": full(-0.3), "class_weight": full(0.18),
            "easy_negative_weight": full(0.01)}


def build_step(implementation, loss, x, p, labels):
    """A callable that runs forward + backward once and returns nothing."""
    import torch

    import dmlfast
    from dmlfast import reference

    if implementation == "gemm3":
        grad_s = torch.randn(x.shape[0], p.shape[0], device=x.device)
        xd, pd = x.detach(), p.detach()

        def step():
            torch.mm(xd, pd.T)
            torch.mm(grad_s, pd)
            torch.mm(grad_s.T, xd)

        return step
    if implementation == "pml":
        from pytorch_metric_learning import losses as pml

        if loss in ("proxy_isa", "idml"):
            raise SystemExit(f"pytorch-metric-learning has no {loss}")
        classes, dim = p.shape[0] // CENTERS.get(loss, 1), p.shape[1]
        module = {
            "proxy_anchor": lambda: pml.ProxyAnchorLoss(classes, dim),
            "proxy_nca": lambda: pml.ProxyNCALoss(classes, dim, softmax_scale=NCA_SCALE / 2),
            "cosface": lambda: pml.CosFaceLoss(num_classes=classes, embedding_size=dim),
            "arcface": lambda: pml.ArcFaceLoss(num_classes=classes, embedding_size=dim),
            "subcenter_arcface": lambda: pml.SubCenterArcFaceLoss(num_classes=classes, embedding_size=dim, sub_centers=3),
            "soft_triple": lambda: pml.SoftTripleLoss(classes, dim, centers_per_class=10),
        }[loss]().to(x.device)
        weights = next(module.parameters())
        with torch.no_grad():
            weights.copy_(p if weights.shape == p.shape else p.T)
        fn = lambda: module(x, labels)  # noqa: E731
    else:
        dml = implementation == "dmlfast"
        kwargs = {"proxy_anchor": {}, "proxy_nca": {"scale": NCA_SCALE}, "proxy_isa": isa_bands(p), "idml": {},
                  "cosface": {}, "arcface": {} if dml else {"margin": math.radians(28.6)},
                  "subcenter_arcface": {"sub_centers": 3, **({} if dml else {"margin": math.radians(28.6)})},
                  # the centre regulariser is eager in every implementation, and PML has none
                  "soft_triple": {"centers_per_class": 10, "tau": 0.0}}[loss]
        name = {"idml": "idml_proxy_anchor_loss", "subcenter_arcface": "arcface_loss"}.get(loss, f"{loss}_loss")
        base = getattr(dmlfast.functional if dml else reference, name)
        if implementation == "compiled":
            base = torch.compile(base)
        if loss == "idml":
            with torch.no_grad():
                x.copy_(torch.nn.functional.normalize(x, dim=1))
            uncertainty = torch.nn.functional.normalize(torch.randn_like(x), dim=1).requires_grad_()
            fn = lambda: base(x, uncertainty, p, labels)  # noqa: E731
        else:
            fn = lambda: base(x, p, labels, **kwargs)  # noqa: E731

    def step():
        x.grad = None
        p.grad = None
        fn().backward()

    return step


def worker(args):
    """Measure one (implementation, loss, C) in this process and print one JSON line."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batch, dim, classes = args.batch, args.dim, args.classes
    # On the GPU, rotate among input sets that together exceed the L2 cache (PERF.md), so repeated
    # steps do not find the proxies already cached; the CPU's caches are far smaller than one set.
    set_bytes = (batch + classes * CENTERS.get(args.loss, 1)) * dim * 4
    sets = min(4, max(1, (256 << 20) // set_bytes)) if device.type == "cuda" else 1
    steps = []
    for _ in range(sets):
        x = torch.randn(batch, dim, device=device).requires_grad_()
        p = torch.randn(classes * CENTERS.get(args.loss, 1), dim, device=device).requires_grad_()
        labels = torch.randint(0, classes, (batch,), device=device)
        steps.append(build_step(args.implementation, args.loss, x, p, labels))

    grads_bytes = (batch + classes * CENTERS.get(args.loss, 1)) * dim * 4 if args.implementation != "gemm3" else 0
    if device.type == "cuda":
        times_ms, peak = cuda_step_times(steps, args.warmup, args.repeats)
        times = [t / 1e3 for t in times_ms]
        baseline, grads_bytes = 0, grads_bytes * sets
    else:
        baseline = current_rss_bytes()
        for _ in range(args.warmup):
            steps[0]()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            steps[0]()
            times.append(time.perf_counter() - start)
    if device.type != "cuda":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "extra_peak_mb": max(0, peak - baseline - grads_bytes) / 2**20,
    }))


def run_worker(args, implementation, loss, classes):
    cmd = [
        sys.executable, __file__, "--worker", "--implementation", implementation, "--loss", loss,
        "--classes", str(classes), "--batch", str(args.batch), "--dim", str(args.dim),
        "--device", args.device, "--threads", str(args.threads),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": reason[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(results, args):
    lines = [
        f"B={args.batch}, D={args.dim}, device={args.device}"
        + (f", {args.threads} thread(s)" if args.device == "cpu" else "")
        + f"; median of {args.repeats} after {args.warmup} warm-up; time ratios to the three GEMMs (gemm3)",
        "",
        "| loss | C | gemm3 ms | dmlfast | eager | compiled | pml | dmlfast / eager | dmlfast / pml | extra MB: dmlfast | eager | compiled | pml | B×C fp32 MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        figures = row["figures"]
        floor = figures["gemm3"].get("median_ms")

        def ratio(name, base=floor):
            value = figures[name].get("median_ms")
            return f"{value / base:.2f}×" if value and base else "n/a"

        def memory(name):
            value = figures[name].get("extra_peak_mb")
            return f"{value:.0f}" if value is not None else "n/a"

        dml = figures["dmlfast"].get("median_ms")
        lines.append(
            f"| {row['loss']} | {row['classes']:,} | {f'{floor:.1f}' if floor else 'n/a'} | {ratio('dmlfast')} | {ratio('eager')} | "
            f"{ratio('compiled')} | {ratio('pml')} | {ratio('dmlfast', figures['eager'].get('median_ms')) if dml else 'n/a'} | "
            f"{ratio('dmlfast', figures['pml'].get('median_ms')) if dml else 'n/a'} | {memory('dmlfast')} | "
            f"{memory('eager')} | {memory('compiled')} | {memory('pml')} | {args.batch * row['classes'] * 4 / 2**20:.0f} |"
        )
    return "\n".join(lines)


def interleaved(args):
    """Time the implementations in one process, one repetition of each per round (PERF.md: the
    shared machines have slow phases), and report each one's median per-round ratio to gemm3."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [f"B={args.batch}, D={args.dim}, {args.threads} thread(s); {args.repeats} interleaved rounds after "
             f"{args.warmup} warm-up; median of the per-round ratios to gemm3 (min ms of gemm3)",
             "", "| loss | C | gemm3 min ms | " + " | ".join(i for i in args.implementations if i != "gemm3") + " |",
             "|---|---|---|" + "---|" * (len(args.implementations) - 1)]
    results = []
    for case in args.cases:
        for loss in args.losses:
            classes = CASES[case]
            steps = {}
            for implementation in args.implementations:
                x = torch.randn(args.batch, args.dim, device=device).requires_grad_()
                p = torch.randn(classes * CENTERS.get(loss, 1), args.dim, device=device).requires_grad_()
                labels = torch.randint(0, classes, (args.batch,), device=device)
                try:
                    steps[implementation] = build_step(implementation, loss, x, p, labels)
                except SystemExit:  # pytorch-metric-learning has no such loss
                    continue
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            times = {name: [] for name in steps}
            for _ in range(args.repeats):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            ratios = {name: statistics.median(t / g for t, g in zip(times[name], times["gemm3"]))
                      for name in steps if name != "gemm3"}
            results.append({"case": case, "loss": loss, "classes": classes, "gemm3_min_ms": 1e3 * min(times["gemm3"]),
                            "median_ratio_to_gemm3": ratios, "times_ms": {n: [1e3 * t for t in v] for n, v in times.items()}})
            lines.append(f"| {loss} | {classes:,} | {1e3 * min(times['gemm3']):.1f} | "
                         + " | ".join(f"{ratios[n]:.2f}×" if n in ratios else "n/a"
                                      for n in args.implementations if n != "gemm3") + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"meta": {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "mode": "interleaved",
                                "batch": args.batch, "dim": args.dim, "threads": args.threads},
                       "results": results}, out, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (PERF.md: one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write every figure here")
    add_overwrite_argument(parser)
    parser.add_argument("--interleave", action="store_true",
                        help="time in one process, one repetition of each implementation per round (no memory figures)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    refuse_existing(args.json, args.overwrite, "--json")
    if args.interleave:
        if "gemm3" not in args.implementations:
            parser.error("--interleave reports ratios to gemm3: include it in --implementations")
        interleaved(args)
        return

    results = []
    for case in args.cases:
        for loss in args.losses:
            figures = {name: {} for name in IMPLEMENTATIONS}
            for implementation in args.implementations:
                figures[implementation] = run_worker(args, implementation, loss, CASES[case])
                print(f"{case:>7} {loss:<12} {implementation:<9} {figures[implementation]}", file=sys.stderr, flush=True)
            results.append({"case": case, "loss": loss, "classes": CASES[case], "figures": figures})
    import torch

    table = markdown_table(results, args)
    print(table)
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "batch": args.batch, "dim": args.dim, "threads": args.threads,
            "repeats": args.repeats,
        }
        if args.device.startswith("cuda"):
            meta["gpu"] = torch.cuda.get_device_name()
        with open(args.json, "w") as out:
            json.dump({"meta": meta, "results": results, "table": table}, out, indent=1)


if __name__ == "__main__":
    main()
