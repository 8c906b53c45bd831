"""Exact retrieval metrics (Recall@K, MAP@R, R-Precision) and NMI for embeddings: the API
(:func:`retrieval_metrics`) and its input checks.

References are ranked for each query by decreasing canonical similarity (the float64 dot product
of the L2-normalised, or sign-binarised, float32 vectors), ties by increasing reference index, so
the metrics do not depend on the backend (faiss or torch) or its rounding; the engine that does
this exactly, and its contract, is :mod:`.ranking`.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F

from .clustering import kmeans_assignments, normalized_mutual_information
from .ranking import RankingProblem, canonical_similarities, similarity_tolerance

METRICS = ("recall", "map@r", "r_precision", "nmi")

__all__ = ["METRICS", "canonical_similarities", "retrieval_metrics"]


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    *,
    reference=None,
    reference_labels=None,
    metrics=METRICS,
    binary: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    progress: bool | None = None,
    seed: int = 0,
) -> dict:
    """Retrieval metrics of ``embeddings`` (queries) against ``reference`` (default: the queries themselves).

    Args:
        embeddings: ``[N, D]`` query embeddings (torch tensor or array-like); computation runs on
            their device.
        labels: ``N`` class labels (any values ``numpy.unique`` can sort).
        ks: the K of Recall@K; each must be at most the number of references (``M``, or ``N - 1``
            when the queries are their own references).
        reference, reference_labels: ``[M, D]`` gallery and its ``M`` labels (In-shop style). When
            omitted, each query is searched among the other queries; its own row is excluded by
            index, so duplicates of a query are still retrieved.
        metrics: any of ``"recall"``, ``"map@r"``, ``"r_precision"``, ``"nmi"``.
        binary: evaluate ``sign(x)`` (``+1`` for ``x >= 0``, ``-1`` otherwise) instead of ``x``.
        backend: ``"auto"``, ``"faiss"`` or ``"torch"``; all give identical metrics. ``"auto"``
            is faiss for CUDA embeddings when a GPU faiss can serve the search, else torch.
        chunk_size: torch backend: side of the square similarity tiles (default 4096, a 64 MiB
            float32 tile); faiss backend: query rows per search chunk (default: 4096 on CPU,
            otherwise as many rows as keep a float32 ``chunk x M`` block within 256 MiB).
        progress: show a tqdm bar (default: only when stderr is a terminal).
        seed: seed of the k-means initialisation used for NMI.

    Returns:
        A dict with, for the requested metrics, ``"recall@K"`` (fraction of queries with a
        same-label reference among their K nearest), ``"map@r"`` and ``"r_precision"`` (Musgrave
        et al. 2020: with R = number of same-label references, R-Precision = r / R where r counts
        same-label references in the top R, MAP@R = (1/R) * sum_{i<=R} P@i * rel(i)), ``"nmi"``
        (k-means on the prepared query embeddings with one cluster per query class), plus
        ``"num_queries"`` and ``"queries_without_match"`` (queries with R = 0; they are left out of
        Recall@K, MAP@R and R-Precision, which are averages over the other queries and NaN when
        no query has a match).
    """
    requested = _validate_metrics(metrics)
    query, query_labels, reference_vectors, reference_label_values = _check_inputs(embeddings, labels, reference, reference_labels)
    self_reference = reference_vectors is None
    num_references = query.shape[0] - 1 if self_reference else reference_vectors.shape[0]
    ks = _validate_ks(ks, num_references, self_reference) if "recall" in requested else ()
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f'backend must be "auto", "faiss" or "torch", got {backend!r}')
    if chunk_size is not None and (not isinstance(chunk_size, Integral) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    if self_reference:
        reference_label_values = query_labels
    query_codes, reference_codes = _encode_labels(query_labels, reference_label_values, query.device)
    query = _prepare(query, binary)
    reference_vectors = query if self_reference else _prepare(reference_vectors, binary)

    result: dict = {}
    relevant_counts = _relevant_counts(query_codes, reference_codes, self_reference)
    has_match = (relevant_counts > 0).cpu()  # solve() returns its per-query figures on the CPU
    num_matched = int(has_match.sum())
    if requested & {"recall", "map@r", "r_precision"}:
        problem = RankingProblem(
            query=query,
            reference=reference_vectors,
            query_codes=query_codes,
            reference_codes=reference_codes,
            relevant_counts=relevant_counts,
            exclude_self=self_reference,
            recall_depth=max(ks) if ks else 0,
            needs_top_r=bool(requested & {"map@r", "r_precision"}),
            tolerance=similarity_tolerance(query, reference_vectors),
        )
        result.update(_ranking_metrics(problem.solve(backend, chunk_size, progress), has_match, ks, requested))
    if "nmi" in requested:
        num_classes = int(torch.unique(query_codes).numel())
        assignments = kmeans_assignments(query, num_classes, seed)
        result["nmi"] = normalized_mutual_information(query_codes.cpu().numpy(), assignments)
    result["num_queries"] = int(query.shape[0])
    result["queries_without_match"] = int(query.shape[0] - num_matched)
    return result


def _ranking_metrics(solution, has_match: torch.Tensor, ks, requested: set) -> dict:
    """Recall@K, MAP@R and R-Precision (those ``requested``) from :meth:`RankingProblem.solve`'s
    per-query figures, averaged over the queries with a match."""
    first_match_rank, average_precision, r_precision = solution
    num_matched = int(has_match.sum())
    result = {}
    for k in ks:
        hits = (first_match_rank[has_match] < k).sum()
        result[f"recall@{k}"] = _mean(int(hits), num_matched)
    if "map@r" in requested:
        result["map@r"] = _mean(float(average_precision[has_match].sum()), num_matched)
    if "r_precision" in requested:
        result["r_precision"] = _mean(float(r_precision[has_match].sum()), num_matched)
    return result


def _check_inputs(embeddings, labels, reference, reference_labels):
    """``(query, query labels, reference or None, reference labels or None)`` checked and converted
    (``None``: the queries are their own references)."""
    query = _as_embeddings(embeddings, "embeddings")
    query_labels = _as_labels(labels, "labels", query.shape[0], "embeddings")
    if reference is None and reference_labels is None:
        return query, query_labels, None, None
    if reference is None or reference_labels is None:
        given, missing = ("reference", "reference_labels") if reference is not None else ("reference_labels", "reference")
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    reference_vectors = _as_embeddings(reference, "reference").to(query.device)
    reference_label_values = _as_labels(reference_labels, "reference_labels", reference_vectors.shape[0], "reference")
    if reference_vectors.shape[1] != query.shape[1]:
        raise ValueError(
            f"reference must have the embeddings' dimension: embeddings has {query.shape[1]} columns, "
            f"reference has {reference_vectors.shape[1]}"
        )
    return query, query_labels, reference_vectors, reference_label_values


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def _validate_metrics(metrics) -> set:
    if isinstance(metrics, str):
        metrics = (metrics,)
    requested = set(metrics)
    unknown = sorted(requested - set(METRICS))
    if unknown or not requested:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {tuple(metrics)!r}")
    return requested


def _validate_ks(ks, num_references: int, self_reference: bool) -> tuple[int, ...]:
    if isinstance(ks, Integral):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(not isinstance(k, Integral) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    largest = max(ks)
    if largest > num_references:
        where = "other queries (the query itself is excluded)" if self_reference else "reference rows"
        raise ValueError(f"ks must not exceed the number of references: k={largest} requested, only {num_references} {where}")
    return tuple(sorted({int(k) for k in ks}))


def _as_embeddings(values, name: str) -> torch.Tensor:
    """A float32 ``[N, D]`` tensor with N, D >= 1 and only finite entries, or a ValueError/TypeError naming ``name``."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach()
    else:
        try:
            array = np.asarray(values)
        except Exception as error:  # noqa: BLE001 - report any conversion failure as a TypeError
            raise TypeError(f"{name} must be a torch tensor or a numeric array, got {type(values).__name__}") from error
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_samples, dim] array, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    tensor = tensor.float()
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        bad_rows = torch.nonzero(~finite).flatten()
        raise ValueError(f"{name} must be finite: {bad_rows.numel()} row(s) contain NaN or Inf, first is row {int(bad_rows[0])}")
    return tensor.contiguous()


