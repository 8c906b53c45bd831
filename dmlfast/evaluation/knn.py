"""Exact inner-product k-nearest-neighbour search backends.

Every backend yields, chunk by chunk over the queries, the ``k`` largest inner
products ``query @ reference.T`` and their reference indices, sorted by
decreasing similarity. Tie order inside a chunk is whatever the backend
produces: :mod:`dmlfast.evaluation.ranking` never relies on it.

* ``"faiss"``: ``faiss.knn_gpu`` on CUDA tensors (no host round trip) when a GPU
  build of faiss is installed, ``faiss.IndexFlatIP`` on CPU tensors.
* ``"torch"``: chunked ``query @ reference.T`` followed by ``topk`` on the
  tensors' device; a chunk never holds more than ``chunk_size`` query rows.
  (:func:`dmlfast.evaluation.retrieval_metrics` does not use this search for
  its torch backend: it collects candidates by threshold, see :mod:`.ranking`.)
* ``"auto"``: faiss on CUDA tensors when a GPU faiss can serve the request,
  torch otherwise (on CPU the torch backend of ``retrieval_metrics`` is faster).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Iterator

import torch

BACKENDS = ("auto", "faiss", "torch")
FAISS_GPU_MAX_K = 2048
SIMILARITY_BUDGET_BYTES = 256 * 2**20


def import_faiss():
    """Return the faiss module, or None when faiss is not installed."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def faiss_gpu_available() -> bool:
    """True when a GPU build of faiss is installed and sees at least one GPU."""
    faiss = import_faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    return faiss.get_num_gpus() > 0


def available_backends() -> tuple[str, ...]:
    """The concrete backends usable in this environment ("torch" always is)."""
    return ("faiss", "torch") if import_faiss() is not None else ("torch",)


def resolve_backend(backend: str, device: torch.device, k: int) -> str:
    """Map ``backend`` ("auto", "faiss" or "torch") to the concrete backend used for a search.

    Raises ValueError for an unknown name or a faiss request faiss cannot serve.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    faiss_installed = import_faiss() is not None
    on_cuda = device.type == "cuda"
    faiss_can_serve = faiss_installed and (
        device.type == "cpu" or (on_cuda and faiss_gpu_available() and k <= FAISS_GPU_MAX_K)
    )
    if backend == "auto":
        # on CPU the torch backend's threshold collection beats a faiss top-k search (benchmarks/bench_eval.py)
        return "faiss" if faiss_can_serve and on_cuda else "torch"
    if backend == "faiss" and not faiss_can_serve:
        if not faiss_installed:
            raise ValueError('backend="faiss" needs the faiss package; install faiss-cpu or faiss-gpu, or use backend="torch"')
        if on_cuda and not faiss_gpu_available():
            raise ValueError('backend="faiss" got CUDA embeddings but the installed faiss has no GPU support; use backend="torch" or CPU embeddings')
        if on_cuda:
            raise ValueError(f'backend="faiss" on GPU supports k <= {FAISS_GPU_MAX_K}, the search needs k={k}; use backend="torch"')
        raise ValueError(f'backend="faiss" does not support embeddings on device {device}')
    return backend


def default_chunk_size(num_references: int) -> int:
    """Query rows per chunk so that one chunk's float32 similarity block stays within 256 MiB."""
    return max(1, min(4096, SIMILARITY_BUDGET_BYTES // (4 * max(1, num_references))))


@contextlib.contextmanager
def ieee_float32_matmul():
    """Disable TF32 for float32 matmuls inside the block (similarity error bounds assume IEEE float32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def progress_bar(total: int, enabled: bool | None, description: str):
    """A tqdm bar over ``total`` query rows, or None when disabled, not a TTY or silenced
    (:func:`dmlfast.progress.progress_bars`)."""
    from dmlfast.progress import bars_enabled
    from dmlfast.progress import progress_bar as make_bar

    if enabled is None:
        enabled = sys.stderr.isatty()
    if not (enabled and bars_enabled()):
        return None
    return make_bar(total=total, desc=description, unit="query", leave=False)


def search(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    backend: str,
    chunk_size: int,
    progress: bool | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(first_row, similarities[B, k] float32, indices[B, k] int64)`` per chunk of query rows.

    ``backend`` must already be concrete ("faiss" or "torch"); outputs live on ``query.device``.
    """
    num_queries = query.shape[0]
    bar = progress_bar(num_queries, progress, f"{backend} k-NN")
    if backend == "faiss":
        chunks = _search_faiss(query, reference, k, chunk_size)
    else:
        chunks = _search_torch(query, reference, k, chunk_size)
    try:
        for first_row, similarities, indices in chunks:
            yield first_row, similarities, indices
            if bar is not None:
                bar.update(similarities.shape[0])
    finally:
        if bar is not None:
            bar.close()


def _search_torch(query, reference, k, chunk_size):
    reference_t = reference.t()
    with ieee_float32_matmul():
        for first_row in range(0, query.shape[0], chunk_size):
            similarities = query[first_row : first_row + chunk_size] @ reference_t
            top = torch.topk(similarities, k, dim=1, largest=True, sorted=True)
            del similarities
            yield first_row, top.values, top.indices


def _search_faiss(query, reference, k, chunk_size):
    faiss = import_faiss()
    if query.device.type == "cuda":
        importlib.import_module("faiss.contrib.torch_utils")
        resources = faiss.StandardGpuResources()
        device_index = query.device.index if query.device.index is not None else torch.cuda.current_device()
        for first_row in range(0, query.shape[0], chunk_size):
            similarities, indices = faiss.knn_gpu(
                resources,
                query[first_row : first_row + chunk_size],
                reference,
                k,
                metric=faiss.METRIC_INNER_PRODUCT,
                device=device_index,
            )
            yield first_row, similarities, indices
        return
    index = faiss.IndexFlatIP(reference.shape[1])
    index.add(reference.contiguous().numpy())
    query_array = query.contiguous().numpy()
    for first_row in range(0, query.shape[0], chunk_size):
        similarities, indices = index.search(query_array[first_row : first_row + chunk_size], k)
        yield first_row, torch.from_numpy(similarities), torch.from_numpy(indices)
