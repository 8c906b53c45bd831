"""k-means clustering and normalised mutual information (NMI) for embedding evaluation."""

from __future__ import annotations

import numpy as np
import torch

from .knn import default_chunk_size, faiss_gpu_available, ieee_float32_matmul, import_faiss

KMEANS_ITERATIONS = 20
# k-means++ seeding costs one pass over the data per cluster: above this many (row, cluster)
# pairs it is replaced by seeded random distinct rows (timings at SOP size: benchmarks/RESULTS.md).
KMEANS_PLUS_PLUS_MAX_PAIRS = 1 << 26


def kmeans_assignments(vectors: torch.Tensor, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Cluster index (int64 array) of every row of ``vectors`` after k-means with ``num_clusters``.

    Uses ``faiss.Kmeans`` (GPU when the vectors are on CUDA and faiss has GPU support) if faiss is
    installed, otherwise :func:`torch_kmeans` (k-means++ seeds on small problems); both run ``KMEANS_ITERATIONS``
    Lloyd iterations from a seeded initialisation, so the result is reproducible for a given environment.
    """
    if not 1 <= num_clusters <= vectors.shape[0]:
        raise ValueError(f"num_clusters must be between 1 and the number of vectors ({vectors.shape[0]}), got {num_clusters}")
    faiss = import_faiss()
    if faiss is None:
        return torch_kmeans(vectors, num_clusters, seed).cpu().numpy()
    data = vectors.detach().float().cpu().contiguous().numpy()
    use_gpu = vectors.device.type == "cuda" and faiss_gpu_available()
    kmeans = faiss.Kmeans(
        data.shape[1],
        num_clusters,
        niter=KMEANS_ITERATIONS,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, data.shape[0]),
        gpu=use_gpu,
        verbose=False,
    )
    kmeans.train(data)
    _, assignments = kmeans.index.search(data, 1)
    return assignments[:, 0].astype(np.int64)


def torch_kmeans(vectors: torch.Tensor, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means in torch from a seeded k-means++ initialisation, squared L2 distance.

    The initial centroids are drawn by k-means++ (the first uniformly, each next one with
    probability proportional to its squared distance to the nearest centroid drawn so far)
    from a CPU ``torch.Generator`` seeded with ``seed``, so the result depends only on the
    data, ``seed`` and the device's arithmetic. That initialisation costs ``num_clusters``
    passes over the data, so beyond ``KMEANS_PLUS_PLUS_MAX_PAIRS`` rows x clusters the seeds
    are distinct rows drawn uniformly from the same generator instead. An emptied cluster keeps
    its previous centroid. Returns the int64 assignment of every row.
    """
    data = vectors.detach().float()
    generator = torch.Generator().manual_seed(seed)
    if data.shape[0] * num_clusters <= KMEANS_PLUS_PLUS_MAX_PAIRS:
        seeds = _kmeans_plus_plus_rows(data, num_clusters, generator)
    else:
        seeds = torch.randperm(data.shape[0], generator=generator)[:num_clusters]
    centroids = data[seeds.to(data.device)].clone()
    chunk = default_chunk_size(num_clusters)
    assignments = torch.empty(data.shape[0], dtype=torch.int64, device=data.device)
    with ieee_float32_matmul():
        for _ in range(KMEANS_ITERATIONS):
            half_squared_norms = 0.5 * (centroids * centroids).sum(1)
            for first in range(0, data.shape[0], chunk):
                scores = data[first : first + chunk] @ centroids.t() - half_squared_norms
                assignments[first : first + chunk] = scores.argmax(1)
            sums = torch.zeros_like(centroids).index_add_(0, assignments, data)
            counts = torch.bincount(assignments, minlength=num_clusters).unsqueeze(1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return assignments


def _kmeans_plus_plus_rows(data: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of the k-means++ seeds of ``data`` (draws from ``generator`` on the CPU).

    Distances are computed as ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0), so a row equal to a seed
    keeps a rounding-sized weight. Once every weight is 0 (fewer distinct rows than clusters), the
    remaining seeds are drawn uniformly.
    """
    num_rows = data.shape[0]
    squared_norms = (data * data).sum(1)

    def squared_distances(row):  # ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per seed
        with ieee_float32_matmul():
            return (squared_norms - 2.0 * (data @ data[row]) + squared_norms[row]).clamp_(min=0.0)

    chosen = torch.empty(num_clusters, dtype=torch.int64)
    chosen[0] = torch.randint(num_rows, (1,), generator=generator)[0]
    nearest = squared_distances(int(chosen[0]))
    for index in range(1, num_clusters):
        weights = nearest.cpu()
        if float(weights.sum()) > 0.0:
            chosen[index] = torch.multinomial(weights, 1, generator=generator)[0]
        else:
            chosen[index] = torch.randint(num_rows, (1,), generator=generator)[0]
        torch.minimum(nearest, squared_distances(int(chosen[index])), out=nearest)
    return chosen.to(data.device)


def _entropy(counts: np.ndarray) -> float:
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def normalized_mutual_information(labels_true, labels_pred) -> float:
    """NMI = I(U; V) / ((H(U) + H(V)) / 2), natural log (scikit-learn's default "arithmetic" normalisation).

    Two labelings that are both a single cluster score 1.0.
    """
    labels_true = np.asarray(labels_true).ravel()
    labels_pred = np.asarray(labels_pred).ravel()
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {labels_true.size} and {labels_pred.size}")
    _, true_codes = np.unique(labels_true, return_inverse=True)
    _, pred_codes = np.unique(labels_pred, return_inverse=True)
    num_pred = int(pred_codes.max()) + 1 if pred_codes.size else 0
    _, joint_counts = np.unique(true_codes.astype(np.int64) * num_pred + pred_codes, return_counts=True)
    true_counts = np.bincount(true_codes)
    pred_counts = np.bincount(pred_codes)
    entropy_true, entropy_pred = _entropy(true_counts), _entropy(pred_counts)
    if entropy_true == 0.0 and entropy_pred == 0.0:
        return 1.0
    mutual_information = entropy_true + entropy_pred - _entropy(joint_counts)
    return float(max(0.0, mutual_information) / ((entropy_true + entropy_pred) / 2.0))