def _value_kind(value) -> str:
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return "numbers"
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        return "text"
    return type(value).__name__


def label_kind(values, name: str) -> str:
    """``"numbers"`` or ``"text"`` (or a type's name): what the labels ``values`` hold; ``TypeError``
    when they mix kinds, since numpy would turn ``[1, "1"]`` into two equal strings (one class)."""
    array = values if isinstance(values, np.ndarray) else None
    if array is not None and array.dtype.kind in "biuf":
        return "numbers"
    if array is not None and array.dtype.kind in "US":
        return "text"
    items = array.tolist() if array is not None else list(values)
    kinds = {}
    for item in items:
        kinds.setdefault(_value_kind(item), item)
    if len(kinds) > 1:
        shown = " and ".join(f"{kind} (e.g. {example!r})" for kind, example in list(kinds.items())[:2])
        raise TypeError(f"{name} mixes {shown}; 1 and '1' would silently become one class: give every label one type")
    return next(iter(kinds), "numbers")


def _as_labels(values, name: str, expected_length: int, embeddings_name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        label_kind(values, name)  # before numpy converts a mixed list to text
    array = np.asarray(values)
    if array.dtype.kind == "O":
        label_kind(array, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.shape[0] != expected_length:
        raise ValueError(
            f"{name} must have one entry per {embeddings_name} row: {embeddings_name} has {expected_length} rows, "
            f"{name} has {array.shape[0]}"
        )
    return array


def _encode_labels(query_labels: np.ndarray, reference_labels: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Map both label arrays to shared int64 codes 0..C-1; ``TypeError`` when one holds numbers and the
    other text (concatenated, the numbers would be compared as text)."""
    query_kind, reference_kind = label_kind(query_labels, "labels"), label_kind(reference_labels, "reference_labels")
    if query_kind != reference_kind:
        q, r = (labels[:1].tolist() for labels in (query_labels, reference_labels))
        raise TypeError(f"labels hold {query_kind} (e.g. {q}) and reference_labels hold {reference_kind} (e.g. {r}); they "
                        "would be compared as text: give both one type")
    try:
        _, codes = np.unique(np.concatenate([query_labels, reference_labels]), return_inverse=True)
    except TypeError as error:
        raise TypeError(f"labels and reference_labels must hold comparable values of one type: {error}") from error
    codes = torch.from_numpy(codes.astype(np.int64).ravel()).to(device)
    return codes[: query_labels.shape[0]], codes[query_labels.shape[0] :]


def _prepare(vectors: torch.Tensor, binary: bool) -> torch.Tensor:
    """L2-normalised rows, or +-1 signs (exact integer dot products) when ``binary``."""
    if binary:
        return torch.where(vectors >= 0, 1.0, -1.0).to(torch.float32).contiguous()
    return F.normalize(vectors, dim=1).contiguous()


def _relevant_counts(query_codes: torch.Tensor, reference_codes: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """R per query: references sharing its label, minus the query itself when it is its own reference."""
    num_codes = int(max(query_codes.max(), reference_codes.max())) + 1
    per_code = torch.bincount(reference_codes, minlength=num_codes)
    return per_code[query_codes] - (1 if exclude_self else 0)


