"""The timing matrix of benchmarks/gpu_check.sh: the fused losses on a GPU, side by side, in one process.

For proxy_anchor, proxy_nca, idml, arcface and soft_triple (K = 10 centers per class, up to 100,000
classes) x C in {100, 11,318, 100,000, 1,000,000} (B = 256, D = 512) x
precision in {fp32 (matmul precision "highest"), tf32 ("high"), bf16 (autocast: bf16 embeddings,
float32 proxies)} it times forward + backward of

- ``gemm3``: the three B x C x D GEMMs in that precision (S = X Pᵀ, G P, Gᵀ X; under autocast
  P is cast to bf16 once per step, as autocast does), the floor;
- ``dmlfast``: the fused op;
- ``eager``: the eager reference (dmlfast.reference, the official formulas) in that precision;
- ``compiled``: torch.compile of the reference, at 11,318 and 100,000 classes (fp32; Proxy-Anchor,
  ProxyNCA and IDML).

CUDA events, the median of ``--repeats`` after ``--warmup``, inputs rotated over several sets so that
together they exceed L2 (never zeros). ``extra_mb`` is the peak allocation beyond the inputs and the
gradients every implementation must hold. Prints one compact table last and writes
``gpu_check.json`` (records with loss, classes, precision, implementation, median_ms, extra_mb and the
predicted_ms of :func:`predict_ms`; top-level device, torch, date), rewritten after every case.

    python benchmarks/gpu_matrix.py --out benchmarks/out            # the full matrix (CUDA)
    python benchmarks/gpu_matrix.py --predict                       # the predicted table, no GPU needed
    python benchmarks/gpu_matrix.py --device cpu --classes 100 1000 --precisions fp32 --repeats 3   # a dry run
"""
import argparse
import contextlib
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

from outputs import add_overwrite_argument, refuse_existing
from timing import cuda_step_times

LOSSES = ("proxy_anchor", "proxy_nca", "idml", "arcface", "soft_triple")
#: Proxy rows per class (SoftTriple's K = 10 centers); its matrix stops at 100,000 classes (a million centers).
CENTERS = {"soft_triple": 10}
MAX_CLASSES = {"soft_triple": 100_000}
CLASSES = (100, 11_318, 100_000, 1_000_000)
PRECISIONS = ("fp32", "tf32", "bf16")
IMPLEMENTATIONS = ("gemm3", "dmlfast", "eager", "compiled")
# torch.compile of the reference: one dynamic-shape compilation per loss, kept to the GPU issue's
# three losses in fp32 so that gpu_check.sh stays within its minutes.
COMPILED_CLASSES = (11_318, 100_000)
COMPILED_PRECISIONS = ("fp32",)
COMPILED_LOSSES = ("proxy_anchor", "proxy_nca", "idml")
BATCH, DIM = 256, 512
L2_BYTES = 60 << 20  # H100: 50 MB, H200: 60 MB; rotated input sets exceed it several times

# The machine model behind the predictions (PERF.md, H200): GEMM rates at these shapes, copy
# bandwidth, and the cost of one kernel boundary.
RATE_FLOPS = {"fp32": 50e12, "tf32": 350e12, "bf16": 600e12}
BANDWIDTH = 4.0e12
LAUNCH_S = 4e-6


