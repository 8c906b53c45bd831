"""Embedding images with a model, and the retrieval metrics of a model on the held-out classes:
what the training loop evaluates every epoch and what the commands that use a checkpoint embed.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from dmlfast.training import distributed
from dmlfast.training.setup import image_options
from dmlfast.training.throughput import to_model_layout

#: The metrics the training run reports (:data:`dmlfast.evaluation.METRICS` names), and the prefixes of
#: the keys :func:`evaluate_model`'s dict may hold.
TRAINING_METRICS = ("recall", "map@r", "r_precision")
_REPORTED = ("recall@", "map@r", "r_precision", "nmi")


def embed(model, loader, device, dtype, progress: bool, desc: str, dim: Optional[int] = None):
    """Embeddings (float32, on ``device``) and labels of every image of ``loader``, in order. A loader
    with no batch (a rank's share of a small set) gives empty tensors with ``dim`` columns
    (``ValueError`` when ``dim`` is not given)."""
    model.eval()
    embeddings, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for images, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
            images = to_model_layout(model, images)
            embeddings.append(model(images).float())
            labels.append(y)
    if not embeddings:
        if dim is None:
            raise ValueError(f"embed: {desc}: the loader yielded no batch; pass dim to get empty embeddings")
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(embeddings), torch.cat(labels)


def embed_all(model, loader, device, dtype, progress: bool, desc: str, dim: int):
    """:func:`embed` over the whole set: under torchrun each rank embeds its shard of ``loader`` and
    the rows of all ranks are gathered back into the dataset's order (the single-process result)."""
    embeddings, labels = embed(model, loader, device, dtype, progress, desc, dim)
    positions = [i for batch in loader.sampler for i in batch]
    return distributed.gather_in_order((embeddings, labels), positions, len(loader.sampler.labels))


def embed_list(model, image_list, config, device, dtype, *, batch_size: int, workers: int, progress: bool, desc: str):
    """float32 L2-normalised CPU embeddings of every image of ``image_list``, in order, with the
    checkpoint's evaluation transform (torchvision loader)."""
    from dmlfast.data import make_loader

    if len(image_list) == 0:
        raise ValueError(f"embed_list: image_list is empty ({image_list!r})")
    loader = make_loader(image_list, train=False, batch_size=batch_size, device=device, loader="torch", num_workers=workers,
                         **image_options(config))
    embeddings, _ = embed(model, loader, device, dtype, progress, desc)
    return torch.nn.functional.normalize(embeddings.float(), dim=1).cpu()


def evaluate_model(model, loaders, config: Dict[str, Any], device, dtype, progress: bool, metrics=TRAINING_METRICS,
                   **search) -> Dict[str, float]:
    """Recall@K (the dataset's Ks), MAP@R and R-Precision of ``model`` on the held-out classes, or the
    ``metrics`` named; ``search``: ``backend``, ``binary`` and ``seed`` of
    :func:`dmlfast.evaluation.retrieval_metrics` (``config["binary_eval"]`` adds the binarised
    embeddings' metrics as ``binary_*`` keys).

    Under torchrun the loaders are sharded (:func:`dmlfast.training.setup.make_eval_loaders`): every
    rank embeds its share, rank 0 computes the metrics on the gathered embeddings and every rank
    returns rank 0's dict."""
    query_loader, reference_loader = loaders
    dim = config["embedding_size"]
    q, ql = embed_all(model, query_loader, device, dtype, progress, "embed test", dim)
    reference = reference_labels = None
    if reference_loader is not None:
        reference, reference_labels = embed_all(model, reference_loader, device, dtype, progress, "embed gallery", dim)
    result = _retrieval_metrics(q, ql, reference, reference_labels, config, metrics, search) if distributed.is_main() else None
    return distributed.broadcast_object(result)


def _retrieval_metrics(q, ql, reference, reference_labels, config: Dict[str, Any], metrics, search) -> Dict[str, float]:
    """:func:`evaluate_model`'s dict from the embeddings and labels of the whole query (and reference) set."""
    from dmlfast.evaluation import retrieval_metrics

    count = len(reference_labels) if reference_labels is not None else len(ql) - 1
    ks = tuple(k for k in config["ks"] if k <= count)
    labels = None if reference_labels is None else reference_labels.cpu().numpy()
    search = dict(search)
    binary_only, both = bool(search.pop("binary", False)), bool(config.get("binary_eval"))
    result = {}
    for binary in (False, True) if both else (binary_only,):
        values = retrieval_metrics(q, ql.cpu().numpy(), ks=ks, reference=reference, reference_labels=labels,
                                   metrics=tuple(metrics), binary=binary, progress=False, **search)
        prefix = "binary_" if binary and both else ""
        result.update({f"{prefix}{k}": float(v) for k, v in values.items() if k.startswith(_REPORTED)})
    return result
