"""Benchmark of dmlfast.evaluation.retrieval_metrics at Stanford Online Products scale.

A synthetic clustered set (60,502 x 512, 11,316 classes of 2 to 12 samples, like the SOP test
split) is evaluated with Recall@{1,10,100,1000}, MAP@R and R-Precision once per available
backend, each in a fresh subprocess so that its wall time and peak resident memory are its own;
NMI (k-means with 11,316 clusters) is timed separately. Run: ``python benchmarks/bench_eval.py``.
The table states the torch/faiss thread counts (``--threads``; default: the libraries' default)
and the load average, since other jobs on a shared machine slow every backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_SAMPLES = 60_502
NUM_CLASSES = 11_316
DIM = 512
KS = (1, 10, 100, 1000)


def synthetic_sop(num_samples: int, num_classes: int, dim: int, noise: float, seed: int = 0):
    """Gaussian class centres plus isotropic noise; class sizes between 2 and 12 summing to num_samples."""
    rng = np.random.default_rng(seed)
    sizes = np.full(num_classes, 2)
    for _ in range(num_samples - sizes.sum()):
        while True:
            cls = rng.integers(num_classes)
            if sizes[cls] < 12:
                sizes[cls] += 1
                break
    labels = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    embeddings = centres[labels] + noise * rng.standard_normal((num_samples, dim), dtype=np.float32)
    return embeddings, labels


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(data_path: str, backend: str, metrics: list[str], threads: int | None) -> None:
    """Time one retrieval_metrics call and print a JSON line with the figures."""
    import torch

    if threads:
        torch.set_num_threads(threads)
        if backend == "faiss":
            import faiss

            faiss.omp_set_num_threads(threads)

    from dmlfast.evaluation import retrieval_metrics

    data = np.load(data_path)
    embeddings, labels = torch.from_numpy(data["embeddings"]), data["labels"]
    if backend.startswith("cuda:"):
        embeddings, backend = embeddings.cuda(), backend.split(":", 1)[1]
        retrieval_metrics(embeddings[:2048], labels[:2048], ks=(1,), metrics=("recall",), backend=backend)
        torch.cuda.synchronize()
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    result = retrieval_metrics(embeddings, labels, ks=KS, metrics=tuple(metrics), backend=backend, progress=False)
    if embeddings.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    faiss_threads = None
    if backend == "faiss":
        import faiss

        faiss_threads = faiss.omp_get_max_threads()
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss_before, "metrics": result,
                      "torch_threads": torch.get_num_threads(), "faiss_threads": faiss_threads}))


def run_worker(data_path: str, backend: str, metrics: list[str], threads: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", data_path, "--backend", backend, "--metrics", *metrics]
    if threads:
        command += ["--threads", str(threads)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=2.3, help="within-class noise scale of the synthetic set")
    parser.add_argument("--skip-nmi", action="store_true", help="do not time NMI (k-means with 11,316 clusters)")
    parser.add_argument("--backends", nargs="+", help="backends to time (default: every available one, "
                        "and each again on the GPU as cuda:NAME when there is one)")
    parser.add_argument("--threads", type=int, help="torch (and faiss) threads in the timed processes "
                        "(default: the libraries' own default, all cores); the table reports what was used")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--metrics", nargs="+", default=["recall", "map@r", "r_precision"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.backend, args.metrics, args.threads)
        return

    import torch

    from dmlfast.evaluation import available_backends

    backends = list(available_backends())
    if torch.cuda.is_available():
        backends += [f"cuda:{name}" for name in backends]
    if args.backends:
        unknown = sorted(set(args.backends) - set(backends))
        if unknown:
            parser.error(f"--backends: {', '.join(unknown)} not available here; choose from {', '.join(backends)}")
        backends = args.backends
    embeddings, labels = synthetic_sop(NUM_SAMPLES, NUM_CLASSES, DIM, args.noise)
    print(f"synthetic SOP: {embeddings.shape[0]} x {embeddings.shape[1]}, {NUM_CLASSES} classes, noise {args.noise}")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}, "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as directory:
        data_path = str(Path(directory) / "sop.npz")
        np.savez(data_path, embeddings=embeddings, labels=labels)
        runs = {backend: run_worker(data_path, backend, ["recall", "map@r", "r_precision"], args.threads) for backend in backends}
        nmi_run = None if args.skip_nmi else run_worker(data_path, backends[-1], ["nmi"], args.threads)

    names = [f"recall@{k}" for k in KS] + ["map@r", "r_precision"]
    header = f"| {'':28} | " + " | ".join(f"{backend:>10}" for backend in runs) + " |"
    print(header)
    print("|" + "-" * 30 + "|" + "|".join("-" * 12 for _ in runs) + "|")
    print(f"| {'Recall+MAP@R+R-Prec time (s)':28} | " + " | ".join(f"{run['seconds']:10.2f}" for run in runs.values()) + " |")
    print(f"| {'peak RSS (GiB)':28} | " + " | ".join(f"{run['peak_rss_gib']:10.2f}" for run in runs.values()) + " |")
    print(f"| {'threads (torch/faiss)':28} | " + " | ".join(
        f"{run['torch_threads']:>5}/{run['faiss_threads'] if run['faiss_threads'] is not None else '-':<4}" for run in runs.values()) + " |")
    for name in names:
        print(f"| {name:28} | " + " | ".join(f"{run['metrics'][name]:10.4f}" for run in runs.values()) + " |")
    identical = all(run["metrics"] == next(iter(runs.values()))["metrics"] for run in runs.values())
    print(f"metrics identical across backends: {identical}")
    print(f"load average after the runs: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    if nmi_run is not None:
        kmeans = "faiss.Kmeans" if "faiss" in backends else "torch k-means"
        print(f"NMI ({kmeans}, {NUM_CLASSES} clusters, 20 iterations): {nmi_run['metrics']['nmi']:.4f} "
              f"in {nmi_run['seconds']:.1f} s, peak RSS {nmi_run['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
