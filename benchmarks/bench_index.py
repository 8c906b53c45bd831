"""Benchmark of the gallery index (``dmlfast.inference.GalleryIndex``): recall against the exact
search, query time and build time of the ``flat``, ``ivf`` and ``hnsw`` kinds.

The gallery is synthetic and shaped like learned embeddings: ``--size`` unit vectors of dimension
``--dim`` around ``size / 10`` random class centres (ten images a class, intra-class cosine about
0.75); the ``--queries`` queries are other images of random classes, not in the gallery. Recall@k
is the fraction of the exact top-k (the ``flat`` index) that an approximate index returns. Query
time is per query, searched as one batch of ``--queries`` and one at a time (latency). Each kind is
built and searched through the library (``GalleryIndex.build`` / ``search``), on the threads faiss
chooses; the table states them and the load average, since other jobs on a shared machine slow
every row. Run: ``python benchmarks/bench_index.py --size 1000000``. Random class centres in 128
dimensions are far apart, so this gallery is easier for the approximate kinds than real embeddings,
whose classes crowd each other: ``--embeddings E.npy`` (e.g. from ``python -m dmlfast.embed``) runs
the same table on real rows (the last ``--queries`` rows are the queries).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from dmlfast.inference import GalleryIndex
from dmlfast.inference.index import default_nlist


def synthetic_gallery(size: int, dim: int, queries: int, seed: int = 0):
    """``(gallery (size, dim), queries (queries, dim))`` float32 unit rows, ten gallery images a class."""
    rng = np.random.default_rng(seed)
    classes = max(1, size // 10)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int, labels):
        # noise of norm ~ 1/sqrt(3) around a unit centre: cosine of two images of a class ~ 1 / (1 + 1/3) = 0.75
        points = centres[labels] + np.sqrt(1 / (3 * dim)) * rng.standard_normal((count, dim), dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    gallery = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, 100_000):  # in blocks: the noise of 10^6 rows at once would double the peak memory
        stop = min(size, start + 100_000)
        gallery[start:stop] = draw(stop - start, np.arange(start, stop) % classes)
    return gallery, draw(queries, rng.integers(0, classes, queries))


def timed(run):
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def measure(index: GalleryIndex, queries: np.ndarray, exact: np.ndarray, k: int, singles: int, **search):
    """``(recall@1, recall@k, ms per query batched, ms per single query)``."""
    (_, found), batched = timed(lambda: index.search(queries, k, **search))
    start = time.perf_counter()
    for q in queries[:singles]:
        index.search(q[None], k, **search)
    single = (time.perf_counter() - start) / singles
    recall_1 = float(np.mean(found[:, 0] == exact[:, 0]))
    recall_k = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))
    return recall_1, recall_k, 1000 * batched / len(queries), 1000 * single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="gallery images (default: 100,000)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (default: 128)")
    parser.add_argument("--queries", type=int, default=1000, help="queries (default: 1000)")
    parser.add_argument("--singles", type=int, default=100, help="queries also searched one at a time (default: 100)")
    parser.add_argument("--k", type=int, default=10, help="recall@k against the exact search (default: 10)")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], help="index kinds (default: all)")
    parser.add_argument("--embeddings", help="a .npy of real embeddings instead of the synthetic gallery")
    args = parser.parse_args()
    import faiss

    if args.embeddings:
        rows = np.load(args.embeddings, allow_pickle=False).astype(np.float32)
        (gallery, queries), seconds = (rows[:-args.queries], rows[-args.queries:]), 0.0
        args.size, args.dim = gallery.shape
    else:
        (gallery, queries), seconds = timed(lambda: synthetic_gallery(args.size, args.dim, args.queries))
    paths = [f"/gallery/{i}.jpg" for i in range(args.size)]
    print(f"# {args.size:,} x {args.dim} gallery ({seconds:.0f} s to draw), {args.queries} queries, k = {args.k}; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); load average before: {os.getloadavg()[0]:.2f}")
    print("| kind | parameters | build s | recall@1 | recall@10 | ms / query (batch) | ms / query (one at a time) |")
    print("|---|---|---|---|---|---|---|")
    flat, build = timed(lambda: GalleryIndex.build(gallery, paths))
    _, exact = flat.search(queries, args.k)
    if "flat" in args.kinds:
        r1, rk, batch, one = measure(flat, queries, exact, args.k, args.singles)
        print(f"| flat | exact | {build:.1f} | {r1:.4f} | {rk:.4f} | {batch:.3f} | {one:.2f} |", flush=True)
    del flat
    if "ivf" in args.kinds:
        nlist = default_nlist(args.size)
        ivf, build = timed(lambda: GalleryIndex.build(gallery, paths, kind="ivf", nlist=nlist))
        for nprobe in (8, 16, 32, 64, 128):
            r1, rk, batch, one = measure(ivf, queries, exact, args.k, args.singles, nprobe=nprobe)
            print(f"| ivf | nlist {nlist}, nprobe {nprobe} | {build:.1f} | {r1:.4f} | {rk:.4f} | {batch:.3f} | {one:.2f} |", flush=True)
        del ivf
    if "hnsw" in args.kinds:
        hnsw, build = timed(lambda: GalleryIndex.build(gallery, paths, kind="hnsw"))
        for ef in (32, 64, 128, 256):
            r1, rk, batch, one = measure(hnsw, queries, exact, args.k, args.singles, ef_search=ef)
            print(f"| hnsw | M {hnsw.info['hnsw_m']}, efSearch {ef} | {build:.1f} | {r1:.4f} | {rk:.4f} | {batch:.3f} | {one:.2f} |",
                  flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
