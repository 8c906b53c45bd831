"""Exact retrieval evaluation: Recall@K, MAP@R, R-Precision and NMI with faiss or torch k-NN backends.

Needs only numpy and torch; faiss (``faiss-cpu`` or ``faiss-gpu``) is used when installed.
"""

from .clustering import normalized_mutual_information
from .knn import available_backends
from .metrics import METRICS, retrieval_metrics

__all__ = ["METRICS", "available_backends", "normalized_mutual_information", "retrieval_metrics"]
