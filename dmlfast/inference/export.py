"""Exporting a trained model for serving: ONNX or TorchScript, with a dynamic batch dimension and the
normalisation inside.

The exported model takes ``images``: uint8 (N, 3, S, S) RGB, each image already resized (shorter
side to R px, bilinear, antialiased) and centre-cropped to S x S, as :meth:`EvalTransform.to_uint8`
makes them; it returns ``embeddings``: float32 (N, D), L2-normalised. S, R and the normalisation it
applies are recorded in the file (:func:`exported_metadata`: ONNX ``metadata_props["dmlfast"]``,
TorchScript extra file ``dmlfast.json``) and printed by ``python -m dmlfast.export``.

ONNX uses torch's ``torch.export``-based exporter (``pip install onnx onnxscript``), opset
:data:`ONNX_OPSET`, weights inside the one file (models under 2 GB); TorchScript traces the model
(``torch.jit.trace``), which keeps the batch dimension free for these feed-forward models.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from dmlfast.checks import InputError, one_of, require_new_files
from dmlfast.inference.files import write_atomically

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
METADATA_KEY = "dmlfast"
EXTRA_FILE = "dmlfast.json"
#: Pip packages the ONNX export needs (torch's exporter imports onnxscript, which brings onnx).
ONNX_PACKAGES = "onnx onnxscript"


class ServingModel(nn.Module):
    """The trained model behind its normalisation: uint8 (N, 3, S, S) RGB -> float32 (N, D) unit rows."""

    def __init__(self, model: nn.Module, normalization):
        super().__init__()
        self.model, self.normalization = model, normalization

    def forward(self, images):
        from dmlfast.data import normalize

        return self.model(normalize(images, self.normalization)).float()


def exported_metadata(trained) -> Dict[str, Any]:
    """What an exported file records about its input and origin (also returned by :func:`export_model`)."""
    from dmlfast import __version__

    transform = trained.transform
    return {"input": {"name": "images", "dtype": "uint8", "layout": "NCHW RGB", "size": transform.image_size,
                      "resize_shorter_side": transform.resize_size, "interpolation": "bilinear, antialiased",
                      "crop": "centre", "normalization_inside": transform.normalization},
            "output": {"name": "embeddings", "dtype": "float32", "shape": ["batch", trained.embedding_size], "l2_normalised": True},
            "model": trained.config["model"], "checkpoint": os.path.abspath(trained.checkpoint),
            "checkpoint_sha256": trained.checkpoint_sha256, "dmlfast": __version__}


def export_model(trained, path, export_format: str, *, overwrite: bool = False) -> Dict[str, Any]:
    """Write ``trained`` (a :class:`~dmlfast.inference.TrainedModel`) to ``path`` as ``export_format``
    (``"onnx"`` or ``"torchscript"``), on the CPU, float32; returns the metadata recorded in the file.
    ``InputError`` when ``path`` exists and ``overwrite`` is false, or a package the format needs is missing."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_model: export_format must be {one_of(EXPORT_FORMATS)}, got {export_format!r}")
    path = Path(path)
    require_new_files("--out", path, overwrite=overwrite)
    if not path.parent.is_dir():
        raise InputError(f"--out: no such folder: {path.parent}")
    model = ServingModel(copy.deepcopy(trained.model), trained.transform.normalization).cpu().float().eval()
    size = trained.transform.image_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    metadata = exported_metadata(trained)
    exporter = _onnx if export_format == "onnx" else _torchscript
    try:
        with torch.no_grad():
            write_atomically(path, lambda tmp: exporter(model, example, tmp, metadata))
    except OSError as error:
        raise InputError(f"--out: cannot write {path} ({error.strerror or error})") from error
    return metadata


def _torchscript(model: nn.Module, example: torch.Tensor, path: str, metadata: Dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks of normalize() become constants
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files={EXTRA_FILE: json.dumps(metadata)})


def _onnx(model: nn.Module, example: torch.Tensor, path: str, metadata: Dict[str, Any]) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise InputError(f"--format onnx needs the onnx and onnxscript packages: pip install {ONNX_PACKAGES}") from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"], output_names=["embeddings"],
                      dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, external_data=False, verbose=False)
    exported = onnx.load(path)
    entry = exported.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(exported, path)