def predict_ms(loss, classes, precision, implementation, batch=BATCH, dim=DIM):
    """Predicted time from counted flops and bytes (the larger of the two per pass, plus launches).

    gemm3: three GEMMs (+ the bf16 cast of P). dmlfast (docs/losses.md §7.1, csrc/tiles.h): per tile
    the proxies' norms (+ the bf16 copy), the S GEMM (float32 out), the epilogue passes over the
    B x tile block, the dX and dP GEMMs (dP in the GEMM dtype) and one elementwise pass that writes
    the float32 dP; ProxyNCA beyond 64 MiB of S runs a fourth GEMM and its norms twice. eager: the reference's B x C temporaries (counted by reading
    dmlfast/reference.py: ~30 passes forward and backward) plus its three GEMMs. None for compiled.
    """
    if implementation == "compiled":
        return None
    if loss in ("arcface", "soft_triple"):  # the softmax family's passes over C·K proxy columns
        return predict_ms("proxy_nca", classes * CENTERS.get(loss, 1), precision, implementation, batch, dim)
    B, C, D = batch, classes, dim
    low = precision == "bf16"
    gemm_bytes = 2 if low else 4
    rate = RATE_FLOPS[precision]

    def gemm(reads, writes, flops=2 * B * C * D):
        return max(flops / rate, (reads + writes) / BANDWIDTH) + LAUNCH_S

    def passes(nbytes, launches=1):
        return nbytes / BANDWIDTH + launches * LAUNCH_S

    cast = passes(4 * C * D + 2 * C * D) if low else 0.0
    s_bytes = 4 * B * C
    g_bytes = gemm_bytes * B * C
    floor = cast + gemm(gemm_bytes * C * D, g_bytes) + gemm(g_bytes + gemm_bytes * C * D, 4 * B * D) + gemm(
        g_bytes, gemm_bytes * C * D)
    if implementation == "gemm3":
        return 1e3 * floor
    if implementation == "eager":
        return 1e3 * (floor + passes(30 * s_bytes, 60))
    tile = max(256, min(C, (1 << 24) // B))
    tiles = math.ceil(C / tile)
    three = (cast + gemm(gemm_bytes * C * D, s_bytes) + gemm(g_bytes + gemm_bytes * C * D, 4 * B * D)
             + gemm(g_bytes, gemm_bytes * C * D))
    norms = passes(4 * C * D, 2 * tiles)
    finish = passes((2 * gemm_bytes + 4) * C * D, tiles)  # read G'^T X_hat and p in the GEMM dtype, write dP
    fixed = passes(0, 12)
    if loss == "proxy_nca":
        recompute = C * B * 4 > (64 << 20)
        epilogue = passes(s_bytes, 3 * tiles) + passes(s_bytes + g_bytes, 2 * tiles)
        extra = (gemm(gemm_bytes * C * D, s_bytes) + cast + norms) if recompute else 0.0
        return 1e3 * (three + norms + epilogue + finish + extra + fixed)
    epilogue = passes(2 * s_bytes, tiles) + passes(s_bytes + g_bytes, 2 * tiles)
    if loss == "idml":
        epilogue += passes(5 * s_bytes, 4 * tiles)  # S', gate, H, E, G_a and their row sums
    return 1e3 * (three + norms + epilogue + finish + fixed)


def precision_context(precision, device):
    """Sets the matmul precision; returns the autocast context of the bf16 case (else a no-op)."""
    import torch

    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_inputs(loss, classes, precision, device, generator):
    import torch

    x = torch.randn(BATCH, DIM, device=device, generator=generator)
    if loss == "idml":
        x = torch.nn.functional.normalize(x, dim=1)
    x = x.to(torch.bfloat16 if precision == "bf16" else torch.float32).requires_grad_()
    p = torch.randn(classes * CENTERS.get(loss, 1), DIM, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, classes, (BATCH,), device=device, generator=generator)
    v = torch.nn.functional.normalize(torch.randn(BATCH, DIM, device=device, generator=generator), dim=1)
    return {"x": x, "p": p, "labels": labels, "v": v.to(x.dtype).requires_grad_()}


def make_step(implementation, loss, inputs, precision, device, compiled_cache):
    """A callable that runs forward + backward once."""
    import torch

    from dmlfast import functional, reference

    x, p, labels, v = inputs["x"], inputs["p"], inputs["labels"], inputs["v"]
    context = lambda: precision_context(precision, device)  # noqa: E731
    if implementation == "gemm3":
        grad_s = torch.randn(x.shape[0], p.shape[0], device=device, dtype=x.dtype)

        def step():
            with context():
                torch.mm(x, p.T)
                torch.mm(grad_s, p)
                torch.mm(grad_s.T, x)

        return step
    name = "idml_proxy_anchor_loss" if loss == "idml" else f"{loss}_loss"
    # ArcFace: the functional takes degrees, the reference radians. SoftTriple: K = 10, the centre
    # regulariser (eager in every implementation) left out.
    kwargs = {"arcface": {"margin": 28.6}, "soft_triple": {"centers_per_class": 10, "tau": 0.0}}.get(loss, {})
    if implementation == "dmlfast":
        fn = functools.partial(getattr(functional, name), **kwargs)
    else:
        if loss == "arcface":
            kwargs = {"margin": math.radians(28.6)}
        if implementation == "eager":
            fn = functools.partial(getattr(reference, name), **kwargs)
        else:
            key = (name, precision)
            if key not in compiled_cache:
                compiled_cache[key] = torch.compile(getattr(reference, name), dynamic=True)
            fn = functools.partial(compiled_cache[key], **kwargs)
    args = (x, v, p, labels) if loss == "idml" else (x, p, labels)
    leaves = (x, v, p) if loss == "idml" else (x, p)

    def step():
        for t in leaves:
            t.grad = None
        with context():
            loss_value = fn(*args)
        loss_value.backward()

    return step


def measure(implementation, loss, classes, precision, args, device, compiled_cache):
    """(median_ms, extra_mb) of one case, or raises."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    set_bytes = (BATCH + classes * CENTERS.get(loss, 1)) * DIM * 4
    sets = min(8, max(1, math.ceil(4 * L2_BYTES / set_bytes))) if device.type == "cuda" else 1
    all_inputs = [make_inputs(loss, classes, precision, device, generator) for _ in range(sets)]
    steps = [make_step(implementation, loss, inputs, precision, device, compiled_cache) for inputs in all_inputs]
    grads_bytes = 0 if implementation == "gemm3" else sets * sum(
        t.numel() * t.element_size() for inputs in all_inputs for t in inputs.values() if t.requires_grad)
    if device.type == "cuda":
        times, peak = cuda_step_times(steps, args.warmup, args.repeats)
        extra = max(0, peak - grads_bytes) / 2**20
    else:
        for i in range(args.warmup):
            steps[i % sets]()
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            steps[i % sets]()
            times.append(1e3 * (time.perf_counter() - start))
        extra = None
    return statistics.median(times), extra


def cases(args):
    for loss in args.losses:
        for classes in args.classes:
            for precision in args.precisions:
                for implementation in args.implementations:
                    if implementation == "compiled" and (classes not in COMPILED_CLASSES or loss not in COMPILED_LOSSES
                                                         or precision not in COMPILED_PRECISIONS):
                        continue
                    if classes > MAX_CLASSES.get(loss, classes):
                        continue
                    yield loss, classes, precision, implementation


def table(records, with_measured=True):
    """One compact markdown table: a row per (loss, C, precision); ms for gemm3, ratios to it."""
    rows = {}
    for r in records:
        rows.setdefault((r["loss"], r["classes"], r["precision"]), {})[r["implementation"]] = r
    key = "median_ms" if with_measured else "predicted_ms"
    lines = ["| loss | C | precision | gemm3 ms | dmlfast / gemm3 | eager / gemm3 | compiled / gemm3 | "
             "dmlfast / eager | dmlfast / compiled | dmlfast extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return f"{a / b:.2f}×" if a and b else "–"

    for (loss, classes, precision), by_impl in rows.items():
        ms = {impl: (by_impl.get(impl) or {}).get(key) for impl in IMPLEMENTATIONS}
        extra = (by_impl.get("dmlfast") or {}).get("extra_mb") if with_measured else None
        floor = ms["gemm3"]
        lines.append(
            f"| {loss} | {classes:,} | {precision} | {f'{floor:.3f}' if floor else '–'} | "
            f"{ratio(ms['dmlfast'], floor)} | {ratio(ms['eager'], floor)} | {ratio(ms['compiled'], floor)} | "
            f"{ratio(ms['dmlfast'], ms['eager'])} | {ratio(ms['dmlfast'], ms['compiled'])} | "
            f"{'–' if extra is None else f'{extra:.0f}'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/out", help="folder for gpu_check.json")
    parser.add_argument("--predict", action="store_true", help="print the predicted table and exit")
    add_overwrite_argument(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if any(c < 1 for c in args.classes):
        parser.error(f"--classes must be positive, got {args.classes}")

    records = [{"loss": loss, "classes": classes, "precision": precision, "implementation": implementation,
                "predicted_ms": predict_ms(loss, classes, precision, implementation)}
               for loss, classes, precision, implementation in cases(args)]
    if args.predict:
        print(table(records, with_measured=False))
        return

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_matrix: --device cuda but no GPU is visible")
    compiled_cache = {}
    out = Path(args.out)
    refuse_existing(out / "gpu_check.json", args.overwrite, "--out")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "batch": BATCH, "dim": DIM, "repeats": args.repeats, "warmup": args.warmup, "records": records}
    for record in records:
        started = time.perf_counter()
        try:
            record["median_ms"], record["extra_mb"] = measure(record["implementation"], record["loss"],
                                                              record["classes"], record["precision"], args,
                                                              device, compiled_cache)
        except Exception as error:  # one failing case must not hide the others
            record["median_ms"], record["extra_mb"] = None, None
            record["error"] = f"{type(error).__name__}: {error}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{record['loss']:<12} {record['classes']:>9,} {record['precision']:<4} {record['implementation']:<8} "
              f"{record.get('median_ms') or float('nan'):9.3f} ms (predicted {record['predicted_ms'] or float('nan'):.3f}) "
              f"{record.get('error', '')} [{time.perf_counter() - started:.0f}s]", flush=True)
        # Written after every case, so that a run stopped at its time limit keeps what it measured.
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    torch.set_float32_matmul_precision("highest")
    print()
    print(table(records))


if __name__ == "__main__":
    main()
